//! The upstream system of the source: a partitioned log (Kafka-like) with a consumer group's committed offset per
//! partition. Records have 0-based offsets; record 0 is the one a connector that confuses "nothing processed"
//! with "processed through 0" loses.
use bytes::Bytes;

#[derive(Debug)]
pub struct PartitionedLog {
    pub partitions: Vec<Vec<Bytes>>,
    /// The group's committed offset per partition: the next offset to read (None: never committed).
    pub committed: Vec<Option<i64>>,
}

/// The payload of record `offset` of partition `p`; unique, so the sink's data can be audited record by record.
pub fn record_payload(p: u32, offset: u64) -> Bytes {
    Bytes::from(format!("p{p}o{offset};"))
}

/// Parses the concatenated payloads back into (partition, offset) pairs; `None` on bytes no record produced.
pub fn parse_records(data: &[u8]) -> Option<Vec<(u32, u64)>> {
    let text = std::str::from_utf8(data).ok()?;
    let mut out = Vec::new();
    for item in text.split_terminator(';') {
        let rest = item.strip_prefix('p')?;
        let (p, o) = rest.split_once('o')?;
        out.push((p.parse().ok()?, o.parse().ok()?));
    }
    Some(out)
}

impl PartitionedLog {
    pub fn new(sizes: &[u64]) -> Self {
        let partitions =
            sizes.iter().enumerate().map(|(p, &n)| (0..n).map(|o| record_payload(p as u32, o)).collect()).collect();
        Self { partitions, committed: vec![None; sizes.len()] }
    }

    pub fn len(&self, p: usize) -> u64 {
        self.partitions.get(p).map_or(0, |v| v.len() as u64)
    }

    pub fn get(&self, p: usize, offset: u64) -> Option<Bytes> {
        self.partitions.get(p)?.get(usize::try_from(offset).ok()?).cloned()
    }

    pub fn commit(&mut self, p: usize, next_offset: i64) {
        if let Some(c) = self.committed.get_mut(p) {
            *c = Some(next_offset);
        }
    }

    pub fn total(&self) -> u64 {
        self.partitions.iter().map(|v| v.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let mut data = Vec::new();
        data.extend_from_slice(&record_payload(0, 0));
        data.extend_from_slice(&record_payload(3, 17));
        assert_eq!(parse_records(&data), Some(vec![(0, 0), (3, 17)]));
        assert_eq!(parse_records(b"p1o2;garbage"), None);
    }
}
