#!/usr/bin/env bash
# Runs the whole system: installs what the build needs, builds the release
# binaries once, then starts user-service, two product-service instances,
# order-service and the gateway on the ports in gateway.yaml (data in
# ./data). Ctrl-C stops everything. Extra arguments go to `stack`
# (see `target/release/stack --help`); `scripts/run.sh --registry` runs the
# same system on a local etcd (gateway.registry.yaml), and
# `target/release/stack add product-service 2` adds instances to it live.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bins --workspace --exclude gateway-example-request-counter
exec target/release/stack "$@"
