# One image with every binary of the workspace; docker-compose.yml runs each
# process from it with a different command.
#
# Build stage: the Rust toolchain plus cmake (Pingora's zlib-ng needs it).
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/gateway target/release/user-service target/release/product-service \
       target/release/order-service /out/

# Runtime stage: a small Debian with curl for the health checks.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --create-home app \
 && mkdir -p /data/users /data/products /data/orders \
 && chown -R app /data
COPY --from=build /out/ /usr/local/bin/
USER app
WORKDIR /data
