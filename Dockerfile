# signpost: one binary (controller, router) on a distroless, non-root base.
# Build: docker build -t signpost:0.1.0 .
# The binary is stripped (profile.release); for a crash report's symbols,
# build the same commit with `--profile release-debug` (README, Packaging).
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild the AWS SDK crates:
# the workspace's manifests with empty sources, built once.
# (benches/ only because Cargo.toml declares bench targets; not built.)
COPY Cargo.toml Cargo.lock ./
COPY crates/protocol/Cargo.toml crates/protocol/
COPY crates/controller/Cargo.toml crates/controller/
COPY crates/router/Cargo.toml crates/router/
COPY benches ./benches
RUN mkdir -p src crates/protocol/src crates/controller/src crates/router/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch crates/protocol/src/lib.rs crates/controller/src/lib.rs crates/router/src/lib.rs \
    && cargo build --release --locked -p signpost \
    && rm -rf src crates/*/src
COPY src ./src
COPY crates ./crates
RUN touch src/main.rs crates/*/src/lib.rs && cargo build --release --locked -p signpost \
    && install -D target/release/signpost /out/signpost

# glibc + libgcc, no shell, no package manager; uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/signpost /usr/local/bin/signpost
USER 65532:65532
EXPOSE 7070
ENTRYPOINT ["/usr/local/bin/signpost"]
# Off loopback the controller refuses to start without TLS and
# authentication (README.md, "Security"): run it with a --config that sets
# [tls] (the chart does), or insecure_plaintext = true.
CMD ["controller", "--listen", "0.0.0.0:7070"]
