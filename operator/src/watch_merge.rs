//! One watch per namespace, merged into the event stream of a single watch, so that an operator restricted to a
//! few namespaces needs namespaced permissions only (no cluster-wide list/watch).
//!
//! kube's reflector expects one `Init`..`InitDone` cycle to describe the whole store; per-namespace watches each
//! produce their own, and passed through as they are the second namespace's cycle would wipe the first's objects.
//! So the merged stream reports one `Init`..`InitDone` once every namespace has listed, and turns a later relist of
//! one namespace into `Apply` events plus [`Merged::Gone`] for what the relist no longer contains.
use std::collections::{HashMap, HashSet};

use futures::{Stream, StreamExt, stream};
use kube::Resource;
use kube::runtime::watcher::{self, Event};

/// An event of the merged stream.
#[derive(Debug)]
pub enum Merged<K> {
    Event(Event<K>),
    /// Deleted while its namespace was being relisted (the watch saw no Delete for it).
    Gone {
        namespace: String,
        name: String,
    },
}

struct Merger<K> {
    namespaces: usize,
    /// Names per namespace as last listed or watched, to find what a relist drops.
    names: HashMap<String, HashSet<String>>,
    relisting: HashMap<String, HashSet<String>>,
    /// Objects of the first lists, held until every namespace has listed; `None` afterwards.
    initial: Option<HashMap<String, HashMap<String, K>>>,
}

fn name_of<K: Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

impl<K: Resource + Clone> Merger<K> {
    fn new(namespaces: usize) -> Self {
        Self { namespaces, names: HashMap::new(), relisting: HashMap::new(), initial: Some(HashMap::new()) }
    }

    fn on(&mut self, ns: &str, ev: Event<K>) -> Vec<Merged<K>> {
        match ev {
            Event::Init => {
                self.relisting.insert(ns.to_string(), HashSet::new());
                if let Some(initial) = self.initial.as_mut() {
                    initial.insert(ns.to_string(), HashMap::new());
                }
                Vec::new()
            }
            Event::InitApply(o) => {
                self.relisting.entry(ns.to_string()).or_default().insert(name_of(&o));
                self.apply(ns, o)
            }
            Event::Apply(o) => {
                self.names.entry(ns.to_string()).or_default().insert(name_of(&o));
                self.apply(ns, o)
            }
            Event::Delete(o) => {
                let name = name_of(&o);
                if let Some(names) = self.names.get_mut(ns) {
                    names.remove(&name);
                }
                match self.initial.as_mut() {
                    Some(initial) => {
                        initial.entry(ns.to_string()).or_default().remove(&name);
                        Vec::new()
                    }
                    None => vec![Merged::Event(Event::Delete(o))],
                }
            }
            Event::InitDone => {
                let listed = self.relisting.remove(ns).unwrap_or_default();
                let before = self.names.insert(ns.to_string(), listed.clone()).unwrap_or_default();
                match self.initial.as_mut() {
                    Some(initial) => {
                        initial.entry(ns.to_string()).or_default();
                        let complete = initial.len() == self.namespaces && self.relisting.is_empty();
                        if !complete {
                            return Vec::new();
                        }
                        let objects = self.initial.take().unwrap_or_default();
                        let mut out = vec![Merged::Event(Event::Init)];
                        out.extend(
                            objects
                                .into_values()
                                .flat_map(HashMap::into_values)
                                .map(|o| Merged::Event(Event::InitApply(o))),
                        );
                        out.push(Merged::Event(Event::InitDone));
                        out
                    }
                    None => before
                        .difference(&listed)
                        .map(|name| Merged::Gone { namespace: ns.to_string(), name: name.clone() })
                        .collect(),
                }
            }
        }
    }

    fn apply(&mut self, ns: &str, o: K) -> Vec<Merged<K>> {
        match self.initial.as_mut() {
            Some(initial) => {
                initial.entry(ns.to_string()).or_default().insert(name_of(&o), o);
                Vec::new()
            }
            None => vec![Merged::Event(Event::Apply(o))],
        }
    }
}

/// Merges one watcher stream per namespace (namespace, stream) into one.
pub fn merge<K, S>(streams: Vec<(String, S)>) -> impl Stream<Item = Result<Merged<K>, watcher::Error>> + Send
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let mut merger = Merger::new(streams.len());
    let tagged = stream::select_all(streams.into_iter().map(|(ns, s)| s.map(move |r| (ns.clone(), r)).boxed()));
    tagged.flat_map(move |(ns, r)| {
        let out: Vec<Result<Merged<K>, watcher::Error>> = match r {
            Ok(ev) => merger.on(&ns, ev).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        stream::iter(out)
    })
}

/// Watches `K` in every namespace (`None`), one namespace, or several through per-namespace watches merged.
pub fn watch_namespaces<K>(
    client: &kube::Client,
    namespaces: &Option<std::collections::BTreeSet<String>>,
    config: watcher::Config,
) -> futures::stream::BoxStream<'static, Result<Merged<K>, watcher::Error>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    use kube::runtime::WatchStreamExt;
    match namespaces.as_ref().filter(|set| set.len() > 1) {
        Some(set) => merge(
            set.iter()
                .map(|ns| {
                    let api = kube::Api::<K>::namespaced(client.clone(), ns);
                    (ns.clone(), watcher::watcher(api, config.clone()).default_backoff().boxed())
                })
                .collect(),
        )
        .boxed(),
        None => {
            let api: kube::Api<K> = match namespaces.as_ref().and_then(|s| s.iter().next()) {
                Some(ns) => kube::Api::namespaced(client.clone(), ns),
                None => kube::Api::all(client.clone()),
            };
            watcher::watcher(api, config).default_backoff().map(|r| r.map(Merged::Event)).boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn cm(ns: &str, name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
            ..ConfigMap::default()
        }
    }

    fn describe(out: &[Merged<ConfigMap>]) -> Vec<String> {
        let id = |o: &ConfigMap| format!("{}/{}", o.metadata.namespace.clone().unwrap_or_default(), name_of(o));
        let mut v: Vec<String> = out
            .iter()
            .map(|m| match m {
                Merged::Event(Event::Init) => "Init".into(),
                Merged::Event(Event::InitApply(o)) => format!("InitApply {}", id(o)),
                Merged::Event(Event::InitDone) => "InitDone".into(),
                Merged::Event(Event::Apply(o)) => format!("Apply {}", id(o)),
                Merged::Event(Event::Delete(o)) => format!("Delete {}", id(o)),
                Merged::Gone { namespace, name } => format!("Gone {namespace}/{name}"),
            })
            .collect();
        // InitApply order across namespaces is not meaningful.
        v.sort_by_key(|s| {
            (
                if s == "Init" {
                    0
                } else if s == "InitDone" {
                    2
                } else {
                    1
                },
                s.clone(),
            )
        });
        v
    }

    #[test]
    fn one_init_cycle_once_every_namespace_listed_then_relists_become_applies_and_gones() {
        let mut m = Merger::new(2);
        assert!(m.on("a", Event::Init).is_empty());
        assert!(m.on("a", Event::InitApply(cm("a", "x"))).is_empty());
        assert!(m.on("a", Event::InitApply(cm("a", "y"))).is_empty());
        assert!(m.on("a", Event::InitDone).is_empty(), "b has not listed yet");
        // Changes in a finished namespace while another still lists are folded into the first lists.
        assert!(m.on("a", Event::Delete(cm("a", "y"))).is_empty());
        assert!(m.on("a", Event::Apply(cm("a", "z"))).is_empty());
        assert!(m.on("b", Event::Init).is_empty());
        assert!(m.on("b", Event::InitApply(cm("b", "x"))).is_empty());
        let out = m.on("b", Event::InitDone);
        assert_eq!(describe(&out), ["Init", "InitApply a/x", "InitApply a/z", "InitApply b/x", "InitDone"]);

        assert_eq!(describe(&m.on("b", Event::Apply(cm("b", "w")))), ["Apply b/w"]);
        assert_eq!(describe(&m.on("b", Event::Delete(cm("b", "w")))), ["Delete b/w"]);
        // A relist of a (after a desync) in which x is gone.
        assert!(m.on("a", Event::Init).is_empty());
        assert_eq!(describe(&m.on("a", Event::InitApply(cm("a", "z")))), ["Apply a/z"]);
        assert_eq!(describe(&m.on("a", Event::InitDone)), ["Gone a/x"]);
    }

    #[test]
    fn an_empty_namespace_still_completes_the_first_list() {
        let mut m: Merger<ConfigMap> = Merger::new(2);
        m.on("a", Event::Init);
        m.on("a", Event::InitDone);
        m.on("b", Event::Init);
        assert_eq!(describe(&m.on("b", Event::InitDone)), ["Init", "InitDone"]);
    }
}
