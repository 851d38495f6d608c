//! Old path of [`crate::keys::file`], kept while callers move to the new one.

pub(crate) use crate::keys::file::*;
