//! How sinks read a key and a value out of the bytes the worker's encoder produced (`format`, `keyField`,
//! `valueField` of a sink spec), shared by every sink that needs a key/value or JSON columns.
use bytes::Bytes;
use serde_json::{Map, Value};
use wallaroo_crds::{PayloadFormat, PayloadMapping};

/// Splits one payload into `(key, value)` according to the mapping.
///
/// - `raw`: no key, the whole payload is the value.
/// - `lengthPrefixed`: u32 big-endian key length, the key, then the value (slices of `payload`, no copy).
/// - `json`: a JSON object; the key is `keyField` (absent: no key), the value is `valueField` (absent: the
///   whole payload). A string field yields its text, any other JSON value its JSON text.
pub fn split(mapping: &PayloadMapping, payload: &[u8]) -> Result<(Option<Bytes>, Bytes), String> {
    split_bytes(mapping, &Bytes::copy_from_slice(payload))
}

/// [`split`] on a `Bytes`, returning slices of it where possible.
pub fn split_bytes(mapping: &PayloadMapping, payload: &Bytes) -> Result<(Option<Bytes>, Bytes), String> {
    match mapping.format {
        PayloadFormat::Raw => Ok((None, payload.clone())),
        PayloadFormat::LengthPrefixed => {
            if payload.len() < 4 {
                return Err(format!("lengthPrefixed payload of {} bytes has no 4-byte key length", payload.len()));
            }
            let klen = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
            if payload.len() - 4 < klen {
                return Err(format!("lengthPrefixed key length {klen} exceeds the {}-byte payload", payload.len()));
            }
            Ok((Some(payload.slice(4..4 + klen)), payload.slice(4 + klen..)))
        }
        PayloadFormat::Json => {
            let obj = json_object(payload)?;
            let key = match &mapping.key_field {
                Some(f) => Some(field_bytes(&obj, f)?),
                None => None,
            };
            let value = match &mapping.value_field {
                Some(f) => field_bytes(&obj, f)?,
                None => payload.clone(),
            };
            Ok((key, value))
        }
    }
}

/// Parses a payload that must be a JSON object.
pub fn json_object(payload: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("expected a JSON object, got {}", json_kind(&other))),
        Err(e) => Err(format!("payload is not JSON: {e}")),
    }
}

/// The text of a JSON value as a column or key would hold it: strings unquoted, everything else as JSON text,
/// `null` as `None`.
pub fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn field_bytes(obj: &Map<String, Value>, field: &str) -> Result<Bytes, String> {
    let v = obj.get(field).ok_or_else(|| format!("JSON payload has no field {field:?}"))?;
    value_text(v).map(Bytes::from).ok_or_else(|| format!("JSON field {field:?} is null"))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(format: PayloadFormat, key: Option<&str>, value: Option<&str>) -> PayloadMapping {
        PayloadMapping { format, key_field: key.map(str::to_string), value_field: value.map(str::to_string) }
    }

    #[test]
    fn raw_is_all_value() {
        let (k, v) = split(&mapping(PayloadFormat::Raw, None, None), b"abc").unwrap();
        assert_eq!(k, None);
        assert_eq!(&v[..], b"abc");
    }

    #[test]
    fn length_prefixed_splits_key_and_value() {
        let (k, v) = split(&mapping(PayloadFormat::LengthPrefixed, None, None), b"\0\0\0\x02kyvalue").unwrap();
        assert_eq!(k.as_deref(), Some(&b"ky"[..]));
        assert_eq!(&v[..], b"value");
        assert!(split(&mapping(PayloadFormat::LengthPrefixed, None, None), b"\0\0\0\x09ab").is_err());
        assert!(split(&mapping(PayloadFormat::LengthPrefixed, None, None), b"\0\0").is_err());
    }

    #[test]
    fn json_fields() {
        let p = br#"{"id":7,"name":"x","nested":{"a":1}}"#;
        let (k, v) = split(&mapping(PayloadFormat::Json, Some("id"), Some("name")), p).unwrap();
        assert_eq!(k.as_deref(), Some(&b"7"[..]));
        assert_eq!(&v[..], b"x");
        let (_, v) = split(&mapping(PayloadFormat::Json, Some("name"), Some("nested")), p).unwrap();
        assert_eq!(&v[..], br#"{"a":1}"#);
        let (k, v) = split(&mapping(PayloadFormat::Json, None, None), p).unwrap();
        assert_eq!(k, None);
        assert_eq!(&v[..], &p[..]);
        assert!(split(&mapping(PayloadFormat::Json, Some("missing"), None), p).is_err());
        assert!(split(&mapping(PayloadFormat::Json, None, None), b"[1]").is_err());
        assert!(split(&mapping(PayloadFormat::Json, None, None), b"nope").is_err());
    }
}
