# autonomous-runner: build with cargo, run as a non-root user on a slim base.
# Kubernetes probes (/health/live, /health/ready) replace a HEALTHCHECK.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The manifest names the bench targets, so their sources come along (only the binary is built).
COPY Cargo.toml Cargo.lock clippy.toml rustfmt.toml build.rs ./
# The history schema is compiled into the binary (sqlx::migrate!).
COPY migrations ./migrations
COPY migrations_postgres ./migrations_postgres
COPY src ./src
COPY assets ./assets
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin autonomous-runner \
    && strip target/release/autonomous-runner

FROM debian:bookworm-slim
# CA certificates for HTTPS to OpenRouter/Coinbase and rediss://. Debian's stable archive only
# ships security fixes for these, so the version is deliberately not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin runner \
    && mkdir -p /var/lib/autonomous-runner \
    && chown 10001:10001 /var/lib/autonomous-runner
COPY --from=build /src/target/release/autonomous-runner /usr/local/bin/autonomous-runner
# The working directory is the runner's own: the SQLite history (./data) and the outbox
# journal beside it are written here (in Kubernetes an emptyDir is mounted over it).
WORKDIR /var/lib/autonomous-runner
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/autonomous-runner"]
CMD ["run"]
