#!/usr/bin/env python3
"""Contract fuzzing: schemathesis against every service's /openapi.json and
the gateway's merged one, on a whole local stack started for the run.

The stack is `target/debug/stack` on free loopback ports, with its own
nats-server and SQLite files in a temporary directory. schemathesis (pinned
below) lives in a virtualenv under target/; it is installed on first use.
Each document gets a bounded time budget (`--max-time`); the run fails if
any check fails on any of them.

Every check runs; scripts/schemathesis.toml says, per operation, which
statuses a request that fits the document may still meet (and why).

  scripts/contract-fuzz.py                 # 20 s per document
  scripts/contract-fuzz.py --max-time 120  # longer
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = "schemathesis==4.32.5"
SPEC_VALIDATOR = "openapi-spec-validator==0.7.2"
PACKAGES = [SCHEMATHESIS, SPEC_VALIDATOR]
VENV = ROOT / "target" / "schemathesis-venv"

# Every check runs; scripts/schemathesis.toml lists, per operation, the
# statuses a schema-valid request may still meet and why.
CONFIG = ROOT / "scripts" / "schemathesis.toml"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_schemathesis():
    st = VENV / "bin" / "st"
    marker = VENV / "installed"
    if st.exists() and marker.exists() and marker.read_text() == " ".join(PACKAGES):
        return st
    if VENV.exists():
        shutil.rmtree(VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *PACKAGES],
        check=True,
    )
    marker.write_text(" ".join(PACKAGES))
    return st


def gateway_yaml(ports):
    return f"""listen: "127.0.0.1:{ports['gateway']}"
admin_listen: "127.0.0.1:{ports['admin']}"
health_check: {{ path: /health, interval: 1s, timeout: 500ms }}
services:
  user-service:
    instances: ["127.0.0.1:{ports['user-service']}"]
  product-service:
    instances: ["127.0.0.1:{ports['product-service']}"]
  order-service:
    instances: ["127.0.0.1:{ports['order-service']}"]
    timeouts: {{ connect: 1s, read: 10s }}
routes:
  - {{ prefix: /api/users,    service: user-service,    strip_prefix: /api }}
  - {{ prefix: /api/products, service: product-service, strip_prefix: /api }}
  - {{ prefix: /api/orders,   service: order-service,   strip_prefix: /api }}
"""


def wait_for(url, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def valid_openapi_31(url):
    """Validates the document at `url` against the OpenAPI 3.1 schema
    (openapi-spec-validator, in the virtualenv)."""
    check = (
        "import json, sys, urllib.request\n"
        "from openapi_spec_validator import validate\n"
        "from openapi_spec_validator.validation import OpenAPIV31SpecValidator\n"
        "doc = json.load(urllib.request.urlopen(sys.argv[1], timeout=10))\n"
        "assert doc['openapi'].startswith('3.1'), doc['openapi']\n"
        "validate(doc, cls=OpenAPIV31SpecValidator)\n"
        "print('valid OpenAPI', doc['openapi'], '-', len(doc['paths']), 'paths')\n"
    )
    return subprocess.run([str(VENV / "bin" / "python"), "-c", check, url], stdin=subprocess.DEVNULL).returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", type=int, default=20, help="seconds per document")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"))
    args = parser.parse_args()

    st = ensure_schemathesis()
    ports = {name: free_port() for name in ["gateway", "admin", "user-service", "product-service", "order-service", "nats", "nats-monitor"]}
    work = Path(tempfile.mkdtemp(prefix="contract-fuzz-"))
    (work / "gateway.yaml").write_text(gateway_yaml(ports))
    log = open(work / "stack.log", "wb")
    stack = subprocess.Popen(
        [
            str(Path(args.bin_dir) / "stack"),
            "--config", str(work / "gateway.yaml"),
            "--data-dir", str(work / "data"),
            "--bin-dir", args.bin_dir,
            "--nats-port", str(ports["nats"]),
            "--nats-monitor-port", str(ports["nats-monitor"]),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    failed = []
    try:
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        if not wait_for(f"{gateway}/health", 90):
            print((work / "stack.log").read_text(errors="replace")[-4000:])
            sys.exit("contract-fuzz: the stack did not become healthy")
        documents = [(name, f"http://127.0.0.1:{ports[name]}/openapi.json") for name in ["user-service", "product-service", "order-service"]]
        documents.append(("gateway (merged)", f"{gateway}/openapi.json"))
        for name, url in documents:
            print(f"\n=== OpenAPI 3.1 validation: {name} {url}", flush=True)
            if not valid_openapi_31(url):
                failed.append(f"{name} (not valid OpenAPI 3.1)")
        for name, url in documents:
            print(f"\n=== schemathesis: {name} {url} ({args.max_time} s)", flush=True)
            argv = [
                str(st), "--config-file", str(CONFIG), "run", url,
                "--checks", "all",
                "--max-time", str(args.max_time),
                "--request-timeout", "10",
                "--workers", "1",
                "--no-color",
            ]
            # Its cache (.schemathesis/, for `st replay`) goes to the work
            # directory, which is kept when something fails.
            if subprocess.run(argv, stdin=subprocess.DEVNULL, cwd=work).returncode != 0:
                failed.append(name)
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack.kill()
        log.close()
    if failed:
        print(f"\ncontract-fuzz: failures in {', '.join(failed)}; the stack's log and schemathesis's cache are in {work}")
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
    print("\ncontract-fuzz: every document passed every check")


if __name__ == "__main__":
    main()
