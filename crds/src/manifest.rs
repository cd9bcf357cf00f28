//! Reading Connector manifests: the same YAML a user applies to Kubernetes.
//!
//! Every rejection names the field (`spec.worker.port`) and, where the YAML parser knows it, the line and column,
//! plus the fix. The text is bounded before the YAML parser sees it: libyaml's time grows with the square of the
//! nesting depth, so a manifest nested 100,000 levels deep would take minutes to refuse.
use std::path::Path;

use serde::Deserialize;

use crate::spec::Connector;
use crate::validate::ValidationErrors;

/// Largest manifest accepted (Kubernetes itself stores objects of at most about 1.5 MiB).
pub const MAX_MANIFEST_BYTES: usize = 2 * 1024 * 1024;
/// Deepest nesting accepted; a Connector needs about 8 levels.
pub const MAX_NESTING: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}: the manifest is {len} bytes; at most {max} are accepted (a Connector is a few hundred)")]
    TooLarge { origin: String, len: usize, max: usize },
    #[error(
        "{origin}, line {line}, column {column}: nested deeper than {max} levels; a Connector needs about 8 \
         (is a bracket or an indentation wrong?)"
    )]
    TooDeep { origin: String, line: usize, column: usize, max: usize },
    /// `message` is the parser's, shortened (it may quote a 100 kB value) and with the position it left out.
    #[error("{origin}, document {doc}: {message}{hint}")]
    Yaml { origin: String, doc: usize, message: String, hint: &'static str, source: serde_yaml::Error },
    #[error(
        "{origin}, document {doc}: apiVersion/kind is {found:?}; set apiVersion: wallaroo.dev/v1alpha1 and kind: Connector"
    )]
    NotAConnector { origin: String, doc: usize, found: String },
    #[error("{origin}, document {doc} (Connector {name:?}): {errors}")]
    Invalid { origin: String, doc: usize, name: String, errors: ValidationErrors },
    #[error(
        "{origin}: no Connector found: expected a document with apiVersion: wallaroo.dev/v1alpha1 and kind: Connector"
    )]
    Empty { origin: String },
}

impl ManifestError {
    fn yaml(origin: &str, doc: usize, source: serde_yaml::Error) -> Self {
        let mut message = shorten(&source.to_string(), 600);
        let hint = hint(&message);
        // serde_yaml leaves out a position at the very start of the text (line 1, column 1).
        if let Some(l) = source.location()
            && !message.contains(" line ")
        {
            message.push_str(&format!(" at line {} column {}", l.line(), l.column()));
        }
        ManifestError::Yaml { origin: origin.to_string(), doc, message, hint, source }
    }
}

/// Keeps the start and the end (where serde_yaml puts the position) of a long message.
fn shorten(msg: &str, max: usize) -> String {
    if msg.len() <= max {
        return msg.to_string();
    }
    let mut head = max / 2;
    while !msg.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = msg.len() - max / 2;
    while !msg.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}[... {} bytes ...]{}", &msg[..head], tail - head, &msg[tail..])
}

/// The fix for the usual serde complaints (serde_yaml already names the field path and the line).
fn hint(msg: &str) -> &'static str {
    let expects_number =
        ["expected u8", "expected u16", "expected u32", "expected u64", "expected i32", "expected i64"]
            .iter()
            .any(|e| msg.contains(e));
    if msg.contains("invalid type: string") && expects_number {
        "; write the number without quotes"
    } else if msg.contains("invalid type: string") && msg.contains("expected a boolean") {
        "; write true or false without quotes"
    } else if msg.contains("expected a string") {
        "; quote the value"
    } else if msg.contains("invalid value") && expects_number {
        "; use a smaller number in range"
    } else if msg.contains("unknown field") {
        "; remove the field or fix its spelling (the accepted fields are listed)"
    } else if msg.contains("missing field") {
        "; add the field"
    } else if msg.contains("unknown variant") {
        "; use one of the listed values"
    } else if msg.contains("recursion limit") {
        "; the manifest is nested too deeply"
    } else if msg.contains("expected struct") || msg.contains("expected a map") {
        "; this field is a mapping: write its fields indented under it or as {key: value}"
    } else if msg.contains("expected a sequence") {
        "; this field is a list: write [a, b] or one `- item` per line"
    } else if msg.contains("duplicate entry") {
        "; remove one of the two"
    } else if msg.contains("unknown anchor") {
        "; define the anchor (&name) before using it (*name), or quote a value that starts with *"
    } else if ["while parsing", "while scanning", "not allowed in this context", "did not find expected", "found "]
        .iter()
        .any(|p| msg.contains(p))
    {
        "; a YAML syntax error: check the indentation, the colons and the quotes there"
    } else {
        ""
    }
}

/// Parses every Connector in a (multi-document) YAML or JSON text and validates each.
/// Documents of other kinds are skipped, so a file can hold Connectors next to other resources.
pub fn parse_connectors(text: &str, origin: &str) -> Result<Vec<Connector>, ManifestError> {
    // Editors on Windows save a byte order mark; it is not part of the YAML.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge { origin: origin.to_string(), len: text.len(), max: MAX_MANIFEST_BYTES });
    }
    if let Err((line, column)) = check_nesting(text, MAX_NESTING) {
        return Err(ManifestError::TooDeep { origin: origin.to_string(), line, column, max: MAX_NESTING });
    }
    // First pass: which documents are Connectors. Kinds are read from a generic value, which keeps the YAML
    // parser's line numbers for syntax errors but not for type errors: the second pass deserializes Connectors
    // straight from the text, so that a wrong type names the field path, the line and the column.
    let mut connectors_at = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ManifestError::yaml(origin, doc_no, e))?;
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
        connectors_at.push(i);
    }
    let mut out = Vec::new();
    let mut wanted = connectors_at.iter().peekable();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Some(&&next) = wanted.peek() else { break };
        if i != next {
            continue;
        }
        wanted.next();
        let doc_no = i + 1;
        let connector = Connector::deserialize(doc).map_err(|e| ManifestError::yaml(origin, doc_no, e))?;
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

/// A fast upper estimate of the YAML nesting depth, in one pass: flow brackets (`[`, `{`) outside quoted
/// scalars and comments, plus block levels (indentation steps and `- ` / `? ` indicators at the start of a line).
/// Returns the 1-based line and column where `max` is first exceeded.
pub fn check_nesting(text: &str, max: usize) -> Result<(), (usize, usize)> {
    let mut flow: usize = 0;
    // Indentations of the open block levels.
    let mut indents: Vec<usize> = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let rest = &bytes[indent..];
        let blank = rest.is_empty() || rest[0] == b'#';
        let mut block = indents.len();
        let mut i = indent;
        if flow == 0 && !blank {
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            block = indents.len();
            // `- - - x` opens a level per indicator on one line.
            while i + 1 < bytes.len() && matches!(bytes[i], b'-' | b'?') && bytes[i + 1] == b' ' {
                block += 1;
                if block > max {
                    return Err((line_no + 1, i + 1));
                }
                i += 2;
                while i < bytes.len() && bytes[i] == b' ' {
                    i += 1;
                }
            }
            if block > max {
                return Err((line_no + 1, i + 1));
            }
        }
        // Flow brackets on the rest of the line.
        let mut quote: Option<u8> = None;
        let mut prev: Option<u8> = None;
        let mut j = i;
        while j < bytes.len() {
            let b = bytes[j];
            match quote {
                Some(q) => {
                    if b == b'\\' && q == b'"' {
                        j += 1;
                    } else if b == q {
                        // '' inside a single-quoted scalar is an escaped quote.
                        if q == b'\'' && bytes.get(j + 1) == Some(&b'\'') {
                            j += 1;
                        } else {
                            quote = None;
                        }
                    }
                }
                None => match b {
                    b'#' if prev.is_none_or(|p| p == b' ' || p == b'\t') => break,
                    // A quote opens a scalar only where a scalar can start, not inside a plain one (`it's`).
                    b'\'' | b'"' if prev_significant(bytes, j).is_none_or(|p| b"[{,:-?".contains(&p)) => {
                        quote = Some(b)
                    }
                    b'[' | b'{' => {
                        flow += 1;
                        if block + flow > max {
                            return Err((line_no + 1, j + 1));
                        }
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = Some(b);
            j += 1;
        }
    }
    Ok(())
}

/// The last non-blank byte before `at` on the line.
fn prev_significant(bytes: &[u8], at: usize) -> Option<u8> {
    bytes[..at].iter().rev().copied().find(|b| *b != b' ' && *b != b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_estimated_from_brackets_and_indentation() {
        assert!(check_nesting("a: {b: [1, 2], c: {d: e}}\n", 3).is_ok());
        assert_eq!(check_nesting("a: {b: [1, 2], c: {d: [e]}}\n", 3), Err((1, 23)));
        // Brackets inside quoted scalars and comments do not count.
        assert!(check_nesting("a: '[[[[' # [[[[\nb: \"{{{{\\\"{{\"\nc: it's [x]\n", 3).is_ok());
        assert!(check_nesting("a:\n  b:\n    c: d\n", 3).is_ok());
        assert_eq!(check_nesting("a:\n  b:\n    c:\n      d: e\n", 3), Err((4, 7)));
        assert_eq!(check_nesting("- - - - x\n", 3), Err((1, 5)));
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        let text = "\u{feff}apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {name: x}\nspec:\n  \
                    connectorName: a\n  worker: {port: 7100}\n  source: {udp: {port: 5}}\n";
        assert_eq!(parse_connectors(text, "t").map(|c| c.len()).ok(), Some(1));
    }
}
