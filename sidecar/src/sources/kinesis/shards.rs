//! Which shards may be read now. Kinesis keeps per-key order across resharding only if a child shard is read
//! after its parents are finished: a split has one parent, a merge two (parent and adjacent parent).
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parents: Vec<String>,
    /// `EndingSequenceNumber`: set once the shard is closed (split or merged away).
    pub ending: Option<String>,
}

#[derive(Debug, Default)]
pub struct ShardGraph {
    shards: BTreeMap<String, ShardInfo>,
    /// Shards present at the first listing (they start at `startFrom`; later ones at TRIM_HORIZON).
    initial: BTreeSet<String>,
    listed_once: bool,
    announced: BTreeSet<String>,
    finished: BTreeSet<String>,
}

impl ShardGraph {
    /// Merges a fresh ListShards answer. Shards that left the listing (past the retention period) are kept as
    /// known, so their children are not held back by them.
    pub fn update(&mut self, listed: Vec<ShardInfo>) {
        for s in listed {
            if !self.listed_once {
                self.initial.insert(s.id.clone());
            }
            self.shards.insert(s.id.clone(), s);
        }
        self.listed_once = true;
    }

    pub fn is_initial(&self, id: &str) -> bool {
        self.initial.contains(id)
    }

    pub fn get(&self, id: &str) -> Option<&ShardInfo> {
        self.shards.get(id)
    }

    /// A parent holds its children back until its stream finished. Parents that Kinesis no longer lists have
    /// expired: nothing of them is left to read.
    fn parent_done(&self, parent: &str) -> bool {
        self.finished.contains(parent) || !self.shards.contains_key(parent)
    }

    /// Shards not yet announced whose parents are all done, in shard id order; marks them announced.
    pub fn take_ready(&mut self) -> Vec<String> {
        let ready: Vec<String> = self
            .shards
            .values()
            .filter(|s| !self.announced.contains(&s.id) && s.parents.iter().all(|p| self.parent_done(p)))
            .map(|s| s.id.clone())
            .collect();
        self.announced.extend(ready.iter().cloned());
        ready
    }

    pub fn finish(&mut self, id: &str) {
        self.finished.insert(id.to_string());
    }

    pub fn is_finished(&self, id: &str) -> bool {
        self.finished.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            id: id.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            ending: closed.then(|| "99".to_string()),
        }
    }

    #[test]
    fn children_wait_for_their_parents() {
        let mut g = ShardGraph::default();
        g.update(vec![s("0", &[], true), s("1", &[], false), s("2", &["0"], false), s("3", &["0"], false)]);
        assert_eq!(g.take_ready(), vec!["0", "1"]);
        assert!(g.take_ready().is_empty());
        g.finish("0");
        assert_eq!(g.take_ready(), vec!["2", "3"]);
        assert!(g.is_initial("2"));
    }

    #[test]
    fn a_merge_waits_for_both_parents() {
        let mut g = ShardGraph::default();
        g.update(vec![s("a", &[], false), s("b", &[], false)]);
        assert_eq!(g.take_ready(), vec!["a", "b"]);
        g.update(vec![s("a", &[], true), s("b", &[], true), s("c", &["a", "b"], false)]);
        assert!(!g.is_initial("c"));
        g.finish("a");
        assert!(g.take_ready().is_empty());
        g.finish("b");
        assert_eq!(g.take_ready(), vec!["c"]);
    }

    #[test]
    fn expired_parents_do_not_block() {
        let mut g = ShardGraph::default();
        g.update(vec![s("5", &["gone"], false)]);
        assert_eq!(g.take_ready(), vec!["5"]);
    }
}
