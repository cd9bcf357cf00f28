//! Point of reference of a Redis Streams entry: the entry id `<ms>-<seq>` packed into one u64 as
//! `ms << 20 | seq`.
//!
//! Entry ids are ordered by (ms, seq); the packing keeps that order exactly (it is an order-preserving
//! bijection on its domain), so the point of reference strictly increases with the id and decodes back to the
//! very same id. The domain: `ms < 2^44` (Unix milliseconds up to the year 2527) and `seq < 2^20` (1,048,576
//! entries within one millisecond). Ids outside it are refused with an error instead of being rounded, because
//! a rounded point of reference could skip or repeat entries on resume.
use std::fmt;

pub const SEQ_BITS: u32 = 20;
pub const MS_BITS: u32 = 64 - SEQ_BITS;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// A stream entry id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PorError {
    #[error("stream entry id {0:?} is not of the form <ms>-<seq>")]
    Syntax(String),
    #[error("stream entry id {id}: {what} does not fit the point-of-reference encoding (ms < 2^44, seq < 2^20)")]
    OutOfRange { id: String, what: &'static str },
}

impl EntryId {
    pub fn parse(s: &str) -> Result<Self, PorError> {
        let (ms, seq) = s.split_once('-').ok_or_else(|| PorError::Syntax(s.to_string()))?;
        let ms = ms.parse::<u64>().map_err(|_| PorError::Syntax(s.to_string()))?;
        let seq = seq.parse::<u64>().map_err(|_| PorError::Syntax(s.to_string()))?;
        Ok(Self { ms, seq })
    }

    pub fn to_por(self) -> Result<u64, PorError> {
        if self.ms >> MS_BITS != 0 {
            return Err(PorError::OutOfRange { id: self.to_string(), what: "ms" });
        }
        if self.seq > SEQ_MASK {
            return Err(PorError::OutOfRange { id: self.to_string(), what: "seq" });
        }
        Ok(self.ms << SEQ_BITS | self.seq)
    }

    pub fn from_por(por: u64) -> Self {
        Self { ms: por >> SEQ_BITS, seq: por & SEQ_MASK }
    }

    /// The smallest id greater than this one (for exclusive range starts such as XAUTOCLAIM's).
    pub fn next(self) -> Self {
        if self.seq == u64::MAX { Self { ms: self.ms + 1, seq: 0 } } else { Self { ms: self.ms, seq: self.seq + 1 } }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(EntryId::parse("0-0").unwrap().to_por().unwrap(), 0);
        assert_eq!(EntryId::parse("0-1").unwrap().to_por().unwrap(), 1);
        assert_eq!(EntryId::parse("1-0").unwrap().to_por().unwrap(), 1 << 20);
        assert_eq!(EntryId::parse("1700000000000-5").unwrap().to_por().unwrap(), (1_700_000_000_000u64 << 20) | 5);
        assert_eq!(EntryId::from_por((1_700_000_000_000u64 << 20) | 5).to_string(), "1700000000000-5");
    }

    #[test]
    fn limits_are_errors_not_rounding() {
        assert!(EntryId { ms: 1, seq: (1 << 20) - 1 }.to_por().is_ok());
        assert_eq!(
            EntryId { ms: 1, seq: 1 << 20 }.to_por().unwrap_err(),
            PorError::OutOfRange { id: "1-1048576".into(), what: "seq" }
        );
        assert!(EntryId { ms: (1 << 44) - 1, seq: 0 }.to_por().is_ok());
        assert!(matches!(EntryId { ms: 1 << 44, seq: 0 }.to_por(), Err(PorError::OutOfRange { what: "ms", .. })));
        assert!(matches!(EntryId::parse("12"), Err(PorError::Syntax(_))));
        assert!(matches!(EntryId::parse("a-1"), Err(PorError::Syntax(_))));
    }

    proptest! {
        #[test]
        fn order_preserving_and_exact(a_ms in 0u64..(1 << 44), a_seq in 0u64..(1 << 20), b_ms in 0u64..(1 << 44), b_seq in 0u64..(1 << 20)) {
            let a = EntryId { ms: a_ms, seq: a_seq };
            let b = EntryId { ms: b_ms, seq: b_seq };
            let (pa, pb) = (a.to_por().unwrap(), b.to_por().unwrap());
            prop_assert_eq!(a.cmp(&b), pa.cmp(&pb));
            prop_assert_eq!(EntryId::from_por(pa), a);
            prop_assert_eq!(EntryId::parse(&a.to_string()).unwrap(), a);
        }
    }
}
