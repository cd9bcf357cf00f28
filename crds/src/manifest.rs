//! Reading Connector manifests: the same YAML a user applies to Kubernetes.
use std::path::Path;

use serde::Deserialize;

use crate::spec::Connector;
use crate::validate::ValidationErrors;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}, document {doc}: {source}")]
    Yaml { origin: String, doc: usize, source: serde_yaml::Error },
    #[error("{origin}, document {doc}: apiVersion/kind is {found:?}; expected wallaroo.dev/v1alpha1 Connector")]
    NotAConnector { origin: String, doc: usize, found: String },
    #[error("{origin}, document {doc} (Connector {name:?}): {errors}")]
    Invalid { origin: String, doc: usize, name: String, errors: ValidationErrors },
    #[error("{origin}: no Connector found")]
    Empty { origin: String },
}

/// Parses every Connector in a (multi-document) YAML or JSON text and validates each.
/// Documents of other kinds are skipped, so a file can hold Connectors next to other resources.
pub fn parse_connectors(text: &str, origin: &str) -> Result<Vec<Connector>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
            origin: origin.to_string(),
            doc: doc_no,
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let api = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if kind != "Connector" {
            if api.starts_with("wallaroo.dev/") || kind.is_empty() {
                return Err(ManifestError::NotAConnector {
                    origin: origin.to_string(),
                    doc: doc_no,
                    found: format!("{api} {kind}"),
                });
            }
            continue;
        }
        if api != "wallaroo.dev/v1alpha1" {
            return Err(ManifestError::NotAConnector {
                origin: origin.to_string(),
                doc: doc_no,
                found: format!("{api} {kind}"),
            });
        }
        let connector: Connector = serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml {
            origin: origin.to_string(),
            doc: doc_no,
            source,
        })?;
        connector.spec.validate().map_err(|errors| ManifestError::Invalid {
            origin: origin.to_string(),
            doc: doc_no,
            name: connector.metadata.name.clone().unwrap_or_default(),
            errors,
        })?;
        out.push(connector);
    }
    if out.is_empty() {
        return Err(ManifestError::Empty { origin: origin.to_string() });
    }
    Ok(out)
}

pub fn load_connectors(path: &Path) -> Result<Vec<Connector>, ManifestError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: origin.clone(), source })?;
    parse_connectors(&text, &origin)
}
