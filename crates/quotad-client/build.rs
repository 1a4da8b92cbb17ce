//! Compiles the gate's wire contract from the repository's proto/ (the same
//! file the server compiles) with a vendored protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../../proto/quotad/v1/gate.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../../proto/quotad/v1/gate.proto"], &["../../proto"])?;
    Ok(())
}
