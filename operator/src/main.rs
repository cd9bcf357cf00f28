fn main() -> anyhow::Result<()> {
    anyhow::bail!("wallaroo-connector-operator: not built yet")
}
