//! Label selector semantics as the API server implements them for `metav1.LabelSelector`.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("matchExpressions[{index}]: {message}")]
pub struct SelectorError {
    pub index: usize,
    pub message: String,
}

/// Checks a selector for errors the API server would reject in a built-in resource (it cannot do so for a CRD).
pub fn check_selector(sel: &LabelSelector) -> Result<(), SelectorError> {
    for (index, e) in sel.match_expressions.iter().flatten().enumerate() {
        let n = e.values.as_ref().map_or(0, Vec::len);
        let fail = |message: &str| Err(SelectorError { index, message: message.to_string() });
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => return fail("operator In/NotIn needs at least one value"),
            "Exists" | "DoesNotExist" if n > 0 => {
                return fail("operator Exists/DoesNotExist takes no values");
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(SelectorError {
                    index,
                    message: format!("unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)"),
                });
            }
        }
    }
    Ok(())
}

/// Whether `labels` satisfy `sel`. An empty selector matches everything; an invalid one matches nothing, so a typo
/// never injects into more pods than intended.
pub fn matches(sel: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    matches_with(sel, |k| labels.and_then(|l| l.get(k)).map(String::as_str))
}

/// [`matches`] over any label lookup.
pub fn matches_with<'a>(sel: &LabelSelector, get: impl Fn(&str) -> Option<&'a str>) -> bool {
    if check_selector(sel).is_err() {
        return false;
    }
    let labels_ok = sel.match_labels.iter().flatten().all(|(k, v)| get(k) == Some(v.as_str()));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => get(&e.key).is_some_and(|v| values.iter().any(|x| x == v)),
                "NotIn" => get(&e.key).is_none_or(|v| !values.iter().any(|x| x == v)),
                "Exists" => get(&e.key).is_some(),
                "DoesNotExist" => get(&e.key).is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() { None } else { Some(values.iter().map(|s| s.to_string()).collect()) },
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "celsius")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["worker", "initializer"]),
                expr("canary", "DoesNotExist", &[]),
                expr("zone", "NotIn", &["b"]),
            ]),
        };
        assert!(matches(&sel, Some(&labels(&[("app", "celsius"), ("tier", "worker")]))));
        assert!(matches(&sel, Some(&labels(&[("app", "celsius"), ("tier", "worker"), ("zone", "a")]))));
        assert!(!matches(&sel, Some(&labels(&[("app", "celsius"), ("tier", "worker"), ("zone", "b")]))));
        assert!(!matches(&sel, Some(&labels(&[("app", "celsius"), ("tier", "web")]))));
        assert!(!matches(&sel, Some(&labels(&[("app", "celsius"), ("tier", "worker"), ("canary", "1")]))));
        assert!(!matches(&sel, Some(&labels(&[("app", "other"), ("tier", "worker")]))));
        assert!(!matches(&sel, None));
    }

    #[test]
    fn empty_selector_matches_all_and_invalid_matches_none() {
        assert!(matches(&LabelSelector::default(), None));
        let bad = LabelSelector { match_labels: None, match_expressions: Some(vec![expr("a", "Equals", &["x"])]) };
        assert!(!matches(&bad, Some(&labels(&[("a", "x")]))));
        assert!(check_selector(&bad).is_err());
        let no_values = LabelSelector { match_labels: None, match_expressions: Some(vec![expr("a", "In", &[])]) };
        assert!(check_selector(&no_values).is_err());
    }
}
