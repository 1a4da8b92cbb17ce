//! Compiles the wire contract in proto/ with a vendored protoc, so that a fresh
//! machine needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &["proto/quotad/v1/gate.proto", "proto/quotad/v1/admin.proto"],
        &["proto"],
    )?;
    Ok(())
}
