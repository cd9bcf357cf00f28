//! Reading a key and a value out of the bytes the worker's encoder produced (`format`, `keyField`,
//! `valueField` of a sink), shared by every sink that writes key/value pairs.
use bytes::Bytes;
use serde_json::{Map, Value};
use wallaroo_crds::{PayloadFormat, PayloadMapping};

/// Splits one message into (key, value) according to `mapping`.
///
/// - `raw`: no key, the whole payload is the value.
/// - `lengthPrefixed`: u32 big-endian key length, the key, then the value (the rest).
/// - `json`: an object; `keyField` names the key (strings are taken as is, other JSON values as their JSON
///   text), `valueField` the value (the whole object when absent).
pub fn split(mapping: &PayloadMapping, payload: &[u8]) -> Result<(Option<Bytes>, Bytes), String> {
    match mapping.format {
        PayloadFormat::Raw => Ok((None, Bytes::copy_from_slice(payload))),
        PayloadFormat::LengthPrefixed => {
            let (k, v) = key_bounds(payload)?;
            Ok((Some(Bytes::copy_from_slice(&payload[k])), Bytes::copy_from_slice(&payload[v])))
        }
        PayloadFormat::Json => {
            let object = json_object(payload)?;
            let key = match &mapping.key_field {
                Some(f) => Some(field_bytes(&object, f)?),
                None => None,
            };
            let value = match &mapping.value_field {
                Some(f) => field_bytes(&object, f)?,
                None => Bytes::copy_from_slice(payload),
            };
            Ok((key, value))
        }
    }
}

/// [`split`] without copying for `raw` and `lengthPrefixed`: key and value share the payload's buffer.
pub fn split_bytes(mapping: &PayloadMapping, payload: &Bytes) -> Result<(Option<Bytes>, Bytes), String> {
    match mapping.format {
        PayloadFormat::Raw => Ok((None, payload.clone())),
        PayloadFormat::LengthPrefixed => {
            let (k, v) = key_bounds(payload)?;
            Ok((Some(payload.slice(k)), payload.slice(v)))
        }
        PayloadFormat::Json => split(mapping, payload),
    }
}

/// Byte ranges of key and value in a `lengthPrefixed` payload.
fn key_bounds(payload: &[u8]) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>), String> {
    let Some(len) = payload.get(..4) else {
        return Err(format!("lengthPrefixed payload of {} bytes has no 4-byte key length", payload.len()));
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if payload.len() - 4 < len {
        return Err(format!("lengthPrefixed key length {len} exceeds the {} bytes that follow", payload.len() - 4));
    }
    Ok((4..4 + len, 4 + len..payload.len()))
}

/// Parses a payload that must be a JSON object (for sinks that map fields to columns).
pub fn json_object(payload: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("json payload is not an object but {}", kind(&other))),
        Err(e) => Err(format!("payload is not valid JSON: {e}")),
    }
}

/// A field of an object as bytes: strings as their text, anything else as its JSON text.
pub fn field_bytes(object: &Map<String, Value>, field: &str) -> Result<Bytes, String> {
    match object.get(field) {
        None => Err(format!("json payload has no field {field:?}")),
        Some(Value::String(s)) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Some(v) => Ok(Bytes::from(v.to_string())),
    }
}

fn kind(v: &Value) -> &'static str {
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
        PayloadMapping { format, key_field: key.map(String::from), value_field: value.map(String::from) }
    }

    fn lp(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = (key.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(key);
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn raw_is_the_whole_payload_without_key() {
        let (k, v) = split(&mapping(PayloadFormat::Raw, None, None), b"\x00abc").unwrap();
        assert_eq!(k, None);
        assert_eq!(&v[..], b"\x00abc");
    }

    #[test]
    fn length_prefixed_splits_key_and_value() {
        let m = mapping(PayloadFormat::LengthPrefixed, None, None);
        let (k, v) = split(&m, &lp(b"key", b"\x01value")).unwrap();
        assert_eq!(k.as_deref(), Some(&b"key"[..]));
        assert_eq!(&v[..], b"\x01value");
        let (k, v) = split(&m, &lp(b"", b"")).unwrap();
        assert_eq!(k.as_deref(), Some(&b""[..]));
        assert!(v.is_empty());
    }

    #[test]
    fn length_prefixed_rejects_short_payloads() {
        let m = mapping(PayloadFormat::LengthPrefixed, None, None);
        assert!(split(&m, b"\x00\x00").unwrap_err().contains("no 4-byte key length"));
        assert!(split(&m, b"\x00\x00\x00\x05abc").unwrap_err().contains("exceeds"));
    }

    #[test]
    fn split_bytes_matches_split() {
        let m = mapping(PayloadFormat::LengthPrefixed, None, None);
        let p = Bytes::from(lp(b"key", b"value"));
        assert_eq!(split_bytes(&m, &p).unwrap(), split(&m, &p).unwrap());
        assert!(split_bytes(&m, &Bytes::from_static(b"\x00\x00\x00\x09ab")).is_err());
        let raw = mapping(PayloadFormat::Raw, None, None);
        assert_eq!(split_bytes(&raw, &p).unwrap(), split(&raw, &p).unwrap());
        let json = mapping(PayloadFormat::Json, Some("id"), None);
        let p = Bytes::from_static(br#"{"id":"a"}"#);
        assert_eq!(split_bytes(&json, &p).unwrap(), split(&json, &p).unwrap());
    }

    #[test]
    fn json_picks_fields() {
        let m = mapping(PayloadFormat::Json, Some("id"), Some("v"));
        let (k, v) = split(&m, br#"{"id":"a","v":{"x":1}}"#).unwrap();
        assert_eq!(k.as_deref(), Some(&b"a"[..]));
        assert_eq!(&v[..], br#"{"x":1}"#);
        let (k, _) = split(&m, br#"{"id":7,"v":"s"}"#).unwrap();
        assert_eq!(k.as_deref(), Some(&b"7"[..]));
        let whole = mapping(PayloadFormat::Json, Some("id"), None);
        let (_, v) = split(&whole, br#"{"id":"a"}"#).unwrap();
        assert_eq!(&v[..], br#"{"id":"a"}"#);
    }

    #[test]
    fn json_errors_name_the_problem() {
        let m = mapping(PayloadFormat::Json, Some("id"), None);
        assert!(split(&m, b"[1]").unwrap_err().contains("an array"));
        assert!(split(&m, b"{").unwrap_err().contains("not valid JSON"));
        assert!(split(&m, br#"{"x":1}"#).unwrap_err().contains("\"id\""));
    }
}
