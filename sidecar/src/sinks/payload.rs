//! Reading a key and a value out of the bytes the worker's sink encoder produced (`format`, `keyField`,
//! `valueField` of a sink spec). Shared by every sink that needs a key and a value.
use bytes::Bytes;
use serde_json::{Map, Value};
use wallaroo_crds::{PayloadFormat, PayloadMapping};

/// Splits one payload into (key, value) according to `mapping`.
///
/// - `raw`: no key, the whole payload is the value (zero copy).
/// - `lengthPrefixed`: u32 big-endian key length, the key, then the value (zero copy).
/// - `json`: an object; the key is `keyField` (absent field = no key), the value is `valueField` or, without it,
///   the whole payload unchanged. String fields give their text, other JSON values their JSON text.
pub fn split(mapping: &PayloadMapping, payload: &[u8]) -> Result<(Option<Bytes>, Bytes), String> {
    split_bytes(mapping, &Bytes::copy_from_slice(payload))
}

/// [`split`] on a shared buffer: `raw` and `lengthPrefixed` return slices of `payload` without copying.
pub fn split_bytes(mapping: &PayloadMapping, payload: &Bytes) -> Result<(Option<Bytes>, Bytes), String> {
    match mapping.format {
        PayloadFormat::Raw => Ok((None, payload.clone())),
        PayloadFormat::LengthPrefixed => {
            if payload.len() < 4 {
                return Err(format!("lengthPrefixed payload of {} bytes has no 4-byte key length", payload.len()));
            }
            let klen = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
            if payload.len() - 4 < klen {
                return Err(format!(
                    "lengthPrefixed key length {klen} exceeds the {} bytes that follow it",
                    payload.len() - 4
                ));
            }
            Ok((Some(payload.slice(4..4 + klen)), payload.slice(4 + klen..)))
        }
        PayloadFormat::Json => {
            let obj = json_object(payload)?;
            let key = match &mapping.key_field {
                Some(f) => obj.get(f).filter(|v| !v.is_null()).map(field_bytes),
                None => None,
            };
            let value = match &mapping.value_field {
                Some(f) => match obj.get(f) {
                    Some(v) => field_bytes(v),
                    None => return Err(format!("JSON payload has no field {f:?} (valueField)")),
                },
                None => payload.clone(),
            };
            Ok((key, value))
        }
    }
}

/// The payload as a JSON object (for sinks that map fields to columns).
pub fn json_object(payload: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("JSON payload is not an object but {}", json_kind(&other))),
        Err(e) => Err(format!("payload is not JSON: {e}")),
    }
}

/// A field's bytes: strings without quotes, anything else as compact JSON.
pub fn field_bytes(v: &Value) -> Bytes {
    match v {
        Value::String(s) => Bytes::from(s.clone().into_bytes()),
        other => Bytes::from(other.to_string().into_bytes()),
    }
}

/// The text of a JSON value as a column would hold it: strings unquoted, everything else as JSON text,
/// `null` as `None`.
pub fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
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

    fn m(format: PayloadFormat, key: Option<&str>, value: Option<&str>) -> PayloadMapping {
        PayloadMapping { format, key_field: key.map(str::to_string), value_field: value.map(str::to_string) }
    }

    #[test]
    fn raw_is_the_whole_payload_without_key() {
        let (k, v) = split(&m(PayloadFormat::Raw, None, None), b"abc").unwrap();
        assert_eq!(k, None);
        assert_eq!(&v[..], b"abc");
    }

    #[test]
    fn length_prefixed_splits_key_and_value() {
        let (k, v) = split(&m(PayloadFormat::LengthPrefixed, None, None), b"\0\0\0\x02k1value").unwrap();
        assert_eq!(k.as_deref(), Some(&b"k1"[..]));
        assert_eq!(&v[..], b"value");
        let (k, v) = split(&m(PayloadFormat::LengthPrefixed, None, None), b"\0\0\0\0").unwrap();
        assert_eq!(k.as_deref(), Some(&b""[..]));
        assert!(v.is_empty());
    }

    #[test]
    fn length_prefixed_rejects_short_payloads() {
        assert!(split(&m(PayloadFormat::LengthPrefixed, None, None), b"\0\0").is_err());
        assert!(split(&m(PayloadFormat::LengthPrefixed, None, None), b"\0\0\0\x05abc").is_err());
    }

    #[test]
    fn json_picks_fields() {
        let p = br#"{"id":"a/b","n":3,"body":{"x":1}}"#;
        let (k, v) = split(&m(PayloadFormat::Json, Some("id"), Some("body")), p).unwrap();
        assert_eq!(k.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(&v[..], br#"{"x":1}"#);
        let (k, v) = split(&m(PayloadFormat::Json, Some("n"), None), p).unwrap();
        assert_eq!(k.as_deref(), Some(&b"3"[..]));
        assert_eq!(&v[..], &p[..]);
        let (k, _) = split(&m(PayloadFormat::Json, Some("missing"), None), p).unwrap();
        assert_eq!(k, None);
    }

    #[test]
    fn json_errors_name_the_problem() {
        let e = split(&m(PayloadFormat::Json, Some("id"), None), b"[1]").unwrap_err();
        assert!(e.contains("not an object"), "{e}");
        let e = split(&m(PayloadFormat::Json, Some("id"), None), b"{").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let e = split(&m(PayloadFormat::Json, Some("id"), Some("v")), br#"{"id":1}"#).unwrap_err();
        assert!(e.contains("valueField"), "{e}");
    }
}
