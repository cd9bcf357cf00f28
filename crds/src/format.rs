use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a sink reads a key and a value out of the bytes the worker's encoder produced.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PayloadFormat {
    /// The whole payload is the value; there is no key.
    #[default]
    Raw,
    /// u32 big-endian key length, the key, then the value.
    LengthPrefixed,
    /// A JSON object; `keyField`/`valueField` pick fields (or all fields map to columns).
    Json,
}

/// Shared by every sink that needs a key and a value.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PayloadMapping {
    #[serde(default)]
    pub format: PayloadFormat,
    /// JSON field holding the key (format `json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    /// JSON field holding the value (format `json`); when absent the whole object is the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
}
