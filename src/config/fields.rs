//! Unknown keys as problems with positions, instead of serde's `deny_unknown_fields`, which
//! stops at the first one and so hides every other problem in the file.
//!
//! The config is small, so it is read twice: once as a plain tree of spanned keys checked
//! against each section's [`Shape`], once into the typed structs. The key file grows with its
//! key count, so its readers use [`read_fields`] to collect unknown keys in the one pass.

use std::fmt;
use std::path::Path;

use serde::de::{
    self, Deserialize, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_saphyr::Spanned;

use super::{Problem, Problems};

/// Parses `text` into `T` and lists every key `shape` does not name.
///
/// A YAML syntax error is the only early stop: past it nothing about the file is known.
/// A value of the wrong type ends the typed parse (`None`), but the unknown keys found
/// before it are still returned beside it.
pub(crate) fn read_checked<T: DeserializeOwned>(
    file: &Path,
    text: &str,
    shape: &Shape,
    options: serde_saphyr::Options,
) -> Result<(Vec<Problem>, Option<T>), Problems> {
    let tree: Node = serde_saphyr::from_str_with_options(text, options.clone())
        .map_err(|e| Problems(vec![Problem::from_yaml(file, &e)]))?;
    let mut problems = Vec::new();
    unknown_keys(file, &tree, shape, &mut problems);
    drop(tree);
    match serde_saphyr::from_str_with_options::<T>(text, options) {
        Ok(raw) => Ok((problems, Some(raw))),
        Err(e) => {
            problems.push(Problem::from_yaml(file, &e));
            Ok((problems, None))
        }
    }
}

/// What a section of the document holds, as far as key checking cares.
pub(crate) enum Shape {
    /// A value whose inside has no keys to check.
    Leaf,
    /// A mapping with these fields (name, what the field holds).
    Map(&'static str, &'static [(&'static str, Shape)]),
    /// A list whose items all have this shape.
    List(&'static Shape),
}

/// A YAML document with only what key checking needs: mappings keep their keys' positions.
pub(crate) enum Node {
    /// A mapping's entries in document order.
    Map(Vec<(Spanned<KeyText>, Node)>),
    /// A sequence's items.
    Seq(Vec<Node>),
    /// Any scalar or null.
    Scalar,
}

/// A mapping key as text; keys that are not scalars read as `?`.
pub(crate) struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = KeyText;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText("null".to_string()))
    }
    fn visit_none<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText("null".to_string()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KeyText("?".to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(KeyText("?".to_string()))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            entries.push((key, map.next_value::<Node>()?));
        }
        Ok(Node::Map(entries))
    }
}

/// Reads a mapping entry by entry in one pass, for files too large to walk twice.
///
/// `known` reads the value of a field it names and returns true; every other key is
/// skipped and kept, with its position, in the returned list.
pub(crate) fn read_fields<'de, A: MapAccess<'de>>(
    map: &mut A,
    mut known: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<Vec<Spanned<KeyText>>, A::Error> {
    let mut unknown = Vec::new();
    while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
        if !known(&key.value.0, map)? {
            map.next_value::<IgnoredAny>()?;
            unknown.push(key);
        }
    }
    Ok(unknown)
}

/// The problem for a key that `section` does not have, with a hint when one name is close.
pub(crate) fn unknown_field(
    file: &Path,
    key: &Spanned<KeyText>,
    section: &str,
    names: &[&str],
) -> Problem {
    Problem::at(
        file,
        key.referenced,
        unknown_message(&key.value.0, section, names),
    )
}

/// Pushes one problem per key in `node` that `shape` does not name, at every depth.
///
/// Values of the wrong kind (a list where a mapping belongs) are left to the typed parse,
/// which reports them with their own message.
pub(crate) fn unknown_keys(file: &Path, node: &Node, shape: &Shape, out: &mut Vec<Problem>) {
    match (node, shape) {
        (Node::Map(entries), Shape::Map(section, fields)) => {
            for (key, value) in entries {
                let name = key.value.0.as_str();
                match fields.iter().find(|(f, _)| *f == name) {
                    Some((_, inner)) => unknown_keys(file, value, inner, out),
                    None => {
                        let names: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
                        out.push(unknown_field(file, key, section, &names));
                    }
                }
            }
        }
        (Node::Seq(items), Shape::List(inner)) => {
            for item in items {
                unknown_keys(file, item, inner, out);
            }
        }
        _ => {}
    }
}

fn unknown_message(name: &str, section: &str, names: &[&str]) -> String {
    match closest(name, names) {
        Some(near) => format!("unknown field `{name}` in {section}; did you mean `{near}`?"),
        None => format!(
            "unknown field `{name}` in {section}; expected one of: {}",
            names.join(", ")
        ),
    }
}

/// The known name a typo most likely meant, if any is close enough to suggest.
fn closest<'a>(name: &str, names: &[&'a str]) -> Option<&'a str> {
    // Jaro-Winkler rewards a shared start, which catches both `scope` and `listen_addr`
    // (edit distance 5 from `listen`); the 0.85 cut-off is pinned by `close_names`.
    names
        .iter()
        .map(|n| (strsim::jaro_winkler(name, n), *n))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

/// The word a short token (an HTTP method) most likely meant, by edit distance.
///
/// Jaro-Winkler scores `GTE` against `GET` at 0.6, too far for [`closest`]; counting edits,
/// a swap of two letters is one, which is the typo a short word gets.
pub(crate) fn nearest_word<'a>(word: &str, words: &[&'a str]) -> Option<&'a str> {
    let allowed = (word.len() / 3).max(1);
    words
        .iter()
        .map(|w| (strsim::osa_distance(word, w), *w))
        .filter(|(d, _)| *d <= allowed)
        .min_by_key(|(d, _)| *d)
        .map(|(_, w)| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INNER: Shape = Shape::Map("inner", &[("scopes", Shape::Leaf)]);
    const ITEMS: Shape = Shape::List(&INNER);
    const TOP: Shape = Shape::Map(
        "the file",
        &[
            ("listen", Shape::Leaf),
            ("items", ITEMS),
            ("keys_file", Shape::Leaf),
        ],
    );

    fn check(text: &str) -> Vec<Problem> {
        let node: Node = serde_saphyr::from_str(text).unwrap();
        let mut out = Vec::new();
        unknown_keys(Path::new("f.yaml"), &node, &TOP, &mut out);
        out
    }

    #[test]
    fn every_unknown_key_at_every_depth_is_reported_at_the_key() {
        let out = check(
            "listen_addr: 1\nitems:\n  - scope: [a]\n  - scopes: [b]\n    zzz: {q: 1}\nother: 2\n",
        );
        let at: Vec<(u64, u64)> = out.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(at, vec![(1, 1), (3, 5), (5, 5), (6, 1)], "{out:?}");
        assert!(out[0].message.contains("did you mean `listen`?"), "{out:?}");
        assert!(out[1].message.contains("did you mean `scopes`?"), "{out:?}");
        assert!(
            out[2].message.contains("expected one of: scopes"),
            "{out:?}"
        );
    }

    #[test]
    fn wrong_kinds_are_left_to_the_typed_parse() {
        assert!(check("items: 7\nlisten: {a: 1}\n").is_empty());
    }

    #[test]
    fn close_names() {
        let names = [
            "listen",
            "keys_file",
            "known_scopes",
            "scopes",
            "shutdown_delay",
        ];
        assert_eq!(closest("listen_addr", &names), Some("listen"));
        assert_eq!(closest("scope", &names), Some("scopes"));
        assert_eq!(closest("keysfile", &names), Some("keys_file"));
        assert_eq!(closest("zebra", &names), None);
    }

    #[test]
    fn near_words() {
        let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
        assert_eq!(nearest_word("GTE", &methods), Some("GET"));
        assert_eq!(nearest_word("DELTE", &methods), Some("DELETE"));
        assert_eq!(nearest_word("OPTINOS", &methods), Some("OPTIONS"));
        assert_eq!(nearest_word("PSOT", &methods), Some("POST"));
        assert_eq!(nearest_word("BREW", &methods), None);
    }
}
