#!/usr/bin/env bash
# Paired A/B rounds of two gateway variants (bench/ab.py --help): installs oha
# if missing, builds the release binaries (B defaults to this tree's gateway),
# then runs the pairs.
#
#   bench/ab.sh --a-bin /tmp/gateway-before --label refactor
#   bench/ab.sh --smoke        one short pair (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v oha >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/oha" ]; then
    echo "bench: installing oha (cargo install oha --locked, a few minutes)" >&2
    cargo install oha --locked
fi
export PATH="$HOME/.cargo/bin:$PATH"
if [[ " $* " == *" --smoke "* ]]; then
    cargo build --locked --bins
    export BENCH_BIN_DIR=target/debug
else
    cargo build --release --locked --bins --workspace --exclude gateway-example-request-counter
fi
exec python3 bench/ab.py "$@"
