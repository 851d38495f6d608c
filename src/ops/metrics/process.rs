//! Process metrics in the conventional `process_*` names, read from `/proc/self` at scrape
//! time. Linux only: elsewhere (or when `/proc` is not mounted) the lines are left out.

use std::fmt::Write;

/// Clock ticks per second in `/proc/<pid>/stat`: the kernel fixes USER_HZ at 100 for user
/// space on every architecture Linux runs on (Prometheus' procfs assumes the same).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about this process right now.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// Soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

/// Reads the sample; a file that cannot be read leaves its fields empty.
pub fn sample() -> Sample {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let fields = stat.as_deref().map(stat_fields).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // Fields after the command name, counted from `state` (field 3 in proc(5)).
    let cpu_seconds = match (ticks(14 - 3), ticks(15 - 3)) {
        (Some(u), Some(s)) => Some((u + s) as f64 / USER_HZ),
        _ => None,
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| field_after(&s, "btime"));
    let start_time_seconds = match (boot, ticks(22 - 3)) {
        (Some(b), Some(t)) => Some(b as f64 + t as f64 / USER_HZ),
        _ => None,
    };
    // VmRSS is in kB already, which spares knowing the page size.
    let resident_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| field_after(&s, "VmRSS:"))
        .map(|kb| kb * 1024);
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| field_after(&s, "Max open files"));
    Sample {
        cpu_seconds,
        resident_bytes,
        open_fds,
        max_fds,
        start_time_seconds,
    }
}

/// The space-separated fields after `(comm)`, which may itself hold spaces and parentheses.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rfind(')')
        .map(|i| stat[i + 1..].split_whitespace().collect())
        .unwrap_or_default()
}

/// The first number after `label` on the line that starts with it.
fn field_after(text: &str, label: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Appends the sample in Prometheus text format.
pub fn render(s: &Sample, out: &mut String) {
    let mut line = |name: &str, kind: &str, help: &str, value: Option<String>| {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            );
        }
    };
    line(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        s.cpu_seconds.map(|v| v.to_string()),
    );
    line(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        s.resident_bytes.map(|v| v.to_string()),
    );
    line(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        s.open_fds.map(|v| v.to_string()),
    );
    line(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        s.max_fds.map(|v| v.to_string()),
    );
    line(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        s.start_time_seconds.map(|v| v.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parens_does_not_shift_fields() {
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 1000 0 0";
        let f = stat_fields(stat);
        assert_eq!(f[0], "S");
        assert_eq!(f[14 - 3], "250");
        assert_eq!(f[22 - 3], "1000");
    }

    #[test]
    fn this_process_has_a_sample_on_linux() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let s = sample();
        assert!(s.cpu_seconds.is_some() && s.resident_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() >= 3 && s.start_time_seconds.unwrap() > 1.0e9);
        let mut out = String::new();
        render(&s, &mut out);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"));
    }
}
