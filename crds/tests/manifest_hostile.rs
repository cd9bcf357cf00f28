//! Hostile and broken manifests: every rejection names the field or the line (and the fix), nothing panics, and
//! nothing takes long. The fuzz test mutates the example manifests with a seeded generator (set
//! `MANIFEST_FUZZ_SEED` to replay or vary a run, `MANIFEST_FUZZ_CASES` for more cases).
use std::time::{Duration, Instant};

use wallaroo_crds::{ManifestError, parse_connectors};

const BASE: &str = "apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {name: x}
spec:
  connectorName: a
  worker:
    port: 7100
  source:
    udp: {port: 5}
";

/// Generous: a manifest is parsed in milliseconds; this only catches runaway time.
const LIVENESS: Duration = Duration::from_secs(10);

fn parse(text: &str) -> Result<usize, String> {
    let started = Instant::now();
    let r = parse_connectors(text, "t.yaml").map(|c| c.len()).map_err(|e| e.to_string());
    assert!(started.elapsed() < LIVENESS, "parsing took {:?}", started.elapsed());
    r
}

/// What every rejection must have: a field path or a line to look at.
fn names_field_or_line(msg: &str) -> bool {
    msg.contains("line ") || ["spec", "metadata", "apiVersion", "kind", "status"].iter().any(|f| msg.contains(f))
}

#[test]
fn the_base_manifest_is_valid() {
    assert_eq!(parse(BASE), Ok(1));
}

#[test]
fn a_wrong_type_names_the_field_the_line_and_the_fix() {
    let e = parse(&BASE.replace("port: 7100", "port: \"7100\"")).unwrap_err();
    for want in ["spec.worker.port", "line 7", "expected u16", "without quotes"] {
        assert!(e.contains(want), "{want:?} missing in {e}");
    }
    let e = parse(&BASE.replace("port: 7100", "port: 7100\n    prot: 1")).unwrap_err();
    for want in ["spec.worker", "unknown field `prot`", "line 8", "spelling"] {
        assert!(e.contains(want), "{want:?} missing in {e}");
    }
    let e = parse(&BASE.replace("port: 7100", "port: 70000")).unwrap_err();
    assert!(e.contains("spec.worker.port") && e.contains("line 7"), "{e}");
}

#[test]
fn a_byte_order_mark_is_accepted() {
    assert_eq!(parse(&format!("\u{feff}{BASE}")), Ok(1));
}

#[test]
fn deep_nesting_is_refused_quickly_with_its_line() {
    let flow = format!("{BASE}  x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let e = parse(&flow).unwrap_err();
    assert!(e.contains("line 10") && e.contains("nested deeper"), "{e}");
    let block = format!("{BASE}  x: \n    {}a\n", "- ".repeat(100_000));
    let e = parse(&block).unwrap_err();
    assert!(e.contains("line 11") && e.contains("nested deeper"), "{e}");
    let e = parse(&format!("{BASE}#{}", "x".repeat(3 << 20))).unwrap_err();
    assert!(e.contains("bytes"), "{e}");
}

#[test]
fn strings_too_long_for_the_wire_are_refused_by_validation() {
    let cookie = BASE.replace("port: 7100", &format!("port: 7100\n    cookie: {}", "c".repeat(100_000)));
    let e = parse(&cookie).unwrap_err();
    assert!(e.contains("spec.worker.cookie: is 100000 bytes long; at most 65535"), "{e}");
    let stream = BASE.replace("udp: {port: 5}", &format!("udp: {{port: 5, streamName: {}}}", "s".repeat(70_000)));
    let e = parse(&stream).unwrap_err();
    assert!(e.contains("spec.source.udp.streamName: is 70000 bytes long"), "{e}");
    let file = BASE.replace("udp: {port: 5}", &format!("file: {{path: /d/f, streamName: {}}}", "s".repeat(70_000)));
    assert!(parse(&file).unwrap_err().contains("spec.source.file.streamName"));
    assert_eq!(parse(&BASE.replace("port: 7100", &format!("port: 7100\n    cookie: {}", "c".repeat(65_535)))), Ok(1));
}

/// xorshift64*: a few lines, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let values = [
        "\"7100\"",
        "-1",
        "99999999999999999999",
        "true",
        "[]",
        "{}",
        "~",
        "''",
        "0",
        "1.5",
        "!!binary aGk=",
        "*nothing",
        "&a x",
        "\"\\u0000\"",
        "{a: [b, {c: d}]}",
        "'[[[['",
        "yes",
        "0x10",
    ];
    for _ in 0..1 + rng.below(3) {
        let n = lines.len();
        let at = rng.below(n);
        match rng.below(12) {
            0 => {
                lines.remove(at);
                if lines.is_empty() {
                    lines.push(String::new());
                }
            }
            1 => {
                let l = lines[at].clone();
                lines.insert(at, l);
            }
            2 => lines.swap(at, rng.below(n)),
            3 | 4 => {
                // Replace a value.
                if let Some(colon) = lines[at].find(": ") {
                    let v = rng.pick(&values).to_string();
                    lines[at].truncate(colon + 2);
                    lines[at].push_str(&v);
                }
            }
            5 => {
                let l = &mut lines[at];
                if rng.below(2) == 0 {
                    l.insert(0, ' ');
                } else if l.starts_with(' ') {
                    l.remove(0);
                }
            }
            6 => {
                let junk =
                    rng.pick(&["\t", ":", "- ", "[", "{", "}", "]", "#", "'", "\"", "&", "*", "!", "|", ">", "%"]);
                let l = &mut lines[at];
                let mut pos = rng.below(l.len() + 1);
                while !l.is_char_boundary(pos) {
                    pos -= 1;
                }
                l.insert_str(pos, junk);
            }
            7 => lines.insert(at, rng.pick(&["---", "...", "%YAML 1.2", "\u{feff}", "kind: Secret", ""]).to_string()),
            8 => {
                // A long string where a short one is expected.
                if let Some(colon) = lines[at].find(": ") {
                    let len = [10, 1000, 70_000, 100_000][rng.below(4)];
                    lines[at].truncate(colon + 2);
                    lines[at].push_str(&"z".repeat(len));
                }
            }
            9 => {
                // Deep nesting in place of a value.
                if let Some(colon) = lines[at].find(": ") {
                    let depth = [10, 100, 1000, 100_000][rng.below(4)];
                    let open = rng.pick(&["[", "{a: ", "- "]);
                    lines[at].truncate(colon + 2);
                    lines[at].push_str(&open.repeat(depth));
                }
            }
            10 => {
                // Rename a key (a typo or a wrong case).
                if let Some(colon) = lines[at].find(':') {
                    let key_start = lines[at].len() - lines[at].trim_start().len();
                    if key_start < colon {
                        lines[at].insert(colon, 'X');
                    }
                }
            }
            _ => {
                let total: usize = lines.iter().map(|l| l.len() + 1).sum();
                let mut cut = rng.below(total);
                let joined = lines.join("\n");
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                lines = joined[..cut].lines().map(str::to_string).collect();
                if lines.is_empty() {
                    lines.push(String::new());
                }
            }
        }
    }
    lines.join("\n") + "\n"
}

fn examples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/connectors");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    out.sort();
    out.push(("base".into(), BASE.into()));
    out
}

#[test]
fn fuzzed_manifests_never_panic_finish_fast_and_name_a_field_or_a_line() {
    let seed: u64 = std::env::var("MANIFEST_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_cafe);
    let cases: usize = std::env::var("MANIFEST_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let examples = examples();
    for (name, text) in &examples {
        // The examples themselves stay valid.
        assert!(parse(text).is_ok(), "{name}: {:?}", parse(text));
    }
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let (mut rejected, mut unnamed) = (0, Vec::new());
    for case in 0..cases {
        // Bounded in time as well as in cases, so a slow machine finishes too.
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let (name, base) = &examples[rng.below(examples.len())];
        let text = mutate(&mut rng, base);
        let t = Instant::now();
        let result = std::panic::catch_unwind(|| parse_connectors(&text, "fuzz.yaml"));
        let elapsed = t.elapsed();
        let result = result.unwrap_or_else(|_| panic!("case {case} (seed {seed}, from {name}) panicked:\n{text}"));
        assert!(elapsed < LIVENESS, "case {case} (seed {seed}) took {elapsed:?}:\n{}", &text[..text.len().min(2000)]);
        if let Err(e) = result {
            rejected += 1;
            let msg = e.to_string();
            if std::env::var("MANIFEST_FUZZ_PRINT").is_ok() {
                eprintln!("REJECTED {}", &msg[..msg.len().min(300)]);
            }
            if !names_field_or_line(&msg) {
                unnamed.push(format!("{msg}\n--- from {name}:\n{}", &text[..text.len().min(2000)]));
            }
            // Read errors cannot happen here; every other variant has a field or a place.
            assert!(!matches!(e, ManifestError::Read { .. }));
        }
    }
    assert!(rejected > 0, "the mutator produces broken manifests");
    assert!(unnamed.is_empty(), "{} rejections name neither a field nor a line, e.g.:\n{}", unnamed.len(), unnamed[0]);
}

#[test]
fn limit_settings_are_validated_by_field() {
    let cases = [
        (BASE.replace("udp: {port: 5}", "file: {path: /d/f, maxRecordBytes: 0}"), "spec.source.file.maxRecordBytes"),
        (
            BASE.replace("udp: {port: 5}", "file: {path: /d/f, maxRecordBytes: 16777190}"),
            "spec.source.file.maxRecordBytes: must be between 1 and 16777189",
        ),
        (BASE.replace("udp: {port: 5}", "udp: {port: 5, bufferBytes: 100}"), "spec.source.udp.bufferBytes"),
        (BASE.replace("udp: {port: 5}", "udp: {port: 5, buffer: 0}"), "spec.source.udp.buffer"),
        (format!("{BASE}  admin: {{maxConnections: 0}}\n"), "spec.admin.maxConnections: must be at least 1"),
        (format!("{BASE}  admin: {{host: pod.local}}\n"), "spec.admin.host: \"pod.local\" is not an IP address"),
        (format!("{BASE}  admin: {{headerReadTimeoutSeconds: 0}}\n"), "spec.admin.headerReadTimeoutSeconds"),
        (
            BASE.replace("udp: {port: 5}", "{}").replace(
                "  source:\n    {}",
                "  sink:\n    postgres: {url: postgres://h/d, table: t, maxConnections: 0, idleTimeoutSeconds: 0}",
            ),
            "spec.sink.postgres.maxConnections",
        ),
    ];
    for (text, want) in cases {
        let e = parse(&text).unwrap_err();
        assert!(e.contains(want), "{want:?} missing in {e}");
    }
    let ok = format!("{BASE}  admin: {{host: 127.0.0.1, maxConnections: 8, connectionTimeoutSeconds: 5}}\n");
    assert_eq!(parse(&ok), Ok(1));
}

#[test]
fn the_json_the_operator_passes_still_parses() {
    for (name, text) in examples() {
        let parsed = parse_connectors(&text, &name).unwrap();
        for c in parsed {
            let json = serde_json::to_string(&c).unwrap();
            let back = parse_connectors(&json, "$WALLAROO_CONNECTOR").unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(back[0].spec, c.spec);
        }
    }
}
