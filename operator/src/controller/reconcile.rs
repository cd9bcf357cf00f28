//! One reconcile of one Connector: validate, count pods, roll outdated workloads, write status, publish events.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use wallaroo_crds::Connector;

use super::pods::PodEntry;
use super::status::{self, Observed, VALID};
use super::{Context, Error, rollout};
use crate::inject::names::{INJECT_LABEL, template_annotation_key};
use crate::inject::selector;

pub const FINALIZER: &str = "wallaroo.dev/rollout";
/// Template annotation value written when a Connector is deleted, so its sidecar leaves the pods.
pub const REMOVED: &str = "removed";
/// Status also depends on things that send no event (a Secret created later), so look again now and then.
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(c: Arc<Connector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = c.namespace().ok_or(Error::NoNamespace)?;
    if !ctx.watches(&ns) {
        return Ok(Action::await_change());
    }
    // Until the pod list is complete, "no matching pods" would be a guess written into the status.
    if !ctx.pods.is_ready() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let _timer = ctx.metrics.reconcile_duration_seconds.start_timer();
    ctx.metrics.reconcile_total.inc();
    let api: Api<Connector> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, c, |event| async {
        match event {
            Finalizer::Apply(c) => apply(c, &ctx, &ns).await,
            Finalizer::Cleanup(c) => cleanup(c, &ctx, &ns).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Pods of the namespace that opted in and match the Connector's selector, by name.
fn matched_pods(c: &Connector, ctx: &Context, ns: &str) -> Vec<Arc<PodEntry>> {
    let Some(sel) = c.spec.selector.as_ref() else {
        return Vec::new();
    };
    ctx.pods
        .in_namespace(ns)
        .into_iter()
        .filter(|p| !p.deleting && p.label(INJECT_LABEL) == Some("true") && p.matches(sel))
        .collect()
}

/// Missing Secrets and keys, one message each. Other API errors abort the reconcile (and retry).
async fn check_secrets(c: &Connector, ctx: &Context, ns: &str) -> Result<Vec<String>, Error> {
    if !ctx.validate_secrets {
        return Ok(Vec::new());
    }
    let mut by_secret: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in c.spec.secret_refs() {
        by_secret.entry(r.name).or_default().push(r.key);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut problems = Vec::new();
    for (name, keys) in by_secret {
        match api.get_opt(&name).await.map_err(Error::Kube)? {
            None => problems.push(format!("Secret {name} not found in namespace {ns}")),
            Some(s) => {
                for key in keys {
                    let present = s.data.as_ref().is_some_and(|d| d.contains_key(&key))
                        || s.string_data.as_ref().is_some_and(|d| d.contains_key(&key));
                    if !present {
                        problems.push(format!("Secret {name} has no key {key}"));
                    }
                }
            }
        }
    }
    Ok(problems)
}

async fn publish(ctx: &Context, c: &Connector, type_: EventType, reason: &str, action: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    // Events are informational; failing to write one must not fail or retry the reconcile.
    if let Err(e) = ctx.recorder.publish(&ev, &c.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "cannot publish event");
    }
}

/// Rolls the owners of `pods`, setting the Connector's template annotation to `value`.
async fn roll_owners(c: &Connector, ctx: &Context, ns: &str, pods: &[Arc<PodEntry>], value: &str) -> Result<(), Error> {
    let name = c.name_any();
    let key = template_annotation_key(&name);
    let mut owners = Vec::new();
    let mut bare = Vec::new();
    for p in pods {
        match rollout::owner(&ctx.client, ns, p.owner.as_ref()).await.map_err(Error::Kube)? {
            Some(w) => owners.push(w),
            None => bare.push(p.name.to_string()),
        }
    }
    for w in rollout::distinct(owners) {
        if rollout::roll(&ctx.client, ns, &w, &key, value).await.map_err(Error::Kube)? {
            ctx.metrics.rollouts_total.inc();
            tracing::info!(connector = name, namespace = ns, workload = %w, "rollout triggered");
            let note = format!("restarting {w} so its pods run Connector {name} ({value})");
            publish(ctx, c, EventType::Normal, "RolloutTriggered", "Rollout", note).await;
        }
    }
    if !bare.is_empty() {
        let note = format!("pods without a rollable owner keep the old sidecar until deleted: {}", bare.join(", "));
        publish(ctx, c, EventType::Warning, "PodsNotRolled", "Rollout", note).await;
    }
    Ok(())
}

async fn apply(c: Arc<Connector>, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let name = c.name_any();
    let mut obs = Observed { has_selector: c.spec.selector.is_some(), ..Observed::default() };
    if let Err(errors) = c.spec.validate() {
        obs.problems.extend(errors.0.iter().map(ToString::to_string));
    }
    if let Some(Err(e)) = c.spec.selector.as_ref().map(selector::check_selector) {
        obs.problems.push(format!("spec.selector.{e}"));
    }
    let secret_problems = check_secrets(&c, ctx, ns).await?;
    obs.missing_secret = !secret_problems.is_empty();
    obs.problems.extend(secret_problems);

    let hash = c.spec.spec_hash();
    // Pods to roll: those on an older spec, and those created before this Connector existed (or admitted while the
    // webhook was unavailable). Pods the webhook refused for this very spec are not rolled: they would be refused
    // again; their recorded reason goes into the status instead.
    let mut to_roll = Vec::new();
    let pods = matched_pods(&c, ctx, ns);
    obs.matched = i32::try_from(pods.len()).unwrap_or(i32::MAX);
    for p in &pods {
        match p.injected(&name) {
            Some(h) if h == hash => obs.injected += 1,
            Some(_) => {
                obs.outdated += 1;
                to_roll.push(p.clone());
            }
            None => match p.skipped(&name) {
                Some(skip) if skip.spec_hash == hash => {
                    obs.skipped += 1;
                    obs.skip_reason.get_or_insert(skip.reason);
                }
                _ => {
                    obs.missing += 1;
                    to_roll.push(p.clone());
                }
            },
        }
    }
    obs.rollout_disabled = c.spec.restart_on_change == Some(false);

    // Rolling into a spec the webhook would refuse to inject would silently drop the sidecar: wait for a fix.
    if !to_roll.is_empty() && !obs.rollout_disabled && obs.problems.is_empty() {
        roll_owners(&c, ctx, ns, &to_roll, &hash).await?;
    }

    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let new_status = status::build(&c, &obs, &now);
    if c.status.as_ref() != Some(&new_status) {
        let was_valid =
            c.status.as_ref().and_then(|s| s.conditions.iter().find(|x| x.type_ == VALID)).map(|x| x.status == "True");
        let api: Api<Connector> = Api::namespaced(ctx.client.clone(), ns);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": new_status })))
            .await
            .map_err(Error::Kube)?;
        if !obs.problems.is_empty() && was_valid != Some(false) {
            publish(ctx, &c, EventType::Warning, "InvalidConnector", "Validate", obs.problems.join("; ")).await;
        }
    }
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(c: Arc<Connector>, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let name = c.name_any();
    if c.spec.restart_on_change != Some(false) {
        let running: Vec<_> =
            ctx.pods.in_namespace(ns).into_iter().filter(|p| !p.deleting && p.injected(&name).is_some()).collect();
        if !running.is_empty() {
            roll_owners(&c, ctx, ns, &running, REMOVED).await?;
        }
    }
    tracing::info!(connector = name, namespace = ns, "Connector deleted");
    Ok(Action::await_change())
}
