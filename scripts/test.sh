#!/usr/bin/env bash
# The project's test command: installs what the build needs, runs every
# test of the workspace (unit, in-process, end-to-end on loopback), then
# fuzzes every OpenAPI document against a running stack (schemathesis).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
cargo build --locked --bins
exec python3 scripts/contract-fuzz.py
