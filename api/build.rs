fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/persys/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Ordered maps make the encoding of a spec deterministic, so its hash
        // (the derived revision and the runtime's spec-hash label) is stable.
        .btree_map(".")
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .type_attribute(
            "persys.agent.v1.WorkloadSpec.spec",
            "#[serde(rename_all = \"snake_case\")]",
        )
        .file_descriptor_set_path(out_dir.join("persys_agent_v1_descriptor.bin"))
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
