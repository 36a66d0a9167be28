fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/persys/agent/v1/agent.proto";
    let control = "proto/persys/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={control}");
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
    // The scheduler's service: the agent is its client; the server half is
    // what the tests' fake scheduler implements. Its own directory, as
    // lib.rs expects.
    //
    // Its times are google.protobuf.Timestamp. With well-known types left
    // uncompiled (tonic-prost-build's default, spelled out below), prost maps
    // every `.google.protobuf` type onto `::prost_types`, so the generated
    // code uses `prost_types::Timestamp`. protoc still has to read the
    // imported file, and Debian's protobuf-compiler ships without the
    // well-known .proto files (they are in libprotobuf-dev), so the one
    // needed is written next to the output and searched after ours.
    let control_out = out_dir.join("control");
    std::fs::create_dir_all(&control_out)?;
    let well_known = out_dir.join("well-known");
    let timestamp = well_known.join("google/protobuf/timestamp.proto");
    std::fs::create_dir_all(timestamp.parent().ok_or("no parent")?)?;
    std::fs::write(&timestamp, TIMESTAMP_PROTO)?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_well_known_types(false)
        .out_dir(control_out)
        .compile_protos(&[control.into()], &["proto".into(), well_known])?;
    Ok(())
}

/// google/protobuf/timestamp.proto as protobuf defines it, without its
/// comments and language options: only its name, package and fields reach
/// the generated code, and those map onto `prost_types::Timestamp`.
const TIMESTAMP_PROTO: &str = r#"syntax = "proto3";

package google.protobuf;

message Timestamp {
  int64 seconds = 1;
  int32 nanos = 2;
}
"#;
