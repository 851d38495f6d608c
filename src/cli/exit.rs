//! Exit codes: 0 ok, 1 runtime failure, 2 usage or invalid config.

/// Exit code for usage errors and invalid config.
pub const EXIT_INVALID: u8 = 2;
/// Exit code for runtime failures.
pub const EXIT_FAILURE: u8 = 1;
