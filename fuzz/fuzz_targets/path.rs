//! Path normalization never panics, is idempotent, and never yields a dot-segment or `//`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = keygate::wire::path::normalize(text) {
        assert!(n.starts_with('/'));
        assert!(!n.contains("//"));
        assert!(n.split('/').all(|s| s != "." && s != ".."));
        assert_eq!(keygate::wire::path::normalize(&n).as_deref(), Ok(&*n));
    }
});
