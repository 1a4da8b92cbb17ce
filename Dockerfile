# syntax=docker/dockerfile:1
# Build: docker build -t quotad .
# Run:   docker run -p 50051:50051 -p 9464:9464 -v quotad-data:/var/lib/quotad -e QUOTAD_AUTH_KEY=... quotad

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# protoc is vendored by the build script: no system package needed.
COPY Cargo.toml Cargo.lock clippy.toml ./
# Every crate of the workspace (cargo reads them all); the protos are in crates/quotad-proto.
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p quotad -p quotactl -p quotad-bench --bins \
 && mkdir -p /out \
 && cp target/release/quotad target/release/quotactl target/release/quotad-bench /out/

FROM debian:bookworm-slim AS runtime
RUN groupadd --system quotad \
 && useradd --system --gid quotad --home-dir /var/lib/quotad --shell /usr/sbin/nologin quotad \
 && mkdir -p /var/lib/quotad \
 && chown quotad:quotad /var/lib/quotad
COPY --from=build /out/ /usr/local/bin/
USER quotad
WORKDIR /var/lib/quotad
VOLUME ["/var/lib/quotad"]
# Inside a container the ports must listen on all interfaces.
ENV QUOTAD_GRPC_ADDR=0.0.0.0:50051 \
    QUOTAD_METRICS_ADDR=0.0.0.0:9464 \
    QUOTAD_DATA_DIR=/var/lib/quotad \
    QUOTAD_LOG=info
# The gateways' rate limit listener takes no tokens, so it stays on the
# container's loopback unless told otherwise: with the gateway on a network
# of its own, set QUOTAD_RLS_ADDR=0.0.0.0:8081 and QUOTAD_RLS_ALLOW_PUBLIC=true
# (README, "Behind an AI gateway"); its domains come from the config file.
EXPOSE 50051 9464 8081
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/quotad"]
CMD ["serve"]
