//! Old path of [`crate::keys::last_used`], kept while callers move to the new one.

pub(crate) use crate::keys::last_used::*;
