//! Prints the Connector CRD as YAML (`cargo run -p wallaroo-crds --bin crdgen > crds/connector.yaml`).
fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", wallaroo_crds::crd_yaml()?);
    Ok(())
}
