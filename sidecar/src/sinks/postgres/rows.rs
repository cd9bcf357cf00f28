//! Payloads -> COPY text rows. COPY's text format lets the server parse every column type (text, jsonb, int,
//! timestamp, ...) from its text form, so one encoder serves any table shape and is much faster than INSERTs.
use std::collections::HashMap;

use bytes::Bytes;
use serde_json::Value;
use wallaroo_crds::{PayloadFormat, PayloadMapping};

use super::conn::quote_ident;
use crate::sinks::payload;

/// Which columns a payload fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The mapping's key (when it yields one) and value go to these columns.
    KeyValue { key: Option<String>, value: String },
    /// Each field of a JSON object goes to the column of the same name.
    JsonColumns,
}

impl Layout {
    pub fn from_config(c: &wallaroo_crds::PostgresSink) -> Self {
        if c.json_columns {
            return Layout::JsonColumns;
        }
        let has_key = match c.format {
            PayloadFormat::Raw => false,
            PayloadFormat::LengthPrefixed => true,
            PayloadFormat::Json => c.key_field.is_some(),
        };
        Layout::KeyValue { key: has_key.then(|| c.key_column.clone()), value: c.value_column.clone() }
    }
}

/// Column name -> is it `bytea` (bytes are hex-encoded for those; everything else must be UTF-8 text).
#[derive(Debug, Clone, Default)]
pub struct ColumnTypes(pub HashMap<String, bool>);

impl ColumnTypes {
    fn is_bytea(&self, col: &str) -> bool {
        self.0.get(col).copied().unwrap_or(false)
    }
}

/// One `COPY <table> (<columns>) FROM STDIN` worth of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyBatch {
    pub columns: Vec<String>,
    pub data: Vec<u8>,
    pub rows: usize,
}

impl CopyBatch {
    pub fn sql(&self, table: &str) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        format!("COPY {} ({}) FROM STDIN", quote_ident(table), cols.join(", "))
    }
}

pub struct Encoder<'a> {
    pub layout: &'a Layout,
    pub mapping: &'a PayloadMapping,
    pub types: &'a ColumnTypes,
    pub batch_rows: usize,
}

impl Encoder<'_> {
    /// Appends the rows of `payloads` to `out`, starting a new batch when the column list changes or a batch
    /// is full. Errors name the offending payload's position.
    pub fn encode<'p>(
        &self,
        payloads: impl IntoIterator<Item = &'p Bytes>,
        out: &mut Vec<CopyBatch>,
    ) -> Result<(), String> {
        for (n, p) in payloads.into_iter().enumerate() {
            self.encode_one(p, out).map_err(|e| format!("message {n} of the batch: {e}"))?;
        }
        Ok(())
    }

    fn batch_for<'o>(&self, columns: &[&str], out: &'o mut Vec<CopyBatch>) -> &'o mut CopyBatch {
        let reuse = out.last().is_some_and(|b| {
            b.rows < self.batch_rows
                && b.columns.len() == columns.len()
                && b.columns.iter().zip(columns).all(|(a, b)| a == b)
        });
        if !reuse {
            out.push(CopyBatch { columns: columns.iter().map(|c| c.to_string()).collect(), data: Vec::new(), rows: 0 });
        }
        let last = out.len() - 1;
        &mut out[last]
    }

    fn encode_one(&self, p: &Bytes, out: &mut Vec<CopyBatch>) -> Result<(), String> {
        match self.layout {
            Layout::KeyValue { key, value } => {
                let (k, v) = payload::split_bytes(self.mapping, p)?;
                let cols: Vec<&str> = match key {
                    Some(kc) => vec![kc.as_str(), value.as_str()],
                    None => vec![value.as_str()],
                };
                let b = self.batch_for(&cols, out);
                let mut row = Vec::with_capacity(p.len() + 8);
                if let Some(kc) = key {
                    match &k {
                        Some(k) => push_field(&mut row, k, self.types.is_bytea(kc))?,
                        None => row.extend_from_slice(b"\\N"),
                    }
                    row.push(b'\t');
                }
                push_field(&mut row, &v, self.types.is_bytea(value))?;
                row.push(b'\n');
                b.data.extend_from_slice(&row);
                b.rows += 1;
            }
            Layout::JsonColumns => {
                let obj = payload::json_object(p)?;
                if obj.is_empty() {
                    return Err("empty JSON object: no column to fill".to_string());
                }
                let cols: Vec<&str> = obj.keys().map(String::as_str).collect();
                let mut row = Vec::with_capacity(p.len() + 8);
                for (i, (col, v)) in obj.iter().enumerate() {
                    if i > 0 {
                        row.push(b'\t');
                    }
                    match v {
                        Value::Null => row.extend_from_slice(b"\\N"),
                        other => {
                            let text = payload::value_text(other).unwrap_or_default();
                            push_field(&mut row, text.as_bytes(), self.types.is_bytea(col))?;
                        }
                    }
                }
                row.push(b'\n');
                let b = self.batch_for(&cols, out);
                b.data.extend_from_slice(&row);
                b.rows += 1;
            }
        }
        Ok(())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One field in COPY text format: bytea as `\\x<hex>`, text with `\`, tab, newline and CR escaped.
fn push_field(out: &mut Vec<u8>, v: &[u8], bytea: bool) -> Result<(), String> {
    if bytea {
        out.reserve(3 + 2 * v.len());
        out.extend_from_slice(b"\\\\x");
        for &b in v {
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 15) as usize]);
        }
        return Ok(());
    }
    if std::str::from_utf8(v).is_err() {
        return Err("value is not UTF-8 text (use a bytea column for binary data)".to_string());
    }
    if v.contains(&0) {
        return Err("text values cannot contain NUL bytes (use a bytea column)".to_string());
    }
    out.reserve(v.len());
    for &b in v {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
    Ok(())
}

/// Staged payloads are kept as `u32 big-endian length + bytes` frames in one `bytea` per chunk.
pub fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Splits a staged chunk back into payloads.
pub fn unframe(chunk: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < chunk.len() {
        if chunk.len() - at < 4 {
            return Err("staged chunk ends inside a length prefix".to_string());
        }
        let len = u32::from_be_bytes([chunk[at], chunk[at + 1], chunk[at + 2], chunk[at + 3]]) as usize;
        at += 4;
        if chunk.len() - at < len {
            return Err("staged chunk ends inside a payload".to_string());
        }
        out.push(chunk.slice(at..at + len));
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(
        layout: Layout,
        mapping: PayloadMapping,
        types: ColumnTypes,
        rows: usize,
        payloads: &[&[u8]],
    ) -> Result<Vec<CopyBatch>, String> {
        let e = Encoder { layout: &layout, mapping: &mapping, types: &types, batch_rows: rows };
        let owned: Vec<Bytes> = payloads.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let mut out = Vec::new();
        e.encode(owned.iter(), &mut out)?;
        Ok(out)
    }

    #[test]
    fn raw_text_values_are_escaped_and_batched() {
        let layout = Layout::KeyValue { key: None, value: "value".into() };
        let out =
            enc(layout, PayloadMapping::default(), ColumnTypes::default(), 2, &[b"a\tb", b"c\\d\n", b"e"]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].columns, vec!["value".to_string()]);
        assert_eq!(out[0].data, b"a\\tb\nc\\\\d\\n\n".to_vec());
        assert_eq!(out[0].rows, 2);
        assert_eq!(out[1].data, b"e\n".to_vec());
        assert_eq!(out[0].sql("public.t"), "COPY \"public\".\"t\" (\"value\") FROM STDIN");
    }

    #[test]
    fn bytea_is_hex_and_binary_text_is_refused() {
        let layout = Layout::KeyValue { key: Some("k".into()), value: "v".into() };
        let mapping = PayloadMapping { format: PayloadFormat::LengthPrefixed, ..Default::default() };
        let mut types = ColumnTypes::default();
        types.0.insert("v".into(), true);
        let out = enc(layout.clone(), mapping.clone(), types, 10, &[b"\0\0\0\x01k\xff\x00"]).unwrap();
        assert_eq!(out[0].data, b"k\t\\\\xff00\n".to_vec());
        assert!(enc(layout, mapping, ColumnTypes::default(), 10, &[b"\0\0\0\x01k\xff"]).is_err());
    }

    #[test]
    fn json_columns_follow_fields_and_split_on_shape() {
        let mapping = PayloadMapping { format: PayloadFormat::Json, ..Default::default() };
        let out = enc(
            Layout::JsonColumns,
            mapping,
            ColumnTypes::default(),
            10,
            &[br#"{"b":"x","a":1}"#, br#"{"a":2,"b":null}"#, br#"{"a":3,"c":{"d":true}}"#],
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].columns, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(out[0].data, b"1\tx\n2\t\\N\n".to_vec());
        assert_eq!(out[1].columns, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(out[1].data, b"3\t{\"d\":true}\n".to_vec());
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        frame_into(&mut buf, b"one");
        frame_into(&mut buf, b"");
        frame_into(&mut buf, b"three");
        let got = unframe(&Bytes::from(buf.clone())).unwrap();
        assert_eq!(got, vec![Bytes::from_static(b"one"), Bytes::new(), Bytes::from_static(b"three")]);
        buf.truncate(buf.len() - 1);
        assert!(unframe(&Bytes::from(buf)).is_err());
    }
}
