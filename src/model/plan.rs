//! Chunk planning: the primary-key space split into ranges with stable ids.
//! The plan is made once per job and saved, so every worker, every later run
//! and `verify` agree on what chunk 17 is.

use serde::{Deserialize, Serialize};

/// A primary-key value. Integer keys order as numbers; string keys order by
/// their UTF-8 bytes (Rust's `str` order, PostgreSQL's `COLLATE "C"`,
/// OceanBase's `utf8mb4_bin`, Milvus' VarChar), so every backend agrees on
/// which chunk a key belongs to. JSON: a number or a string.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Key {
    Int(i64),
    Str(String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Int(v) => write!(f, "{v}"),
            Key::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl Key {
    /// The key as an SQL literal, strings quoted by the dialect's `quote`.
    pub fn sql_literal(&self, quote: &dyn Fn(&str) -> String) -> String {
        match self {
            Key::Int(v) => v.to_string(),
            Key::Str(s) => quote(s),
        }
    }

    /// The key as text, without quotes (a string as is, a number in digits).
    pub fn to_string_lossless(&self) -> String {
        match self {
            Key::Int(v) => v.to_string(),
            Key::Str(s) => s.clone(),
        }
    }
}

impl From<i64> for Key {
    fn from(v: i64) -> Key {
        Key::Int(v)
    }
}

/// Primary-key range of one chunk.
///
/// Integer keys: inclusive `[lo, hi]`; the first chunk starts at i64::MIN and
/// the last ends at i64::MAX, so together they cover every possible key.
///
/// String keys: `text` holds `(after, upto]`, exclusive below and inclusive
/// above (no string has a successor a database can hold, so bounds cannot
/// be made inclusive on both sides); `None` is an open end. `lo`/`hi` then
/// hold fingerprints of the two bounds, so ledgers, which record `lo`/`hi`,
/// still tell one plan from another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub id: u32,
    pub lo: i64,
    pub hi: i64,
    /// Rows counted in the source when planned.
    pub rows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextRange>,
}

/// String-key bounds `(after, upto]`; `None` is an open end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextRange {
    pub after: Option<String>,
    pub upto: Option<String>,
}

/// A chunk's bounds as a backend reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bounds<'a> {
    /// Every key (whatever the key type).
    All,
    /// Integer keys in `[lo, hi]`.
    Int { lo: i64, hi: i64 },
    /// String keys in `(after, upto]`.
    Text { after: Option<&'a str>, upto: Option<&'a str> },
}

impl ChunkRange {
    pub fn file_stem(&self) -> String {
        format!("{:06}", self.id)
    }

    /// A range holding every key, of either type (reads of a whole table).
    pub fn whole() -> ChunkRange {
        ChunkRange { id: 0, lo: i64::MIN, hi: i64::MAX, rows: 0, text: None }
    }

    pub fn bounds(&self) -> Bounds<'_> {
        match &self.text {
            Some(TextRange { after: None, upto: None }) => Bounds::All,
            Some(t) => Bounds::Text { after: t.after.as_deref(), upto: t.upto.as_deref() },
            None if self.lo == i64::MIN && self.hi == i64::MAX => Bounds::All,
            None => Bounds::Int { lo: self.lo, hi: self.hi },
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        match (self.bounds(), key) {
            (Bounds::All, _) => true,
            (Bounds::Int { lo, hi }, Key::Int(k)) => lo <= *k && *k <= hi,
            (Bounds::Text { after, upto }, Key::Str(k)) => {
                after.is_none_or(|a| k.as_str() > a) && upto.is_none_or(|u| k.as_str() <= u)
            }
            _ => false,
        }
    }

    /// The range as a condition on `column`, with keys written by `literal`;
    /// None for every key. E.g. `id BETWEEN 1 AND 500`, `id > 'a' AND id <= 'f'`.
    pub fn condition(&self, column: &str, literal: &dyn Fn(&Key) -> String) -> Option<String> {
        match self.bounds() {
            Bounds::All => None,
            Bounds::Int { lo, hi } => Some(format!("{column} BETWEEN {lo} AND {hi}")),
            Bounds::Text { after, upto } => {
                let mut parts = Vec::new();
                if let Some(a) = after {
                    parts.push(format!("{column} > {}", literal(&Key::Str(a.to_string()))));
                }
                if let Some(u) = upto {
                    parts.push(format!("{column} <= {}", literal(&Key::Str(u.to_string()))));
                }
                Some(parts.join(" AND "))
            }
        }
    }

    /// "[1, 500]" or "(\"a\", \"f\"]", for messages.
    pub fn describe_bounds(&self) -> String {
        describe_bounds(self.lo, self.hi, self.text.as_ref())
    }
}

/// A chunk's range as `describe_bounds` writes it, from the fields reports keep.
pub fn describe_bounds(lo: i64, hi: i64, text: Option<&TextRange>) -> String {
    match text {
        Some(t) => {
            let end = |b: &Option<String>, open: &str| b.as_ref().map(|s| format!("{s:?}")).unwrap_or_else(|| open.to_string());
            format!("({}, {}]", end(&t.after, "-∞"), end(&t.upto, "+∞"))
        }
        None => format!("[{lo}, {hi}]"),
    }
}

/// A stable 64-bit fingerprint of a string bound (None: an open end).
fn bound_fingerprint(b: Option<&str>) -> i64 {
    match b {
        None => 0,
        Some(s) => xxhash_rust::xxh3::xxh3_64(s.as_bytes()) as i64,
    }
}

/// Builds ranges from the keys that end each chunk (integer or string keys,
/// as the table's key type is).
pub fn ranges_from_keys(bounds: &[Key], total_rows: u64, chunk_rows: u64) -> Vec<ChunkRange> {
    let ints: Vec<i64> = bounds.iter().filter_map(|k| if let Key::Int(v) = k { Some(*v) } else { None }).collect();
    if ints.len() == bounds.len() && !matches!(bounds.first(), Some(Key::Str(_))) {
        return ranges_from_bounds(&ints, total_rows, chunk_rows);
    }
    let strs: Vec<String> = bounds.iter().map(Key::to_string_lossless).collect();
    ranges_from_text_bounds(&strs, total_rows, chunk_rows)
}

/// Builds string-key ranges from the sorted upper bounds of each chunk (the
/// key of every `chunk_rows`-th row, in byte order) and the total row count.
pub fn ranges_from_text_bounds(bounds: &[String], total_rows: u64, chunk_rows: u64) -> Vec<ChunkRange> {
    let mut chunks = Vec::with_capacity(bounds.len() + 1);
    let mut after: Option<String> = None;
    let mut planned = 0u64;
    let chunk = |id: usize, after: Option<String>, upto: Option<String>, rows: u64| ChunkRange {
        id: id as u32,
        lo: bound_fingerprint(after.as_deref()),
        hi: bound_fingerprint(upto.as_deref()),
        rows,
        text: Some(TextRange { after, upto }),
    };
    for b in bounds {
        chunks.push(chunk(chunks.len(), after.clone(), Some(b.clone()), chunk_rows));
        planned += chunk_rows;
        after = Some(b.clone());
    }
    let rest = total_rows.saturating_sub(planned);
    if rest > 0 || chunks.is_empty() {
        chunks.push(chunk(chunks.len(), after, None, rest));
    } else if let Some(last) = chunks.pop() {
        let after = last.text.and_then(|t| t.after);
        chunks.push(chunk(last.id as usize, after, None, last.rows));
    }
    chunks
}

/// Builds ranges from the sorted upper bounds of each chunk (the id of every
/// `chunk_rows`-th row) and the total row count.
pub fn ranges_from_bounds(bounds: &[i64], total_rows: u64, chunk_rows: u64) -> Vec<ChunkRange> {
    let mut chunks = Vec::with_capacity(bounds.len() + 1);
    let mut lo = i64::MIN;
    let mut planned = 0u64;
    for &b in bounds {
        if b == i64::MAX {
            break;
        }
        chunks.push(ChunkRange { id: chunks.len() as u32, lo, hi: b, rows: chunk_rows, text: None });
        planned += chunk_rows;
        lo = b + 1;
    }
    let rest = total_rows.saturating_sub(planned);
    if rest > 0 || chunks.is_empty() {
        chunks.push(ChunkRange { id: chunks.len() as u32, lo, hi: i64::MAX, rows: rest, text: None });
    } else if let Some(last) = chunks.last_mut() {
        last.hi = i64::MAX;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_key_space_without_gaps() {
        let c = ranges_from_bounds(&[10, 20, 30], 35, 10);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].lo, i64::MIN);
        assert_eq!(c[3].hi, i64::MAX);
        for w in c.windows(2) {
            assert_eq!(w[0].hi + 1, w[1].lo);
        }
        assert_eq!(c.iter().map(|c| c.rows).sum::<u64>(), 35);
    }

    #[test]
    fn exact_multiple_extends_last_chunk() {
        let c = ranges_from_bounds(&[10, 20], 20, 10);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].hi, i64::MAX);
        let e = ranges_from_bounds(&[], 0, 10);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].lo, e[0].hi), (i64::MIN, i64::MAX));
    }

    #[test]
    fn string_ranges_cover_every_string_once() {
        let bounds: Vec<String> = ["b", "d"].iter().map(|s| s.to_string()).collect();
        let c = ranges_from_text_bounds(&bounds, 25, 10);
        assert_eq!(c.len(), 3);
        for k in ["", "a", "b", "b\u{0}", "c", "d", "é", "日本", "\u{10ffff}"] {
            let key = Key::Str(k.to_string());
            assert_eq!(c.iter().filter(|r| r.contains(&key)).count(), 1, "{k:?}");
        }
        assert!(c[0].contains(&Key::Str("b".into())) && !c[1].contains(&Key::Str("b".into())));
        assert!(!c[0].contains(&Key::Int(1)));
        // An exact multiple ends the last chunk open.
        let e = ranges_from_text_bounds(&bounds, 20, 10);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].bounds(), Bounds::Text { after: Some("b"), upto: None });
        assert_eq!(ranges_from_text_bounds(&[], 0, 10)[0].bounds(), Bounds::All);
        let lit = |k: &Key| format!("'{}'", match k { Key::Str(s) => s.clone(), Key::Int(i) => i.to_string() });
        assert_eq!(c[1].condition("id", &lit).unwrap(), "id > 'b' AND id <= 'd'");
        assert_eq!(c[0].condition("id", &lit).unwrap(), "id <= 'b'");
        // Another plan over other bounds is told apart by the ledger's lo/hi.
        let other = ranges_from_text_bounds(&["c".to_string()], 25, 10);
        assert_ne!((c[0].lo, c[0].hi), (other[0].lo, other[0].hi));
    }

    #[test]
    fn keys_order_strings_by_bytes_and_read_as_json() {
        assert!(Key::Str("B".into()) < Key::Str("a".into()));
        assert!(Key::Str("z".into()) < Key::Str("é".into()));
        let keys: Vec<Key> = serde_json::from_str(r#"[7, "x"]"#).unwrap();
        assert_eq!(keys, vec![Key::Int(7), Key::Str("x".into())]);
        assert_eq!(serde_json::to_string(&keys).unwrap(), r#"[7,"x"]"#);
    }
}
