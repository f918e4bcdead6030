//! Collapsing a batch of row changes per primary key, so that applying it is
//! one bulk delete plus one bulk write: the last image wins, a delete wins
//! over an earlier insert, and an update that left some columns untouched
//! (PostgreSQL's unchanged TOAST values) keeps them untouched.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::contract::changes::ChangeCounts;
use crate::model::plan::Key;

/// One column of a row image, in the source's encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Null,
    /// The change does not carry this column: it kept its value.
    Unchanged,
    Value(Bytes),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
}

/// One row change, columns in the source spec's order.
#[derive(Clone, Debug)]
pub struct RowChange {
    pub op: ChangeOp,
    pub key: Key,
    /// An update that changed the primary key: the row's old key.
    pub old_key: Option<Key>,
    /// Empty for deletes.
    pub fields: Vec<Field>,
}

enum Final {
    Deleted,
    Row(Vec<Field>),
}

/// The changes of a batch, collapsed per key.
#[derive(Default)]
pub struct Collapser {
    rows: HashMap<Key, Final>,
    pub counts: ChangeCounts,
}

/// What applying a collapsed batch takes.
#[derive(Debug, Default)]
pub struct Collapsed {
    /// Keys whose row is gone at the end of the batch.
    pub deletes: Vec<Key>,
    /// Final images carrying every column, by key.
    pub full: Vec<(Key, Vec<Field>)>,
    /// Images with untouched columns, grouped by which columns they carry
    /// (`true` = carried); applied as updates of those columns only.
    pub partial: BTreeMap<Vec<bool>, Vec<(Key, Vec<Field>)>>,
}

impl Collapser {
    pub fn add(&mut self, change: RowChange) {
        match change.op {
            ChangeOp::Insert => self.counts.inserts += 1,
            ChangeOp::Update => self.counts.updates += 1,
            ChangeOp::Delete => self.counts.deletes += 1,
        }
        if let Some(old) = change.old_key.clone().filter(|k| *k != change.key) {
            self.rows.insert(old, Final::Deleted);
        }
        match change.op {
            ChangeOp::Delete => {
                self.rows.insert(change.key, Final::Deleted);
            }
            ChangeOp::Insert => {
                self.rows.insert(change.key, Final::Row(change.fields));
            }
            ChangeOp::Update => {
                let merged = match self.rows.remove(&change.key) {
                    Some(Final::Row(mut prev)) => {
                        for (p, f) in prev.iter_mut().zip(change.fields) {
                            if f != Field::Unchanged {
                                *p = f;
                            }
                        }
                        prev
                    }
                    _ => change.fields,
                };
                self.rows.insert(change.key, Final::Row(merged));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn finish(self) -> Collapsed {
        let mut out = Collapsed::default();
        for (key, f) in self.rows {
            match f {
                Final::Deleted => out.deletes.push(key),
                Final::Row(fields) if fields.iter().all(|f| *f != Field::Unchanged) => out.full.push((key, fields)),
                Final::Row(fields) => {
                    let mask = fields.iter().map(|f| *f != Field::Unchanged).collect();
                    out.partial.entry(mask).or_default().push((key, fields));
                }
            }
        }
        out.deletes.sort_unstable();
        out.full.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for rows in out.partial.values_mut() {
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Field {
        Field::Value(Bytes::copy_from_slice(s.as_bytes()))
    }
    fn ch(op: ChangeOp, key: i64, fields: Vec<Field>) -> RowChange {
        RowChange { op, key: Key::Int(key), old_key: None, fields }
    }

    #[test]
    fn last_image_wins_and_delete_wins_over_insert() {
        let mut c = Collapser::default();
        c.add(ch(ChangeOp::Insert, 1, vec![v("a"), v("v1")]));
        c.add(ch(ChangeOp::Update, 1, vec![v("b"), v("v2")]));
        c.add(ch(ChangeOp::Insert, 2, vec![v("x"), v("v")]));
        c.add(ch(ChangeOp::Delete, 2, vec![]));
        c.add(ch(ChangeOp::Delete, 3, vec![]));
        let counts = c.counts;
        let out = c.finish();
        assert_eq!((counts.inserts, counts.updates, counts.deletes), (2, 1, 2));
        assert_eq!(out.deletes, vec![Key::Int(2), Key::Int(3)]);
        assert_eq!(out.full, vec![(Key::Int(1), vec![v("b"), v("v2")])]);
        assert!(out.partial.is_empty());
    }

    #[test]
    fn untouched_columns_stay_untouched_or_take_the_earlier_image() {
        let mut c = Collapser::default();
        // Only the first column changed: the vector is not in the change.
        c.add(ch(ChangeOp::Update, 7, vec![v("team2"), Field::Unchanged]));
        // Inserted in the batch, then a scalar update: the insert's vector is kept.
        c.add(ch(ChangeOp::Insert, 8, vec![v("t"), v("vec8")]));
        c.add(ch(ChangeOp::Update, 8, vec![v("t2"), Field::Unchanged]));
        let out = c.finish();
        assert_eq!(out.full, vec![(Key::Int(8), vec![v("t2"), v("vec8")])]);
        assert_eq!(out.partial.get(&vec![true, false]).unwrap(), &vec![(Key::Int(7), vec![v("team2"), Field::Unchanged])]);
    }

    #[test]
    fn a_changed_key_deletes_the_old_row() {
        let mut c = Collapser::default();
        c.add(RowChange { op: ChangeOp::Update, key: Key::Int(10), old_key: Some(Key::Int(9)), fields: vec![v("a")] });
        let out = c.finish();
        assert_eq!(out.deletes, vec![Key::Int(9)]);
        assert_eq!(out.full, vec![(Key::Int(10), vec![v("a")])]);
    }
}
