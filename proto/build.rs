//! Compiles `proto/*.proto` with protox (pure Rust), so no `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/raft.proto",
        "proto/hub.proto",
        "proto/telemetry.proto",
        "proto/partition.proto",
        "proto/control.proto",
        "proto/region.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
