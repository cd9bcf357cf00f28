use super::*;

fn cfg() -> SelfManaged {
    SelfManaged {
        namespace: "wallaroo-system".into(),
        secret_name: "wallaroo-webhook-tls".into(),
        webhook_config: "wallaroo-connectors".into(),
        dns_names: SelfManaged::dns_names_for("wallaroo-webhook", "wallaroo-system"),
        ca_days: 3650,
        leaf_days: 365,
        renew_before: jiff::SignedDuration::from_hours(24 * 30),
        check_every: Duration::from_secs(3600),
    }
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

#[test]
fn fresh_install_creates_ca_and_leaf() {
    let m = plan(None, &cfg(), now()).expect("plan").expect("material");
    assert!(m.previous_ca.is_none());
    let secret = secret_for(&m, &cfg(), None);
    assert_eq!(secret.metadata.name.as_deref(), Some("wallaroo-webhook-tls"));
    assert_eq!(secret.data.as_ref().map(|d| d.len()), Some(4));
    assert!(plan(Some(&secret), &cfg(), now()).expect("plan").is_none(), "a valid secret is kept as is");
}

#[test]
fn leaf_is_renewed_near_expiry_with_the_same_ca() {
    let m = plan(None, &cfg(), now()).expect("plan").expect("material");
    let secret = secret_for(&m, &cfg(), None);
    let later = now() + jiff::SignedDuration::from_hours(24 * 340);
    let renewed = plan(Some(&secret), &cfg(), later).expect("plan").expect("renewed");
    assert_eq!(renewed.ca, m.ca, "CA kept, so the caBundle stays valid");
    assert_ne!(renewed.leaf.cert, m.leaf.cert);
}

#[test]
fn dns_name_change_reissues_the_leaf() {
    let m = plan(None, &cfg(), now()).expect("plan").expect("material");
    let secret = secret_for(&m, &cfg(), None);
    let mut other = cfg();
    other.dns_names = SelfManaged::dns_names_for("renamed", "wallaroo-system");
    let renewed = plan(Some(&secret), &other, now()).expect("plan").expect("reissued");
    assert_eq!(renewed.ca, m.ca);
    assert_ne!(renewed.leaf.cert, m.leaf.cert);
}

#[test]
fn ca_rotation_keeps_the_old_ca_in_the_bundle() {
    let m = plan(None, &cfg(), now()).expect("plan").expect("material");
    let secret = secret_for(&m, &cfg(), None);
    let near_ca_expiry = now() + jiff::SignedDuration::from_hours(24 * 3400);
    let rotated = plan(Some(&secret), &cfg(), near_ca_expiry).expect("plan").expect("rotated");
    assert_ne!(rotated.ca.cert, m.ca.cert);
    assert_eq!(rotated.previous_ca.as_deref(), Some(m.ca.cert.as_str()));
    assert!(rotated.ca_bundle().contains(&m.ca.cert) && rotated.ca_bundle().contains(&rotated.ca.cert));
}

#[test]
fn corrupt_secret_is_replaced() {
    let m = plan(None, &cfg(), now()).expect("plan").expect("material");
    let mut secret = secret_for(&m, &cfg(), None);
    if let Some(d) = secret.data.as_mut() {
        d.insert(TLS_KEY.into(), ByteString(b"garbage".to_vec()));
    }
    let fixed = plan(Some(&secret), &cfg(), now()).expect("plan").expect("reissued");
    assert_eq!(fixed.ca, m.ca);
    certs::certified_key(fixed.leaf.cert.as_bytes(), fixed.leaf.key.as_bytes()).expect("usable");
}

#[tokio::test]
async fn file_source_reloads_changed_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = FileSource {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        poll_every: Duration::from_millis(20),
    };
    let ca = certs::generate_ca(10).expect("ca");
    let a = certs::issue(&ca.key, &["a".into()], 1).expect("a");
    std::fs::write(&src.cert, &a.cert).expect("write");
    std::fs::write(&src.key, &a.key).expect("write");
    let store = Arc::new(ReloadableCert::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_files(src.clone(), store.clone(), stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.is_loaded() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = store.get().expect("loaded").cert.clone();
    // Ensure a different mtime even on coarse-grained file systems.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = certs::issue(&ca.key, &["b".into()], 1).expect("b");
    std::fs::write(&src.key, &b.key).expect("write");
    std::fs::write(&src.cert, &b.cert).expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.get().is_some_and(|k| k.cert == first) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(store.get().expect("loaded").cert, first, "new certificate picked up without restart");
    stop.cancel();
    task.await.expect("task");
}
