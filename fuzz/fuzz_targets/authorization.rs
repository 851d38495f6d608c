//! The Authorization parser and the kg_ checksum check take any bytes without panicking.
#![no_main]
use keygate::proxy::credential::{parse_authorization, Credential};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Credential::ApiKey(token) = parse_authorization(data) {
        assert!(!token.is_empty() && !token.contains(&b' '));
        let _ = keygate::keys::well_formed(&token);
        let _ = keygate::keys::digest(&token);
    }
});
