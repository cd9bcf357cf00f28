//! The leader's index of opted-in pods. It keeps per pod only what reconciles read (labels, the injection records,
//! the controlling owner) in compact form: with 5,000 pods a cache of `ObjectMeta`s cost about 16 MiB, this about a
//! fifth of it (docs/operator-benchmarks.md).
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

use crate::inject::names::SKIPPED_ANNOTATION;
use crate::inject::{Skip, injected_annotation, parse_skips, selector};
use crate::watch_merge::Merged;

type Pairs = Box<[(Box<str>, Box<str>)]>;

fn pairs<'a>(it: impl IntoIterator<Item = (&'a String, &'a String)>) -> Pairs {
    it.into_iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect()
}

fn lookup<'a>(p: &'a Pairs, key: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
}

/// The controlling owner of a pod, as rollouts follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub api_version: Box<str>,
    pub kind: Box<str>,
    pub name: Box<str>,
}

/// One pod as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub name: Box<str>,
    labels: Pairs,
    /// `{connector: spec hash}` from the `wallaroo.dev/injected` annotation.
    injected: Pairs,
    /// The raw `wallaroo.dev/skipped` annotation; rare, so parsed only when read.
    skipped: Option<Box<str>>,
    pub owner: Option<Owner>,
    pub deleting: bool,
}

impl PodEntry {
    pub fn from_meta(m: &ObjectMeta) -> Self {
        Self {
            name: m.name.as_deref().unwrap_or_default().into(),
            labels: pairs(m.labels.iter().flatten()),
            injected: pairs(&injected_annotation(m)),
            skipped: m.annotations.as_ref().and_then(|a| a.get(SKIPPED_ANNOTATION)).map(|v| v.as_str().into()),
            owner: m.owner_references.iter().flatten().find(|r| r.controller == Some(true)).map(|r| Owner {
                api_version: r.api_version.as_str().into(),
                kind: r.kind.as_str().into(),
                name: r.name.as_str().into(),
            }),
            deleting: m.deletion_timestamp.is_some(),
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        lookup(&self.labels, key)
    }

    pub fn matches(&self, sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> bool {
        selector::matches_with(sel, |k| self.label(k))
    }

    /// The spec hash of `connector` this pod runs, if it runs it.
    pub fn injected(&self, connector: &str) -> Option<&str> {
        lookup(&self.injected, connector)
    }

    /// Why this pod did not take `connector`, if it recorded a refusal.
    pub fn skipped(&self, connector: &str) -> Option<Skip> {
        parse_skips(self.skipped.as_deref()?).remove(connector)
    }
}

type Namespaces = HashMap<Box<str>, HashMap<Box<str>, Arc<PodEntry>>>;

#[derive(Default)]
struct State {
    live: Namespaces,
    /// Filled during a (re)list; replaces `live` when the list completes, as kube's reflector does.
    building: Namespaces,
    ready: bool,
}

/// Opted-in pods by namespace, fed by the controller's pod watch.
#[derive(Default, Clone)]
pub struct PodIndex {
    state: Arc<RwLock<State>>,
}

fn key(m: &ObjectMeta) -> Option<(&str, &str)> {
    Some((m.namespace.as_deref()?, m.name.as_deref()?))
}

fn insert(map: &mut Namespaces, m: &ObjectMeta) {
    if let Some((ns, name)) = key(m) {
        map.entry(ns.into()).or_default().insert(name.into(), Arc::new(PodEntry::from_meta(m)));
    }
}

fn remove(map: &mut Namespaces, ns: &str, name: &str) {
    if let Some(pods) = map.get_mut(ns) {
        pods.remove(name);
        if pods.is_empty() {
            map.remove(ns);
        }
    }
}

impl PodIndex {
    // A poisoned lock only means another thread panicked mid-update; the map itself is still usable.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn apply(&self, event: &Event<PartialObjectMeta<Pod>>) {
        let mut s = self.write();
        match event {
            Event::Apply(p) => insert(&mut s.live, &p.metadata),
            Event::Delete(p) => {
                if let Some((ns, name)) = key(&p.metadata) {
                    remove(&mut s.live, ns, name);
                }
            }
            Event::Init => s.building = Namespaces::new(),
            Event::InitApply(p) => insert(&mut s.building, &p.metadata),
            Event::InitDone => {
                s.live = std::mem::take(&mut s.building);
                s.ready = true;
            }
        }
    }

    /// [`apply`](Self::apply) for the merged per-namespace watch.
    pub fn apply_merged(&self, m: &Merged<PartialObjectMeta<Pod>>) {
        match m {
            Merged::Event(ev) => self.apply(ev),
            Merged::Gone { namespace, name } => remove(&mut self.write().live, namespace, name),
        }
    }

    /// Whether the first list completed: before that, "no pods" means "not known yet".
    pub fn is_ready(&self) -> bool {
        self.read().ready
    }

    /// Pods of one namespace, sorted by name.
    pub fn in_namespace(&self, ns: &str) -> Vec<Arc<PodEntry>> {
        let mut out: Vec<Arc<PodEntry>> =
            self.read().live.get(ns).map(|m| m.values().cloned().collect()).unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::inject::names::INJECTED_ANNOTATION;

    fn meta(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> PartialObjectMeta<Pod> {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "apps", "labels": labels, "annotations": annotations, "uid": "u",
        "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "x"},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs-1", "uid": "y", "controller": true}
        ]}}))
        .expect("pod")
    }

    #[test]
    fn keeps_what_reconciles_read() {
        let skip = json!({"c": {"specHash": "h", "reason": "no volume"}}).to_string();
        let m = meta(
            "p",
            json!({"app": "a", "wallaroo.dev/inject": "true"}),
            json!({INJECTED_ANNOTATION: "{\"a\":\"1\",\"b\":\"2\"}", SKIPPED_ANNOTATION: skip, "other": "x"}),
        );
        let e = PodEntry::from_meta(&m.metadata);
        assert_eq!((e.label("app"), e.label("tier")), (Some("a"), None));
        assert_eq!((e.injected("a"), e.injected("b"), e.injected("c")), (Some("1"), Some("2"), None));
        assert_eq!(e.skipped("c").map(|s| s.reason), Some("no volume".to_string()));
        assert_eq!(e.skipped("a"), None);
        let owner = e.owner.as_ref().expect("controlling owner");
        assert_eq!((&*owner.kind, &*owner.name), ("ReplicaSet", "rs-1"));
        assert!(!e.deleting);
    }

    #[test]
    fn follows_watch_events_and_relists_atomically() {
        let idx = PodIndex::default();
        assert!(!idx.is_ready());
        let a = meta("a", json!({"app": "x"}), json!({}));
        let b = meta("b", json!({"app": "x"}), json!({}));
        idx.apply(&Event::Init);
        idx.apply(&Event::InitApply(b.clone()));
        idx.apply(&Event::InitApply(a.clone()));
        assert!(idx.in_namespace("apps").is_empty(), "a list in progress is not visible");
        idx.apply(&Event::InitDone);
        assert!(idx.is_ready());
        let names: Vec<String> = idx.in_namespace("apps").iter().map(|p| p.name.to_string()).collect();
        assert_eq!(names, ["a", "b"]);
        idx.apply(&Event::Delete(a));
        idx.apply(&Event::Apply(meta("b", json!({"app": "y"}), json!({}))));
        let pods = idx.in_namespace("apps");
        assert_eq!((pods.len(), pods[0].label("app")), (1, Some("y")));
        // A relist drops what is gone.
        idx.apply(&Event::Init);
        idx.apply(&Event::InitDone);
        assert!(idx.in_namespace("apps").is_empty());
        assert!(idx.in_namespace("other").is_empty());
    }
}
