//! Compiles the wire contracts in proto/ (quotad's own, Envoy's rate limit
//! service and Kuadrant's) with a vendored protoc, so that a fresh
//! machine needs no system protobuf compiler.
//!
//! The generated servers decode requests with `crate::codec::ValidatingCodec`,
//! which answers an undecodable body INVALID_ARGUMENT; the generated clients
//! keep tonic's own prost codec, so that a client that cannot decode a response
//! still says INTERNAL (the server's fault, not the caller's).
use prost_build::{Service, ServiceGenerator};

/// Clients from one generator, servers from another, in the order tonic's own
/// generator writes them (client, then server, for each service).
struct ClientsAndServers {
    clients: Box<dyn ServiceGenerator>,
    servers: Box<dyn ServiceGenerator>,
}

impl ServiceGenerator for ClientsAndServers {
    fn generate(&mut self, service: Service, buf: &mut String) {
        self.clients.generate(service.clone(), buf);
        self.servers.generate(service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.clients.finalize(buf);
        self.servers.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.clients.finalize_package(package, buf);
        self.servers.finalize_package(package, buf);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    let services = ClientsAndServers {
        clients: tonic_prost_build::configure()
            .build_server(false)
            .service_generator(),
        servers: tonic_prost_build::configure()
            .build_client(false)
            .codec_path("crate::codec::ValidatingCodec")
            .service_generator(),
    };
    let mut config = prost_build::Config::new();
    // `prost::Name` on every message, so that the codec can say which message
    // a request failed to decode as ("quotad.v1.ConsumeRequest").
    config.enable_type_names();
    config.service_generator(Box::new(services));
    // Every file's descriptors, for gRPC server reflection (grpcurl, Postman).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    config.file_descriptor_set_path(out_dir.join("quotad_descriptor.bin"));
    // No client or server here: with both off, tonic-prost-build keeps the
    // service generator set above and only adds its usual message settings.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_with_config(
            config,
            &[
                "proto/quotad/v1/gate.proto",
                "proto/quotad/v1/admin.proto",
                // The gateways' protocols, with their packages and field numbers.
                "proto/envoy/service/ratelimit/v3/rls.proto",
                "proto/kuadrant/service/ratelimit/v1/kuadrantrls.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
