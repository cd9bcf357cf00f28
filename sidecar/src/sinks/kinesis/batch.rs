//! PutRecords batching limits and partition keys, without I/O.
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// PutRecords accepts at most 500 records per request.
pub const MAX_RECORDS: usize = 500;
/// ... and at most 5 MiB per request, partition keys included.
pub const MAX_REQUEST_BYTES: usize = 5 << 20;
/// One record (data + partition key) may be at most 1 MiB.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Partition keys are at most 256 Unicode characters.
pub const MAX_KEY_CHARS: usize = 256;

/// One record on its way to Kinesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub partition_key: String,
    pub data: Bytes,
}

impl Outgoing {
    pub fn size(&self) -> usize {
        self.partition_key.len() + self.data.len()
    }
}

/// The partition key of a message: its key when it has one (keys longer than Kinesis allows are replaced by
/// their hash), else a hash of the payload, which spreads keyless output evenly over the shards.
pub fn partition_key(key: Option<&[u8]>, payload: &[u8]) -> String {
    match key {
        Some(k) if !k.is_empty() => {
            let s = String::from_utf8_lossy(k);
            if s.chars().count() <= MAX_KEY_CHARS { s.into_owned() } else { digest(k) }
        }
        _ => digest(payload),
    }
}

fn digest(b: &[u8]) -> String {
    hex::encode(&Sha256::digest(b)[..16])
}

/// How many records from the front of `queue` fit in one PutRecords request (at least one).
pub fn next_batch_len<'a>(queue: impl IntoIterator<Item = &'a Outgoing>) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for r in queue {
        if n == MAX_RECORDS || (n > 0 && bytes + r.size() > MAX_REQUEST_BYTES) {
            break;
        }
        n += 1;
        bytes += r.size();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: usize) -> Outgoing {
        Outgoing { partition_key: "k".into(), data: Bytes::from(vec![0u8; n]) }
    }

    #[test]
    fn batches_stop_at_500_records() {
        let q: Vec<_> = (0..1200).map(|_| rec(10)).collect();
        assert_eq!(next_batch_len(&q), 500);
        assert_eq!(next_batch_len(&q[1000..]), 200);
        assert_eq!(next_batch_len(&q[..0]), 0);
    }

    #[test]
    fn batches_stop_at_5_mib() {
        let q: Vec<_> = (0..10).map(|_| rec(1 << 20)).collect();
        // Each record is 1 MiB + a 1-byte key, so only 4 fit into 5 MiB.
        assert_eq!(next_batch_len(&q), 4);
    }

    #[test]
    fn keys_come_from_the_message_or_a_payload_hash() {
        assert_eq!(partition_key(Some(b"user-1"), b"x"), "user-1");
        let h = partition_key(None, b"payload");
        assert_eq!(h.len(), 32);
        assert_eq!(h, partition_key(Some(b""), b"payload"));
        assert_ne!(h, partition_key(None, b"other"));
        let long = vec![b'a'; 300];
        assert_eq!(partition_key(Some(&long), b"x").len(), 32);
    }
}
