//! Parser of the `pgoutput` logical decoding protocol (version 1): the
//! messages vmig needs to follow one table (Begin, Commit, Relation, Insert,
//! Update, Delete, Truncate). Column values arrive in binary (`binary
//! 'true'`), i.e. in each type's send format, the same bytes as binary COPY,
//! so vectors arrive bit-exact.

use anyhow::{Result, bail};
use bytes::Bytes;

use crate::contract::collapse::Field;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug)]
pub enum Message {
    Begin,
    Commit {
        /// End of the commit record: the position to confirm once applied.
        end_lsn: u64,
        /// Unix microseconds.
        commit_time_us: i64,
    },
    Relation {
        id: u32,
        namespace: String,
        name: String,
        columns: Vec<String>,
    },
    Insert {
        relation: u32,
        new: Vec<Field>,
    },
    Update {
        relation: u32,
        /// The old key or old row, when the key changed (or replica identity full).
        old: Option<Vec<Field>>,
        new: Vec<Field>,
    },
    Delete {
        relation: u32,
        old: Vec<Field>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, Type, logical messages: nothing to apply.
    Other,
}

struct Reader<'a> {
    b: &'a Bytes,
    p: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.p + n > self.b.len() {
            bail!("pgoutput message truncated");
        }
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn cstr(&mut self) -> Result<String> {
        let rest = &self.b[self.p..];
        let Some(end) = rest.iter().position(|&c| c == 0) else { bail!("pgoutput string not terminated") };
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.p += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Field>> {
        let n = self.u16()? as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Field::Null,
                b'u' => Field::Unchanged,
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    let start = self.p;
                    self.take(len)?;
                    Field::Value(self.b.slice(start..start + len))
                }
                k => bail!("pgoutput tuple: unknown column kind {:?}", k as char),
            });
        }
        Ok(out)
    }
}

pub fn parse(data: &Bytes) -> Result<Message> {
    let mut r = Reader { b: data, p: 0 };
    Ok(match r.u8()? {
        b'B' => Message::Begin,
        b'C' => {
            r.u8()?; // flags
            r.u64()?; // commit lsn
            let end_lsn = r.u64()?;
            let ts = r.u64()? as i64;
            Message::Commit { end_lsn, commit_time_us: ts + PG_EPOCH_OFFSET_US }
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            r.u8()?; // replica identity
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                r.u8()?; // flags (part of the key)
                columns.push(r.cstr()?);
                r.u32()?; // type oid
                r.u32()?; // typmod
            }
            Message::Relation { id, namespace, name, columns }
        }
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                bail!("pgoutput insert without a new tuple");
            }
            Message::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                bail!("pgoutput update without a new tuple");
            }
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                bail!("pgoutput delete without a key");
            }
            Message::Delete { relation, old: r.tuple()? }
        }
        b'T' => {
            let n = r.u32()? as usize;
            r.u8()?; // options (cascade, restart identity)
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        _ => Message::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_with_unchanged_toast_keeps_the_column_unchanged() {
        let mut m = vec![b'U'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'N');
        m.extend(3u16.to_be_bytes());
        m.push(b'b');
        m.extend(8u32.to_be_bytes());
        m.extend(42i64.to_be_bytes());
        m.push(b'u');
        m.push(b'n');
        match parse(&Bytes::from(m)).unwrap() {
            Message::Update { relation, old, new } => {
                assert_eq!(relation, 16384);
                assert!(old.is_none());
                assert_eq!(new[0], Field::Value(Bytes::copy_from_slice(&42i64.to_be_bytes())));
                assert_eq!(new[1], Field::Unchanged);
                assert_eq!(new[2], Field::Null);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_messages_are_errors() {
        assert!(parse(&Bytes::from_static(b"I\0\0")).is_err());
    }
}
