#!/usr/bin/env python3
"""Paired A/B rounds of two gateway variants: the cost of a change or a feature.

A variant is a gateway binary and what its configuration adds: top-level
lines (`--a-extra`), the route's plugin list (`--a-plugins`) and the
request's headers (`--a-header`). Each variant runs as its own process
with its own bench-hello backend, both started before the first round and
kept to the end. Each pair of rounds runs A then B, or B then A
(alternating), with the same oha load; the figures compared are ratios
B/A within a pair, so the machine's drift between pairs cancels out.

Prints, and saves in bench/results/ab-<label>-<time>.json: per pair the
CPU microseconds per request of the gateway process (from /proc), req/s
and p99, and the median of the per-pair ratios with how many pairs B won.

  bench/ab.sh --a-bin /tmp/gateway-before --label refactor
  bench/ab.sh --b-plugins '[{api_key: {...}}, {rate_limit: {...}}]' --b-header 'x-api-key: k' --label security
  bench/ab.sh --a-extra 'metrics: false' --label metrics
  bench/ab.sh --b-env 'OTEL_EXPORTER_OTLP_ENDPOINT={otlp}' --label otlp

`--a-env`/`--b-env` set the variant's environment; `{otlp}` in a value is
the address of an OTLP/HTTP sink this script runs (it answers every export
with 200 and counts the bytes), so span export can be measured.
"""

import argparse
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import bench

DEFAULT_PLUGINS = "[{headers: {response: {set: {x-served-by: bench}}}}]"


def config(port, admin, backend, threads, extra, plugins):
    pin = "worker_cpu_affinity: true\n" if bench.AFFINITY and "work_stealing: true" not in extra else ""
    return f"""listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
threads: {threads}
{pin}{extra}
health_check: {{ path: /health, interval: 1s, timeout: 500ms }}
services:
  hello:
    instances: ["127.0.0.1:{backend}"]
routes:
  - prefix: /
    service: hello
    plugins: {plugins}
"""


class OtlpSink(BaseHTTPRequestHandler):
    """Takes OTLP/HTTP exports and throws them away (counting them)."""

    exports = 0
    received = 0

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length)
        OtlpSink.exports += 1
        OtlpSink.received += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


def start_sink():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def start_variant(procs, name, binary, args, extra, plugins, variant_env):
    backend = bench.start_backend(procs, f"backend-{name}", args.backend_threads)
    port, admin = bench.free_port(), bench.free_port()
    path = os.path.join(bench.WORK, "conf", f"ab-{name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(config(port, admin, backend, args.threads, extra, plugins))
    env = dict(os.environ, RUST_LOG=args.gateway_log, **variant_env)
    proc = procs.start(f"gateway-{name}", [binary, "--config", path], env=env)
    bench.wait_http(f"http://127.0.0.1:{port}/health")
    return port, proc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    release = os.path.join(bench.RELEASE, "gateway")
    for side in ("a", "b"):
        parser.add_argument(f"--{side}-bin", default=release, help=f"gateway binary of {side.upper()}")
        parser.add_argument(f"--{side}-extra", default="", help="top-level gateway.yaml lines (\\n between)")
        parser.add_argument(f"--{side}-plugins", default=DEFAULT_PLUGINS, help="the route's plugins, as YAML")
        parser.add_argument(f"--{side}-header", action="append", default=[], help="a request header (repeatable)")
        parser.add_argument(f"--{side}-env", action="append", default=[],
                            help="NAME=VALUE in the gateway's environment (repeatable; {otlp}: the sink)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=3, help="length of each oha run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="gateway workers")
    parser.add_argument("--backend-threads", type=int, default=1)
    parser.add_argument("--path", default="/", help="request path")
    parser.add_argument("--gateway-log", default="info", help="RUST_LOG of the gateways (info: access log on)")
    parser.add_argument("--no-affinity", dest="affinity", action="store_false", help="leave the workers unpinned")
    parser.add_argument("--label", default="ab", help="names the results file")
    parser.add_argument("--smoke", action="store_true", help="one short pair (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.seconds = 1, 1
    bench.OHA_JSON = bench.oha_json_flag()
    bench.AFFINITY = args.affinity
    os.makedirs(bench.WORK, exist_ok=True)
    os.makedirs(bench.RESULTS, exist_ok=True)

    procs = bench.Processes()
    pairs = []
    sink = None
    try:
        sides = {}
        for side in ("a", "b"):
            extra = getattr(args, f"{side}_extra").replace("\\n", "\n")
            variant_env = {}
            for item in getattr(args, f"{side}_env"):
                key, _, value = item.partition("=")
                if "{otlp}" in value and sink is None:
                    sink = start_sink()
                variant_env[key] = value.replace("{otlp}", sink[1]) if sink else value
            port, proc = start_variant(procs, side, getattr(args, f"{side}_bin"), args, extra,
                                       getattr(args, f"{side}_plugins"), variant_env)
            sides[side] = (port, proc.pid, getattr(args, f"{side}_header"))
        for port, _, headers in sides.values():  # warm-up
            bench.oha(f"http://127.0.0.1:{port}{args.path}", args.connections, 1, headers=headers)
        for pair in range(args.pairs):
            order = ("a", "b") if pair % 2 == 0 else ("b", "a")
            results = {}
            for side in order:
                port, pid, headers = sides[side]
                url = f"http://127.0.0.1:{port}{args.path}"
                results[side] = bench.measured(
                    lambda: bench.oha(url, args.connections, args.seconds, headers=headers), [pid])
            pairs.append(bench.pair(results["a"], results["b"]))
            a, b, ratio = pairs[-1]["a"], pairs[-1]["b"], pairs[-1]["ratio"]
            bench.log(f"pair {pair + 1:>2}: A {a['rps']:>8.0f} req/s {a['cpu_us_per_request']:>5.1f} us/req "
                      f"p99 {a['p99_us']:>6.0f} us | B {b['rps']:>8.0f} req/s {b['cpu_us_per_request']:>5.1f} us/req "
                      f"p99 {b['p99_us']:>6.0f} us | B/A cpu x{ratio['cpu']:.3f} rps x{ratio['rps']:.3f} "
                      f"p99 x{ratio['p99']:.3f}  failed {a['failed']}+{b['failed']}")
    finally:
        procs.stop()
        if sink:
            sink[0].shutdown()
            bench.log(f"OTLP sink: {OtlpSink.exports} exports, {OtlpSink.received} bytes")

    summary = bench.pairs_summary(pairs)
    summary["otlp_exports"] = OtlpSink.exports
    summary["otlp_bytes"] = OtlpSink.received
    bench.report_pairs(summary)
    if not args.smoke:
        bench.save_pairs("ab", args, summary, pairs)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
