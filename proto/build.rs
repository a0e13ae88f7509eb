//! Compiles `meridian/v1/*.proto` into Rust types, tonic clients and servers, and a descriptor set
//! for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "meridian/v1/function.proto",
        "meridian/v1/mesh.proto",
        "meridian/v1/agent.proto",
        "meridian/v1/local.proto",
        "meridian/v1/scale.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // No transport helpers: their `connect` constructor would clash with the `Connect` RPC of
    // AgentService. Clients are built with `Client::new(channel)` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("meridian_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
