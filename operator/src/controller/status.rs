//! Status as a pure function of what the reconciler observed, so every condition rule is unit-testable.
use wallaroo_crds::{Condition, Connector, ConnectorStatus};

pub const READY: &str = "Ready";
pub const VALID: &str = "Valid";
pub const INJECTED: &str = "Injected";

/// What one reconcile found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Spec and Secret problems; empty when valid.
    pub problems: Vec<String>,
    /// True when a referenced Secret or key is missing (as opposed to a bad spec).
    pub missing_secret: bool,
    pub has_selector: bool,
    pub matched: i32,
    pub injected: i32,
    /// Pods that run an older spec of this Connector.
    pub outdated: i32,
    /// Pods without this Connector's sidecar: created before it, or admitted while the webhook was unavailable.
    pub missing: i32,
    /// Pods the webhook refused this spec (e.g. a volume the pod lacks), and the first such reason.
    pub skipped: i32,
    pub skip_reason: Option<String>,
    pub rollout_disabled: bool,
}

fn cond(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: None,
        observed_generation: None,
    }
}

/// Builds the status, keeping `lastTransitionTime` of conditions whose status did not change.
pub fn build(c: &Connector, o: &Observed, now: &str) -> ConnectorStatus {
    let valid = if o.problems.is_empty() {
        cond(VALID, true, "SpecValid", "spec and referenced Secrets are valid".into())
    } else {
        let reason = if o.missing_secret { "MissingSecret" } else { "InvalidSpec" };
        cond(VALID, false, reason, o.problems.join("; "))
    };
    let injected = if !o.has_selector {
        cond(INJECTED, false, "NoSelector", "spec.selector is not set, so no pod gets this connector".into())
    } else if o.matched == 0 {
        cond(INJECTED, false, "NoMatchingPods", "no pod labelled wallaroo.dev/inject=true matches spec.selector".into())
    } else if o.injected == o.matched {
        cond(
            INJECTED,
            true,
            "AllPodsInjected",
            format!("{} of {} matching pods run the current spec", o.injected, o.matched),
        )
    } else if o.skipped > 0 {
        let m = format!(
            "{} of {} matching pods run the current spec; {} could not take it: {}",
            o.injected,
            o.matched,
            o.skipped,
            o.skip_reason.as_deref().unwrap_or("see the InjectionSkipped events")
        );
        cond(INJECTED, false, "InjectionSkipped", m)
    } else if o.outdated + o.missing > 0 && !o.rollout_disabled {
        let m = format!("{} of {} matching pods run the current spec; rolling out", o.injected, o.matched);
        cond(INJECTED, false, "RolloutInProgress", m)
    } else if o.outdated > 0 {
        let m = format!(
            "{} of {} matching pods run the current spec; restartOnChange is false, restart the workloads to update",
            o.injected, o.matched
        );
        cond(INJECTED, false, "PodsOutdated", m)
    } else {
        let m = format!(
            "{} of {} matching pods have the sidecar; restartOnChange is false, so pods created before the Connector \
             get it when they restart",
            o.injected, o.matched
        );
        cond(INJECTED, false, "PodsWithoutSidecar", m)
    };
    let ready = match (&valid.status[..], &injected.status[..]) {
        ("True", "True") => cond(READY, true, "Ready", "every matching pod runs this connector".into()),
        ("False", _) => cond(READY, false, &valid.reason, valid.message.clone()),
        _ => cond(READY, false, &injected.reason, injected.message.clone()),
    };
    let previous = c.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = c.metadata.generation;
    let conditions = [ready, valid, injected]
        .into_iter()
        .map(|mut n| {
            let kept = previous.iter().find(|p| p.type_ == n.type_ && p.status == n.status);
            n.last_transition_time =
                kept.and_then(|p| p.last_transition_time.clone()).or_else(|| Some(now.to_string()));
            n.observed_generation = generation;
            n
        })
        .collect();
    ConnectorStatus {
        observed_generation: generation,
        conditions,
        direction: c.spec.direction().map(|d| d.to_string()),
        kind: c.spec.kind_name().map(str::to_string),
        matched_pods: o.matched,
        injected_pods: o.injected,
        spec_hash: Some(c.spec.spec_hash()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector() -> Connector {
        let mut c: Connector = serde_yaml::from_str(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {name: a, namespace: n, generation: 3}\n\
             spec: {connectorName: a, selector: {matchLabels: {app: a}}, worker: {port: 7000}, source: {udp: {port: 6000}}}",
        )
        .expect("connector");
        c.status = None;
        c
    }

    fn get<'a>(s: &'a ConnectorStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect("condition")
    }

    #[test]
    fn all_injected_is_ready() {
        let o = Observed { has_selector: true, matched: 2, injected: 2, ..Observed::default() };
        let s = build(&connector(), &o, "2026-01-01T00:00:00Z");
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!((s.matched_pods, s.injected_pods), (2, 2));
        assert_eq!(s.direction.as_deref(), Some("source"));
        assert_eq!(s.kind.as_deref(), Some("udp"));
        assert_eq!(get(&s, VALID).observed_generation, Some(3));
    }

    #[test]
    fn invalid_spec_wins_over_everything() {
        let o = Observed {
            problems: vec!["spec.worker.port: required".into()],
            has_selector: true,
            matched: 1,
            injected: 1,
            ..Observed::default()
        };
        let s = build(&connector(), &o, "t");
        assert_eq!(get(&s, READY).reason, "InvalidSpec");
        assert!(get(&s, READY).message.contains("spec.worker.port"));
        let o = Observed { problems: vec!["Secret x not found".into()], missing_secret: true, ..o };
        assert_eq!(get(&build(&connector(), &o, "t"), VALID).reason, "MissingSecret");
    }

    #[test]
    fn injection_reasons() {
        let base = Observed { has_selector: true, ..Observed::default() };
        let reason = |o: Observed| get(&build(&connector(), &o, "t"), INJECTED).reason.clone();
        assert_eq!(reason(Observed { has_selector: false, ..base.clone() }), "NoSelector");
        assert_eq!(reason(base.clone()), "NoMatchingPods");
        assert_eq!(reason(Observed { matched: 3, injected: 1, outdated: 2, ..base.clone() }), "RolloutInProgress");
        assert_eq!(
            reason(Observed { matched: 3, injected: 1, outdated: 2, rollout_disabled: true, ..base.clone() }),
            "PodsOutdated"
        );
        assert_eq!(reason(Observed { matched: 3, injected: 1, missing: 2, ..base.clone() }), "RolloutInProgress");
        assert_eq!(
            reason(Observed { matched: 3, injected: 1, missing: 2, rollout_disabled: true, ..base.clone() }),
            "PodsWithoutSidecar"
        );
        let skipped = Observed {
            matched: 3,
            injected: 1,
            missing: 1,
            skipped: 1,
            skip_reason: Some("spec.volumeMounts[0] names volume \"data\"".into()),
            ..base
        };
        let s = build(&connector(), &skipped, "t");
        assert_eq!(get(&s, INJECTED).reason, "InjectionSkipped");
        assert!(get(&s, READY).message.contains("1 could not take it: spec.volumeMounts[0]"), "{:?}", get(&s, READY));
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let mut c = connector();
        let o = Observed { has_selector: true, matched: 1, injected: 1, ..Observed::default() };
        c.status = Some(build(&c, &o, "first"));
        let same = build(&c, &o, "second");
        assert_eq!(get(&same, READY).last_transition_time.as_deref(), Some("first"));
        let worse = build(&c, &Observed { injected: 0, ..o }, "third");
        assert_eq!(get(&worse, READY).last_transition_time.as_deref(), Some("third"));
        assert_eq!(get(&worse, VALID).last_transition_time.as_deref(), Some("first"));
    }
}
