//! Control: the snapshot a request runs on, and the reload that replaces it when the config,
//! key file or certificate changes (settled, validated, swapped; a bad file keeps the old one).

pub mod reload;
pub mod snapshot;
