//! Global transaction ids for `PREPARE TRANSACTION`: `wallaroo:<worker>:<txn>:<start>:<end>:<tag>`.
//!
//! Everything recovery needs is in the gid itself (pg_prepared_xacts is the durable record of Phase 1):
//! worker and txn are percent-encoded so `:` separates fields unambiguously, `tag` is a hash of the target
//! table so two sinks with the same worker names never touch each other's transactions.
use sha2::{Digest, Sha256};

use crate::runtime::sink_api::Txn;

/// PostgreSQL's limit on a gid (GIDSIZE - 1).
pub const MAX_GID: usize = 199;

pub fn table_tag(table: &str) -> String {
    let digest = Sha256::digest(table.as_bytes());
    hex::encode(&digest[..4])
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.@#/+=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Everything before the txn: the `starts_with` filter for one worker's transactions.
pub fn worker_prefix(worker: &str) -> String {
    format!("wallaroo:{}:", encode(worker))
}

pub fn gid(worker: &str, txn: &Txn, tag: &str) -> Result<String, String> {
    let g = format!("{}{}:{}:{}:{tag}", worker_prefix(worker), encode(&txn.id_str()), txn.start, txn.end);
    if g.len() > MAX_GID {
        return Err(format!(
            "global transaction id for worker {worker:?} txn {:?} is {} bytes; PostgreSQL allows {MAX_GID} (use staging mode)",
            txn.id_str(),
            g.len()
        ));
    }
    Ok(g)
}

/// The transaction a gid of `worker` for the table with `tag` stands for, if it is one.
pub fn parse(gid: &str, worker: &str, tag: &str) -> Option<Txn> {
    let rest = gid.strip_prefix(&worker_prefix(worker))?;
    let mut parts = rest.split(':');
    let (txn, start, end, t) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || t != tag {
        return None;
    }
    Some(Txn { id: decode(txn)?.into(), start: start.parse().ok()?, end: end.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_separators_in_names() {
        let tag = table_tag("public.t");
        let txn = Txn { id: "cp:12'x%".into(), start: 10, end: 99 };
        let g = gid("w:1", &txn, &tag).unwrap();
        assert!(!g.contains('\''));
        assert_eq!(parse(&g, "w:1", &tag), Some(txn.clone()));
        assert_eq!(parse(&g, "w", &tag), None);
        assert_eq!(parse(&g, "w:1", &table_tag("other")), None);
        let long = Txn { id: "x".repeat(300).into(), start: 0, end: 1 };
        assert!(gid("w", &long, &tag).is_err());
    }
}
