# pgvigil container image: a static-ish release build on Debian, run as an unprivileged user.
#   docker build -t pgvigil .
#   docker run -p 9187:9187 -e DATA_SOURCE_NAME=postgresql://pgvigil@db:5432/postgres pgvigil
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY queries ./queries
RUN cargo build --release --locked --bin pgvigil

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pgvigil \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pgvigil
COPY --from=build /src/target/release/pgvigil /usr/local/bin/pgvigil
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Inside a container the exporter must listen on all interfaces to be scraped.
ENV PGVIGIL_LISTEN=0.0.0.0:9187
EXPOSE 9187
# The slim image has no curl: pgvigil asks its own /healthz (over HTTPS when the
# web_config_file says so).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/pgvigil", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/pgvigil"]
