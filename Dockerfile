# signpost: one static-ish binary (controller and router) on a distroless,
# non-root base. Build: docker build -t signpost:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild the AWS SDK crates.
# (benches/ only because Cargo.toml declares a bench target; it is not built.)
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && install -D target/release/signpost /out/signpost

# glibc + libgcc, no shell, no package manager; uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/signpost /usr/local/bin/signpost
USER 65532:65532
EXPOSE 7070
ENTRYPOINT ["/usr/local/bin/signpost"]
CMD ["controller", "--listen", "0.0.0.0:7070"]
