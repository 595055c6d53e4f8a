#!/usr/bin/env python3
"""Paired A/B rounds of two builds of the whole stack: the cost of a change
to the services (or the gateway) on the order path.

A variant is a directory holding `gateway`, `user-service`,
`product-service` and `order-service` (a saved release build), and what
its services' environment adds (`--a-env`/`--b-env`). Both stacks run at
once, each with its own databases and gateway, started before the first
round and kept to the end (an idle stack costs nothing). Each pair of
rounds loads A then B, or B then A (alternating), with the same oha load
(`POST /api/orders` through the gateway, one line, plenty of stock, or
`--path` for a GET); the figures compared are ratios B/A within a pair,
so the machine's drift between pairs cancels out.

Prints, and saves in bench/results/stack-ab-<label>-<time>.json: per pair
the CPU microseconds per request of all four processes (and of each, from
/proc), req/s and p99, and the median of the per-pair ratios with how many
pairs B won.

  bench/stack_ab.sh --a-dir /tmp/before --b-dir target/release --label rusqlite
  bench/stack_ab.sh --a-dir target/release --b-dir target/release --b-env RUST_LOG=warn --label logs
"""

import argparse
import os
import statistics
import sys

import bench


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for side in ("a", "b"):
        parser.add_argument(f"--{side}-dir", default=bench.RELEASE, help=f"the binaries of {side.upper()}")
        parser.add_argument(f"--{side}-env", action="append", default=[],
                            help="NAME=VALUE in the services' environment (repeatable)")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=3, help="length of each oha run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="gateway workers")
    parser.add_argument("--path", default=None,
                        help="GET this path through the gateway instead of placing orders ({product}: the product's id)")
    parser.add_argument("--label", default="stack", help="names the results file")
    parser.add_argument("--smoke", action="store_true", help="one short pair (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.seconds = 1, 1
    bench.OHA_JSON = bench.oha_json_flag()
    os.makedirs(bench.WORK, exist_ok=True)
    os.makedirs(bench.RESULTS, exist_ok=True)

    def load(stack, seconds):
        if args.path:
            url = stack["base"] + args.path.replace("{product}", str(stack["product"]["id"]))
            return lambda: bench.oha(url, args.connections, seconds)
        return lambda: bench.oha(f"{stack['base']}/api/orders", args.connections, seconds, method="POST",
                                 body=stack["order"], headers=["content-type: application/json"])

    procs = bench.Processes()
    pairs = []
    try:
        stacks = {}
        for side in ("a", "b"):
            saved = dict(os.environ)
            os.environ.update(item.split("=", 1) for item in getattr(args, f"{side}_env"))
            try:
                stacks[side] = bench.start_stack(procs, args, getattr(args, f"{side}_dir"), name=f"ab-{side}")
            finally:
                os.environ.clear()
                os.environ.update(saved)
        for stack in stacks.values():  # warm-up
            load(stack, 1)()
        for pair in range(args.pairs):
            order = ("a", "b") if pair % 2 == 0 else ("b", "a")
            results = {}
            for side in order:
                results[side] = bench.measured_each(load(stacks[side], args.seconds), stacks[side]["pids"])
            pairs.append(bench.pair(results["a"], results["b"]))
            a, b, ratio = pairs[-1]["a"], pairs[-1]["b"], pairs[-1]["ratio"]
            each = lambda r: " ".join(f"{v:.0f}" for v in r["cpu_us_per_request_by_process"].values())
            bench.log(f"pair {pair + 1:>2}: A {a['rps']:>7.0f}/s {a['cpu_us_per_request']:>6.1f} us ({each(a)}) "
                      f"p99 {a['p99_us'] / 1000:>5.1f} ms | B {b['rps']:>7.0f}/s {b['cpu_us_per_request']:>6.1f} us ({each(b)}) "
                      f"p99 {b['p99_us'] / 1000:>5.1f} ms | B/A cpu x{ratio['cpu']:.3f} rps x{ratio['rps']:.3f} "
                      f"p99 x{ratio['p99']:.3f}  failed {a['failed']}+{b['failed']}")
    finally:
        procs.stop()

    processes = list(pairs[0]["a"]["cpu_us_per_request_by_process"])
    summary = bench.pairs_summary(pairs)
    summary["processes"] = processes
    summary["cpu_ratio_by_process"] = {
        name: statistics.median(p["b"]["cpu_us_per_request_by_process"][name] / p["a"]["cpu_us_per_request_by_process"][name]
                                for p in pairs if p["a"]["cpu_us_per_request_by_process"][name])
        # Processes the load does not reach (users for a GET of a
        # product) only answer health checks: no ratio.
        for name in processes
        if statistics.median(p["a"]["cpu_us_per_request_by_process"][name] for p in pairs) >= 1.0
    }
    bench.report_pairs(summary, ", ".join(f"{k} x{v:.3f}" for k, v in summary["cpu_ratio_by_process"].items()))
    if not args.smoke:
        bench.save_pairs("stack-ab", args, summary, pairs)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
