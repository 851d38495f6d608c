//! The key-file parser must never panic, and must never echo a hash in its messages.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(records) = keygate::keys::parse_key_file(std::path::Path::new("fuzz.yaml"), text)
        {
            let store = keygate::keys::KeyStore::build(&records, None);
            assert_eq!(store.len(), records.len());
        }
    }
});
