//! The YAML side of the key file: the full parser's pass, which reads the `keys:` list entry
//! by entry (each checked and handed on at once) and places every problem it finds.

use std::fmt;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::{check_entry, RawKey, RecordSink, Seen};
use crate::config::fields::{read_fields, unknown_field, KeyText};
use crate::config::{Problem, Problems};

const KEY_FILE_FIELDS: &[&str] = &["keys"];

/// The full YAML parse, one entry at a time.
pub(super) fn parse_yaml<S: RecordSink>(
    path: &Path,
    text: &str,
    sink: &mut S,
) -> Result<(), Problems> {
    if text.trim().is_empty() {
        // A half-written file must not silently revoke every key.
        return Err(Problems(vec![Problem::whole(
            path,
            "key file is empty (an empty key list is written `keys: []`)",
        )]));
    }
    // The parser's default budget suits configs; a key file grows with its key count.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = budget.max_nodes.max(text.len() / 2);
    budget.max_events = budget.max_events.max(text.len());
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(text.len());
    let options = serde_saphyr::options! { budget: Some(budget) };
    let mut pass = Pass {
        path,
        seen: Seen::default(),
        problems: Vec::new(),
        sink,
        keys: false,
    };
    let unknown = serde_saphyr::with_deserializer_from_str_with_options(text, options, |d| {
        FileSeed(&mut pass).deserialize(d)
    })
    .map_err(|e| Problems(vec![Problem::from_yaml(path, &e)]))?;
    let mut problems = pass.problems;
    problems.extend(
        unknown
            .iter()
            .map(|k| unknown_field(path, k, "the key file", KEY_FILE_FIELDS)),
    );
    if !pass.keys {
        problems.push(Problem::whole(
            path,
            "missing `keys:` list (an empty key list is written `keys: []`)",
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems::sorted(problems))
    }
}

/// One pass over the file: what has been checked so far and where good records go.
struct Pass<'p, F> {
    path: &'p Path,
    seen: Seen,
    problems: Vec<Problem>,
    sink: &'p mut F,
    /// Whether a `keys:` list was present.
    keys: bool,
}

impl<F: RecordSink> Pass<'_, F> {
    /// Checks one entry and hands it on when it has no problem.
    fn entry(&mut self, entry: Spanned<RawKey>) {
        let before = self.problems.len();
        let record = check_entry(self.path, entry, &mut self.seen, &mut self.problems);
        if self.problems.len() == before {
            if let Some(r) = record {
                self.sink.record(r);
            }
        }
    }
}

/// The top-level mapping; its value is the unknown fields found beside `keys`.
struct FileSeed<'a, 'p, F>(&'a mut Pass<'p, F>);

impl<'de, F: RecordSink> DeserializeSeed<'de> for FileSeed<'_, '_, F> {
    type Value = Vec<Spanned<KeyText>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: RecordSink> Visitor<'de> for FileSeed<'_, '_, F> {
    type Value = Vec<Spanned<KeyText>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with a `keys:` list")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let pass = self.0;
        read_fields(&mut map, |name, map| {
            match name {
                "keys" => map.next_value_seed(KeysSeed(&mut *pass))?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }
}

/// The `keys:` value: a list read entry by entry, or null (reported as missing).
struct KeysSeed<'a, 'p, F>(&'a mut Pass<'p, F>);

impl<'de, F: RecordSink> DeserializeSeed<'de> for KeysSeed<'_, '_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, F: RecordSink> Visitor<'de> for KeysSeed<'_, '_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of key entries")
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.keys = true;
        while let Some(entry) = seq.next_element::<Spanned<RawKey>>()? {
            self.0.entry(entry);
        }
        Ok(())
    }
}
