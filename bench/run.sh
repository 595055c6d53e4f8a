#!/usr/bin/env bash
# Benchmark suite: the gateway against nginx, HAProxy and Caddy (same worker count,
# upstream keep-alive, each with its own backend), and the backend direct,
# in alternating rounds of one run; plus streaming, reload under load and the
# full stack. Installs what it needs (oha, nginx, HAProxy, Caddy, curl, python3),
# builds the release binaries, writes bench/results/*.json and BENCHMARKS.md.
#
#   bench/run.sh            the full suite (about 12 minutes)
#   bench/run.sh --smoke    every step for a second or so (CI)
#   bench/run.sh --help     options (rounds, durations, threads, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "bench: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v oha >/dev/null 2>&1; then
    echo "bench: installing oha (cargo install oha --locked, a few minutes)" >&2
    cargo install oha --locked
fi
export PATH="$HOME/.cargo/bin:/usr/sbin:$PATH"

if [[ " $* " == *" --smoke "* ]]; then
    # The smoke run checks that every step still works, not how fast: the
    # debug binaries CI has just built do.
    cargo build --locked --bins
    export BENCH_BIN_DIR=target/debug
else
    cargo build --release --locked --bins --workspace --exclude gateway-example-request-counter
fi
exec python3 bench/bench.py "$@"
