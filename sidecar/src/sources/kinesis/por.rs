//! Points of reference for Kinesis records.
//!
//! Sequence numbers (~56 decimal digits) do not fit the protocol's u64, and the sidecar has no durable place of
//! its own, so the point of reference is derived from what Kinesis itself can seek to:
//!
//! `por = (ms << 16) | index`, where `ms` is the record's ApproximateArrivalTimestamp in milliseconds, clamped
//! to never go below the previous record's (so it is non-decreasing along the shard even if the service's clock
//! steps back), and `index` counts the records of the shard before it with the same clamped `ms` (0 for the
//! first). Strictly increasing along the shard, and a function of the shard's contents from the first record of
//! that millisecond on.
//!
//! Resuming "after p" without memory: `GetShardIterator(AT_TIMESTAMP, ms(p) - 1)`, recompute the points of
//! reference from there, and skip every record whose point is `<= p`. Starting 1 ms early absorbs the rounding of
//! the timestamp parameter and never changes the points of the records of `ms(p)`. Within one process a map from
//! unacknowledged points of reference to sequence numbers turns a resume into an exact
//! `AFTER_SEQUENCE_NUMBER` instead (see the README section "Kinesis source" for the limits).
use std::cmp::Ordering;

pub const INDEX_BITS: u32 = 16;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

pub fn make(ms: u64, index: u64) -> u64 {
    (ms << INDEX_BITS) | (index & INDEX_MASK)
}

/// (clamped ms, index) of a point of reference.
pub fn parts(por: u64) -> (u64, u64) {
    (por >> INDEX_BITS, por & INDEX_MASK)
}

/// Assigns points of reference along one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PorClock {
    /// The last point handed out (None before the first record).
    last: Option<u64>,
}

impl PorClock {
    /// A clock that continues right after `por` (used when resuming after a known record).
    pub fn after(por: u64) -> Self {
        Self { last: Some(por) }
    }

    /// The point of reference of the next record of the shard, which arrived at `arrival_ms`.
    pub fn next(&mut self, arrival_ms: u64) -> u64 {
        let por = match self.last {
            None => make(arrival_ms, 0),
            Some(last) => {
                let (ms, idx) = parts(last);
                if arrival_ms > ms {
                    make(arrival_ms, 0)
                } else if idx < INDEX_MASK {
                    make(ms, idx + 1)
                } else {
                    // 65536 records in one millisecond of one shard cannot happen within Kinesis' write limits
                    // (1000 records/s per shard); stay strictly increasing anyway.
                    make(ms + 1, 0)
                }
            }
        };
        self.last = Some(por);
        por
    }
}

/// The millisecond to ask AT_TIMESTAMP for when resuming after `por`.
pub fn resume_ms(por: u64) -> u64 {
    parts(por).0.saturating_sub(1)
}

/// Compares two Kinesis sequence numbers (unbounded decimal strings).
pub fn seq_cmp(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_millisecond_records_are_counted() {
        let mut c = PorClock::default();
        let a = c.next(1_700_000_000_123);
        let b = c.next(1_700_000_000_123);
        let d = c.next(1_700_000_000_124);
        assert_eq!(parts(a), (1_700_000_000_123, 0));
        assert_eq!(parts(b), (1_700_000_000_123, 1));
        assert_eq!(parts(d), (1_700_000_000_124, 0));
        assert!(a < b && b < d);
    }

    #[test]
    fn clock_steps_back_are_clamped() {
        let mut c = PorClock::default();
        let a = c.next(1000);
        let b = c.next(999);
        assert_eq!(parts(b), (1000, 1));
        assert!(b > a);
    }

    #[test]
    fn index_overflow_stays_increasing() {
        let mut c = PorClock::after(make(5, INDEX_MASK));
        let n = c.next(5);
        assert_eq!(parts(n), (6, 0));
    }

    #[test]
    fn continuing_after_a_point_matches_a_recount() {
        // The arrival times of one shard, with repeats and a step back.
        let arrivals = [10, 10, 11, 11, 11, 9, 12, 12];
        let mut full = PorClock::default();
        let pors: Vec<u64> = arrivals.iter().map(|&a| full.next(a)).collect();
        for cut in 0..arrivals.len() {
            let mut resumed = PorClock::after(pors[cut]);
            let rest: Vec<u64> = arrivals[cut + 1..].iter().map(|&a| resumed.next(a)).collect();
            assert_eq!(rest, pors[cut + 1..].to_vec());
            // Recount from the first record with arrival >= ms(p) - 1 (what AT_TIMESTAMP returns), skip <= p.
            let from_ms = resume_ms(pors[cut]);
            let start = arrivals.iter().position(|&a| a >= from_ms).unwrap();
            let mut recount = PorClock::default();
            let delivered: Vec<u64> =
                arrivals[start..].iter().map(|&a| recount.next(a)).filter(|&p| p > pors[cut]).collect();
            assert_eq!(delivered, pors[cut + 1..].to_vec(), "cut after {cut}");
        }
    }

    #[test]
    fn sequence_numbers_compare_numerically() {
        assert_eq!(seq_cmp("9", "10"), Ordering::Less);
        assert_eq!(
            seq_cmp(
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692538361571095921575989136588899"
            ),
            Ordering::Less
        );
        assert_eq!(seq_cmp("0010", "10"), Ordering::Equal);
        assert_eq!(seq_cmp("0", "5"), Ordering::Less);
    }
}
