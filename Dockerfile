# The cdp server as a container image: `docker build -t cdp .`
# Serves on 0.0.0.0:8080 with its data (SQLite file, generated secrets, mailbox folder) in the
# /data volume; set CDP_DATABASE_URL for PostgreSQL and CDP_SMTP_URL for mail (compose.yaml does).
# CI does not build this image; see docs/operations.md, "Docker".

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --bin cdp

FROM debian:bookworm-slim
# ca-certificates: TLS to PostgreSQL, SMTP and webhook receivers checks against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin cdp \
 && mkdir /data \
 && chown cdp:cdp /data
COPY --from=builder /src/target/release/cdp /usr/local/bin/cdp
USER cdp:cdp
ENV CDP_LISTEN=0.0.0.0:8080 \
    CDP_DATA_DIR=/data
VOLUME /data
EXPOSE 8080
# The slim image has no curl or wget; bash's /dev/tcp asks GET /healthz over plain HTTP.
# With CDP_TLS_CERT set the listener speaks only HTTPS: replace or disable this check then.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["cdp"]
CMD ["serve"]
