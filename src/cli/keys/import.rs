//! `keys import` (a key issued elsewhere, by its hash) and `keys hash` (the hash line for one).

use std::io::Read;

use time::OffsetDateTime;

use super::list::list_json;
use super::{failure, new_id, usage, Failure, Output, Target, Terms};
use crate::keys::audit::Action;
use crate::keys::file as keyfile;
use crate::keys::{self, last_used as state};

/// `keys hash`: one key on stdin, its `sha256:` line on stdout.
pub(super) fn hash() -> Result<(), Failure> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| failure(format!("cannot read stdin: {e}")))?;
    let key = input.trim_end_matches(['\n', '\r']);
    if key.is_empty() || key.contains(['\n', ' ', '\t']) {
        return Err(usage("expected exactly one key on stdin"));
    }
    println!("{}", keys::hash_line(key.as_bytes()));
    Ok(())
}

/// `keys import`: a key issued elsewhere, by its hash only.
pub(super) fn import(
    out: Output,
    t: &Target,
    hash: &str,
    id: Option<&str>,
    terms: &Terms<'_>,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    let digest = keys::parse_hash(hash)
        .ok_or_else(|| usage("--hash: expected sha256: followed by 64 lowercase hex digits"))?;
    if id.is_some_and(|id| !keys::valid_id(id)) {
        return Err(usage("--id: use letters, digits, '-', '_', '.'"));
    }
    let rec = keyfile::update_audited(&t.keys_file, t.audit.as_ref(), |records| {
        if records.iter().any(|r| r.hash == digest) {
            return Err("a key with this hash is already in the key file".to_string());
        }
        let id = match id {
            Some(id) if records.iter().any(|r| r.id == id) => {
                return Err(format!("key id {id:?} already exists"))
            }
            Some(id) => id.to_string(),
            None => new_id(records).map_err(|f| f.message)?,
        };
        let rec = terms.record(id, digest, now);
        records.push(rec.clone());
        let entry = t.entry(Action::Import, &rec, now);
        Ok((rec, entry))
    })?
    .map_err(failure)?;
    match out {
        Output::Text | Output::K8sSecret => println!("{}", rec.id),
        Output::Json => println!("{}", list_json(&[rec], &state::State::default(), now)),
    }
    Ok(())
}
