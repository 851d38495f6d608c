//! The config parser must reject garbage with a located problem, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(problems) =
            keygate::config::Config::parse(std::path::Path::new("/nonexistent/fuzz.yaml"), text)
        {
            assert!(!problems.0.is_empty());
        }
    }
});
