//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can run while one reconciles.
//!
//! Expiry is judged by local observation (how long the Lease record has been unchanged on our clock), as client-go
//! does, so clock skew between nodes cannot make two replicas lead at once. Every write carries the
//! resourceVersion that was read, so a lost race is a Conflict, never two holders.
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The record we last saw (holder, renewTime, resourceVersion) and when it last changed, by our clock.
    observed: Option<(String, Instant)>,
}

fn fingerprint(l: &Lease) -> String {
    let s = l.spec.as_ref();
    format!(
        "{:?}|{:?}|{:?}",
        s.and_then(|s| s.holder_identity.as_ref()),
        s.and_then(|s| s.renew_time.as_ref()).map(|t| t.0.to_string()),
        l.metadata.resource_version
    )
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self { api: Api::namespaced(client, &cfg.namespace), cfg, observed: None }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to acquire or renew. `Ok(true)` means we hold the lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let print = fingerprint(&lease);
        let now = Instant::now();
        let changed_at = match &self.observed {
            Some((seen, at)) if *seen == print => *at,
            _ => now,
        };
        self.observed = Some((print, changed_at));
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.cfg.identity.as_str());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.cfg.lease_duration, Duration::from_secs);
        let expired = holder.is_none() || now.duration_since(changed_at) > duration;
        if !ours && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        lease.spec = Some(self.spec(transitions, if ours { spec.acquire_time } else { None }));
        lease.metadata.managed_fields = None;
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up so the other replica takes over at once instead of after the lease duration.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lease.metadata.managed_fields = None;
        self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await.map(|_| ())
    }

    /// Campaigns until `shutdown`, publishing leadership on `tx`. Leadership is dropped when renewals keep failing
    /// for `renew_deadline`, before the lease can expire for the other replica.
    pub async fn run(mut self, tx: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut last_renew: Option<Instant> = None;
        loop {
            let leading = match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    last_renew.is_some_and(|t| t.elapsed() < self.cfg.renew_deadline)
                }
            };
            if !leading {
                last_renew = None;
            }
            if *tx.borrow() != leading {
                tracing::info!(identity = self.cfg.identity, leading, "leadership changed");
                let _ = tx.send(leading);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
        if *tx.borrow() {
            let _ = tx.send(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "cannot release lease");
            }
        }
    }
}
