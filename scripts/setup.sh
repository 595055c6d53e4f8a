#!/usr/bin/env bash
# Installs the system tools the build needs, if they are missing, on Debian
# or Ubuntu. Idempotent: does nothing when everything is there.
#   cmake: Pingora's zlib-ng build (every Pingora feature set needs it), and
#          aws-lc (JWT signatures, TLS to a JWKS URL).
#   nats-server: the message broker of the order events (JetStream); the
#          tests start their own on loopback, scripts/run.sh one in data/nats.
#   prometheus: promtool (CI checks the scrape config, the alert rules and
#          their unit tests, and every /metrics exposition) and the server
#          the observability tests scrape with.
#   etcd-server: the service registry (issue 20); the tests start their own
#          on loopback, scripts/run.sh --registry one in data/etcd.
#   protobuf-compiler: protoc, which etcd-client's build compiles etcd's
#          gRPC definitions with.
#   python3 with venv: the benchmarks, and scripts/contract-fuzz.py, which
#          installs schemathesis into target/schemathesis-venv (from PyPI).
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
{ command -v python3 >/dev/null 2>&1 && python3 -c 'import ensurepip, venv' >/dev/null 2>&1; } || need+=(python3 python3-venv)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || need+=(prometheus)

if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: please install ${need[*]} with your package manager" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install ${need[*]}" >&2; exit 1; }
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: the Rust toolchain is required: https://rustup.rs" >&2
    exit 1
fi
