//! The checked-in CRD YAML, and the chart's copy of it, must match what the types generate.
use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn crds_connector_yaml_is_current() {
    let generated = wallaroo_crds::crd_yaml().expect("render CRD");
    assert!(
        read("crds/connector.yaml") == generated,
        "crds/connector.yaml is stale: run `cargo run -p wallaroo-crds --bin crdgen > crds/connector.yaml`"
    );
}

#[test]
fn chart_ships_the_same_crd() {
    assert!(
        read("charts/wallaroo-connectors/crds/connector.yaml") == read("crds/connector.yaml"),
        "charts/wallaroo-connectors/crds/connector.yaml differs: cp crds/connector.yaml charts/wallaroo-connectors/crds/"
    );
}

#[test]
fn crd_has_status_columns_short_name_and_cel() {
    let crd = wallaroo_crds::crd();
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["wconn".to_string()][..]));
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    let cols: Vec<&str> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    for want in ["Direction", "Kind", "Ready", "Age"] {
        assert!(cols.contains(&want), "{cols:?}");
    }
    let schema = serde_json::to_string(&v.schema).expect("schema");
    assert!(schema.contains("x-kubernetes-validations") && schema.contains("has(self.source) != has(self.sink)"));
}
