//! The process's one cache of Connectors. The webhook reads it on every replica; the leader's controller is fed
//! from the same watch instead of opening a second one, so a leader holds each Connector once (with 1,000
//! Connectors that is several MiB saved, see docs/operator-benchmarks.md).
use std::collections::VecDeque;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use tokio::sync::broadcast;
use wallaroo_crds::Connector;

use crate::watch_merge::{Merged, watch_namespaces};

/// Changes kept for a subscriber that is busy; one that falls further behind is sent every Connector again.
const CHANGE_BUFFER: usize = 64;

#[derive(Clone)]
pub struct ConnectorCache {
    store: Store<Connector>,
    changes: broadcast::Sender<Arc<Connector>>,
}

/// Drops managedFields and annotations from cached Connectors; neither injection nor reconciliation reads them, and
/// `kubectl apply` stores the whole object again in an annotation.
pub fn slim_connector_metadata(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    m.annotations = None;
}

impl ConnectorCache {
    /// Starts watching Connectors in `namespaces` (all when `None`); the returned future runs the watch and must be
    /// polled (spawned) for the cache to fill.
    pub fn watch(
        client: &kube::Client,
        namespaces: &Option<std::collections::BTreeSet<String>>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (store, mut writer) = reflector::store();
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let cache = Self { store: store.clone(), changes: changes.clone() };
        let events = watch_namespaces::<Connector>(client, namespaces, watcher::Config::default().any_semantic());
        let run = events.for_each(move |res| {
            match res {
                Ok(Merged::Event(ev)) => {
                    let ev = ev.modify(|c| slim_connector_metadata(&mut c.metadata));
                    writer.apply_watcher_event(&ev);
                    if let Event::Apply(c) | Event::InitApply(c) = ev {
                        // Send the store's own Arc, not another copy; objects of the initial list are not in the
                        // store until the list completes, so those go out as they came.
                        let shared = store.get(&ObjectRef::from_obj(&c)).unwrap_or_else(|| Arc::new(c));
                        // No subscriber (not leading) is fine: nothing is kept then.
                        let _ = changes.send(shared);
                    }
                }
                Ok(Merged::Gone { namespace, name }) => {
                    if let Some(c) = store.get(&ObjectRef::new(&name).within(&namespace)) {
                        writer.apply_watcher_event(&Event::Delete((*c).clone()));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Connector watch failed; retrying"),
            }
            futures::future::ready(())
        });
        (cache, run)
    }

    pub fn store(&self) -> Store<Connector> {
        self.store.clone()
    }

    /// Every cached Connector, then every change. A subscriber that falls more than the buffer behind is sent
    /// every Connector again, so it can lag but never miss one.
    pub fn triggers(&self) -> impl Stream<Item = Arc<Connector>> + Send + 'static {
        // Subscribe before the snapshot so that nothing falls between the two (duplicates are harmless).
        let rx = self.changes.subscribe();
        let store = self.store.clone();
        let pending: VecDeque<Arc<Connector>> = store.state().into();
        futures::stream::unfold((rx, store, pending), |(mut rx, store, mut pending)| async move {
            loop {
                if let Some(c) = pending.pop_front() {
                    return Some((c, (rx, store, pending)));
                }
                match rx.recv().await {
                    Ok(c) => return Some((c, (rx, store, pending))),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "Connector changes overflowed; resending every Connector");
                        pending = store.state().into();
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    #[cfg(test)]
    pub(crate) fn from_parts(store: Store<Connector>) -> (Self, broadcast::Sender<Arc<Connector>>) {
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        (Self { store, changes: changes.clone() }, changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::tests::test_connectors;

    fn names(cs: &[Arc<Connector>]) -> Vec<String> {
        cs.iter().map(|c| c.metadata.name.clone().unwrap_or_default()).collect()
    }

    #[tokio::test]
    async fn subscriber_gets_the_snapshot_then_changes_and_recovers_from_lag() {
        let (store, mut writer) = reflector::store::<Connector>();
        let all = test_connectors();
        writer.apply_watcher_event(&Event::Apply(all[0].clone()));
        let (cache, tx) = ConnectorCache::from_parts(store);
        let mut triggers = Box::pin(cache.triggers());
        let first = triggers.next().await.expect("snapshot");
        assert_eq!(names(&[first]), ["celsius-feed"]);

        tx.send(Arc::new(all[1].clone())).expect("subscribed");
        assert_eq!(names(&[triggers.next().await.expect("change")]), ["celsius-out"]);

        // Overflow the buffer: the subscriber is sent the whole cache instead of the lost changes.
        writer.apply_watcher_event(&Event::Apply(all[2].clone()));
        for _ in 0..CHANGE_BUFFER + 5 {
            tx.send(Arc::new(all[1].clone())).expect("subscribed");
        }
        let mut got = Vec::new();
        for _ in 0..CHANGE_BUFFER {
            got.push(triggers.next().await.expect("after lag"));
        }
        let mut seen = names(&got);
        seen.sort();
        seen.dedup();
        assert_eq!(seen, ["celsius-feed", "celsius-out", "orders.kafka"]);
    }
}
