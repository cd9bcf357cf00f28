//! Where the S3 sink keeps things in the bucket, and the small JSON documents it writes there.
//!
//! ```text
//! <prefix><key>                                    published objects, objectPer: message (named by the message key)
//! <prefix><worker>/<start:020>-<end:020>           published objects, objectPer: checkpoint (one per committed round)
//! <prefix>_wallaroo/staging/<worker>/...           the open round's uploads (never read by consumers)
//! <prefix>_wallaroo/pending/<worker>.json          Phase 1 manifest: the round voted commit, not yet published
//! <prefix>_wallaroo/offsets/<worker>.json          end offset of the last committed round
//! ```
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

/// A worker name made safe and unambiguous inside an object key: `[A-Za-z0-9-_.]` kept, every other byte
/// percent-encoded (so two different names never share a key, and a `/` never nests).
pub fn worker_segment(worker: &str) -> String {
    let mut out = String::with_capacity(worker.len());
    for b in worker.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() || out == "." || out == ".." { format!("%{out}") } else { out }
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every staged upload of `worker` lives under this prefix (one open round at a time per worker).
    pub fn staging_dir(&self, worker: &str) -> String {
        format!("{}_wallaroo/staging/{}/", self.prefix, worker_segment(worker))
    }

    /// The staged body of the message at byte `offset` (objectPer: message).
    pub fn staged_message(&self, worker: &str, offset: u64) -> String {
        format!("{}{offset:020}", self.staging_dir(worker))
    }

    /// A staged part starting at byte `offset` (objectPer: checkpoint).
    pub fn staged_part(&self, worker: &str, offset: u64) -> String {
        format!("{}part-{offset:020}", self.staging_dir(worker))
    }

    pub fn pending(&self, worker: &str) -> String {
        format!("{}_wallaroo/pending/{}.json", self.prefix, worker_segment(worker))
    }

    pub fn offsets(&self, worker: &str) -> String {
        format!("{}_wallaroo/offsets/{}.json", self.prefix, worker_segment(worker))
    }

    /// The published object of one committed round (objectPer: checkpoint). Zero-padded offsets make the
    /// names of one worker sort in output order and never collide (committed ranges never overlap).
    pub fn checkpoint_object(&self, worker: &str, start: u64, end: u64) -> String {
        format!("{}{}/{start:020}-{end:020}", self.prefix, worker_segment(worker))
    }

    /// The published object of a message key (objectPer: message): `<prefix><key>`, like upstream's
    /// `put_object(Key=key)` with an optional prefix.
    pub fn message_object(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// One object to publish at commit: copied from one staged object, or assembled from several staged parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Publish {
    pub target: String,
    pub parts: Vec<String>,
}

/// Written by Phase 1 (`pending/<worker>.json`): the round is durable and voted commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Transaction id as text (for people).
    pub txn: String,
    /// Transaction id bytes, hex (exact, for matching).
    pub txn_hex: String,
    pub start: u64,
    pub end: u64,
    pub objects: Vec<Publish>,
}

/// Written by Phase 2 (`offsets/<worker>.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Offsets {
    pub txn: String,
    pub txn_hex: String,
    pub committed: u64,
}

/// Message mode: the objects a round publishes, in offset order, keeping only the last value of each key
/// (a later message with the same key overwrites an earlier one, as upstream's sequential `put_object` did).
pub fn dedupe_last_wins(staged: &[(String, String)]) -> Vec<Publish> {
    let mut last = std::collections::HashMap::with_capacity(staged.len());
    for (i, (target, _)) in staged.iter().enumerate() {
        last.insert(target.as_str(), i);
    }
    staged
        .iter()
        .enumerate()
        .filter(|(i, (target, _))| last.get(target.as_str()) == Some(i))
        .map(|(_, (target, staged))| Publish { target: target.clone(), parts: vec![staged.clone()] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sortable_and_separate_workers() {
        let l = Layout::new("out/");
        assert_eq!(l.staged_message("w1", 42), "out/_wallaroo/staging/w1/00000000000000000042");
        assert_eq!(l.staged_part("w1", 7), "out/_wallaroo/staging/w1/part-00000000000000000007");
        assert_eq!(l.pending("w1"), "out/_wallaroo/pending/w1.json");
        assert_eq!(l.offsets("w1"), "out/_wallaroo/offsets/w1.json");
        assert_eq!(l.checkpoint_object("w1", 0, 10), "out/w1/00000000000000000000-00000000000000000010");
        assert_eq!(l.message_object("k/1"), "out/k/1");
        assert!(l.checkpoint_object("w1", 9, 10) < l.checkpoint_object("w1", 10, 200));
    }

    #[test]
    fn worker_names_cannot_escape_or_collide() {
        assert_eq!(worker_segment("a/b"), "a%2Fb");
        assert_ne!(worker_segment("a/b"), worker_segment("a_b"));
        assert_eq!(worker_segment(".."), "%..");
        assert_eq!(worker_segment(""), "%");
    }

    #[test]
    fn later_values_of_a_key_win() {
        let staged = vec![
            ("k1".to_string(), "s0".to_string()),
            ("k2".to_string(), "s1".to_string()),
            ("k1".to_string(), "s2".to_string()),
        ];
        let p = dedupe_last_wins(&staged);
        assert_eq!(
            p,
            vec![
                Publish { target: "k2".into(), parts: vec!["s1".into()] },
                Publish { target: "k1".into(), parts: vec!["s2".into()] },
            ]
        );
    }
}
