//! The `keygate` binary: parse the command line, set up logging, run, map to an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keygate::cli::Cli::parse();
    keygate::trim::install(collect_freed);
    // rustls warns once per handshake about what clients send (an IP address as SNI, say):
    // a client must not decide how much keygate logs. Failed handshakes are logged at debug.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=off"));
    // Colour only for a person at a terminal: files, pipes and log shippers get plain bytes.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if keygate::cli::json_diagnostics(&cli) {
        keygate::cli::JSON_DIAGNOSTICS.store(true, std::sync::atomic::Ordering::Relaxed);
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
    keygate::cli::run(cli)
}

// glibc malloc showed up at ~7% of the request path's CPU; mimalloc's per-thread heaps fit the
// thread-per-core workers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the calling thread's freed mimalloc pages to the OS; workers call it once they go
/// quiet after a burst, so RSS falls back after load.
fn collect_freed() {
    // SAFETY: mi_collect takes no pointers and only walks the calling thread's own heap (and
    // abandoned segments); mimalloc is the global allocator, so that heap exists.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
