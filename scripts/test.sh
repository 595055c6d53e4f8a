#!/usr/bin/env bash
# The project's test command: installs what the build needs, then runs every
# test of the workspace (unit, in-process, end-to-end on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo test --workspace --locked "$@"
