use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a secret value comes from. In Kubernetes the operator turns a `secretKeyRef` into an environment
/// variable of the sidecar container (named by [`secret_env_var`]), so the sidecar needs no API access; outside
/// Kubernetes, `env` names a variable directly.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
    /// Name of an environment variable holding the value (for running without Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeySelector {
    /// Name of a Secret in the Connector's namespace.
    pub name: String,
    /// Key within that Secret.
    pub key: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("{field}: environment variable {var} is not set (it should hold {what})")]
    Missing { field: String, var: String, what: String },
    #[error("{field}: set exactly one of secretKeyRef or env")]
    Ambiguous { field: String },
}

/// The environment variable that carries Secret `name`, key `key` into a sidecar container.
/// Stable and collision-resistant: both parts are upper-cased, non-alphanumerics become `_`.
pub fn secret_env_var(name: &str, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
    };
    format!("WALLAROO_SECRET_{}__{}", clean(name), clean(key))
}

impl SecretValue {
    pub fn from_env(var: &str) -> Self {
        Self { secret_key_ref: None, env: Some(var.to_string()) }
    }

    /// The environment variable the value is read from.
    pub fn env_var(&self) -> Option<String> {
        match (&self.secret_key_ref, &self.env) {
            (Some(r), None) => Some(secret_env_var(&r.name, &r.key)),
            (None, Some(v)) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn check(&self, field: &str) -> Result<(), SecretError> {
        match self.env_var() {
            Some(_) => Ok(()),
            None => Err(SecretError::Ambiguous { field: field.to_string() }),
        }
    }

    /// Reads the value from the process environment.
    pub fn resolve(&self, field: &str) -> Result<String, SecretError> {
        let var = self.env_var().ok_or_else(|| SecretError::Ambiguous { field: field.to_string() })?;
        std::env::var(&var).map_err(|_| SecretError::Missing {
            field: field.to_string(),
            what: match &self.secret_key_ref {
                Some(r) => format!("key {:?} of Secret {:?}", r.key, r.name),
                None => "the secret value".to_string(),
            },
            var,
        })
    }
}

/// Resolves an optional inline value or an optional secret reference; the secret wins when both are set
/// (validation rejects that combination, this is only for robustness).
pub(crate) fn inline_or_secret(
    inline: &Option<String>,
    secret: &Option<SecretValue>,
    field: &str,
) -> Result<Option<String>, SecretError> {
    match (inline, secret) {
        (_, Some(s)) => s.resolve(&format!("{field}From")).map(Some),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, None) => Ok(None),
    }
}
