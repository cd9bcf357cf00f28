//! `spec.volumeMounts`: checked field by field, and used to place the file connectors' paths.
use wallaroo_crds::parse_connectors;

fn connector(mounts: &str, sink_dir: &str) -> String {
    format!(
        "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: out}}\nspec:\n  connectorName: out\n  \
         worker: {{port: 7200}}\n  sink: {{file: {{dir: {sink_dir}}}}}\n  volumeMounts: {mounts}\n"
    )
}

#[test]
fn bad_mounts_name_the_field_and_the_fix() {
    let yaml = connector(
        "[{name: '', mountPath: data}, {name: a, mountPath: /x, subPath: ../etc}, {name: b, mountPath: /x/}, {name: c, mountPath: /x}]",
        "/x/out",
    );
    let err = parse_connectors(&yaml, "t.yaml").expect_err("invalid").to_string();
    for want in [
        "spec.volumeMounts[0].name: must not be empty",
        "spec.volumeMounts[0].mountPath: \"data\" must be an absolute path",
        "spec.volumeMounts[1].subPath: must be a relative path inside the volume",
        "spec.volumeMounts[3].mountPath: /x is mounted twice",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
}

#[test]
fn paths_are_matched_by_component_not_by_string_prefix() {
    let yaml = connector("[{name: results, mountPath: /out/}]", "/out/ledger");
    let c = parse_connectors(&yaml, "t.yaml").expect("valid").remove(0);
    assert_eq!(c.spec.local_paths(), [("spec.sink.file.dir", "/out/ledger")]);
    assert_eq!(c.spec.mount_for("/out/ledger").map(|m| m.name.as_str()), Some("results"));
    assert_eq!(c.spec.mount_for("/out").map(|m| m.name.as_str()), Some("results"));
    assert!(c.spec.mount_for("/output/ledger").is_none());
}

#[test]
fn mounts_leave_the_spec_hash_of_existing_connectors_alone() {
    let with = parse_connectors(&connector("[]", "/x"), "t.yaml").expect("valid").remove(0);
    let without = parse_connectors(&connector("[]", "/x").replace("  volumeMounts: []\n", ""), "t.yaml")
        .expect("valid")
        .remove(0);
    assert_eq!(with.spec.spec_hash(), without.spec.spec_hash());
}
