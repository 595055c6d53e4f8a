#!/usr/bin/env python3
"""User-space instructions per order in each service, counted by valgrind's
callgrind: a measure that does not move with the machine's load, for
changes too small for paired timing rounds to see (a few percent).

The three services run under callgrind (instrumentation off until the
warm-up is done), each with its own fresh database; orders are placed
directly at order-service on kept-alive connections (the gateway is not
in it: `--gateway` counts it), one at a time or `--clients N` at once.
One client at a time means every database write is a group of its own;
with several, writes queue and commit in groups, as under load (valgrind
runs one thread at a time, so the group sizes are its own, not the
machine's).
Counts only what runs in user space: system calls and the scheduler, a
good part of a service's time, are not in it (`bench/stack_ab.py`
measures those, with timing noise).

  bench/icount.py --bin-dir target/release --orders 200
  bench/icount.py --bin-dir /tmp/before --orders 200 --env RUST_LOG=warn
  bench/icount.py --bin-dir /tmp/before --gateway 2000

`--gateway N` counts the gateway instead: one worker in front of a
`bench-hello` backend, the access log on, N `GET /` on one kept-alive
connection; instructions per request.

Prints `user-service N product-service N order-service N sum N`
(instructions per order), and with `--annotate` callgrind_annotate's
top functions of each service.
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import bench

SERVICES = ("user-service", "product-service", "order-service")


class Client:
    """One kept-alive connection per service, as the gateway and
    order-service hold them."""

    def __init__(self):
        self.conns = {}

    def post(self, port, path, body):
        conn = self.conns.get(port)
        if conn is None:
            conn = self.conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", path, body=json.dumps(body),
                     headers={"content-type": "application/json", "x-request-id": "icount-0123456789"})
        response = conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"POST {path}: {response.status} {data[:200]!r}")
        return json.loads(data)


def count(dumps):
    """Instructions in callgrind's dumps (`--dump` after the counted part)."""
    total = 0
    for path in dumps:
        with open(path, errors="replace") as f:
            total += next((int(line.split()[1]) for line in f if line.startswith("totals:")), 0)
    return total


def callgrind(work, name):
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work}/{name}.%p"]


def counted(run):
    """Runs `run()` with instrumentation on in every callgrind process."""
    subprocess.run(["callgrind_control", "--instr=on"], capture_output=True, check=True)
    run()
    subprocess.run(["callgrind_control", "--instr=off"], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "--dump=counted"], capture_output=True, check=True)
    time.sleep(1)


def gateway(args, work):
    procs = bench.Processes()
    try:
        backend = bench.start_backend(procs, "icount-backend", 1)
        port = bench.free_port()
        path = os.path.join(work, "gateway.yaml")
        with open(path, "w") as f:
            f.write(f"""listen: "127.0.0.1:{port}"
threads: 1
services:
  hello: {{ instances: ["127.0.0.1:{backend}"] }}
routes:
  - prefix: /
    service: hello
    plugins: [{{headers: {{response: {{set: {{x-served-by: bench}}}}}}}}]
""")
        procs.start("icount-gateway", callgrind(work, "gateway") + [os.path.join(args.bin_dir, "gateway"), "--config", path],
                    env=dict(os.environ, RUST_LOG="info"))
        bench.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def get(n):
            for _ in range(n):
                conn.request("GET", "/")
                conn.getresponse().read()

        get(50)
        counted(lambda: get(args.gateway))
    finally:
        procs.stop()
    per_request = count(glob.glob(f"{work}/gateway.*.1")) / args.gateway
    print(f"gateway {per_request:.0f} (user-space instructions per request)")
    return 0 if per_request else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=bench.RELEASE, help="where the service binaries are")
    parser.add_argument("--orders", type=int, default=200, help="orders counted (after 20 not counted)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE in the services' environment")
    parser.add_argument("--annotate", type=int, default=0, metavar="N", help="print each service's N costliest functions")
    parser.add_argument("--clients", type=int, default=1, help="orders placed at once (the count is split between them)")
    parser.add_argument("--gateway", type=int, default=0, metavar="N", help="count the gateway over N requests instead")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        # Installed as bench/run.sh installs its proxies: Debian's package.
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        print("icount: installing valgrind", file=sys.stderr)
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "valgrind"],
                       check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    work = os.path.join(bench.WORK, "icount")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "data"))
    if args.gateway:
        return gateway(args, work)
    env = dict(os.environ, **dict(item.split("=", 1) for item in args.env))
    ports = {name: bench.free_port() for name in SERVICES}
    extra = {
        "order-service": ["--users-url", f"http://127.0.0.1:{ports['user-service']}",
                          "--products-url", f"http://127.0.0.1:{ports['product-service']}"],
    }
    procs = bench.Processes()
    try:
        for name in SERVICES:
            short = name.split("-")[0]
            procs.start(f"icount-{name}", callgrind(work, name) + [
                os.path.join(args.bin_dir, name), "--listen", f"127.0.0.1:{ports[name]}",
                "--db", f"{work}/data/{short}.db", *extra.get(name, [])], env=env)
        for name in SERVICES:
            bench.wait_http(f"http://127.0.0.1:{ports[name]}/health", timeout=120)
        client = Client()
        user = client.post(ports["user-service"], "/users",
                           {"username": "icount", "email": "icount@example.com", "full_name": "I Count"})
        product = client.post(ports["product-service"], "/products",
                              {"name": "Plenty", "price": 1.5, "stock": 1_000_000_000, "category": "Bench"})
        order = {"user_id": user["id"], "items": [{"product_id": product["id"], "quantity": 1}]}
        for _ in range(20):
            client.post(ports["order-service"], "/orders", order)
        def place(n):
            mine = Client()
            for _ in range(n):
                mine.post(ports["order-service"], "/orders", order)

        def load():
            # `--clients` at once, the orders split between them: writes
            # then queue behind each other and commit in groups.
            threads = [threading.Thread(target=place, args=(args.orders // args.clients,)) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        counted(load)
    finally:
        procs.stop()
    counts = {}
    for name in SERVICES:
        dumps = glob.glob(f"{work}/{name}.*.1")
        counts[name] = count(dumps) / args.orders
        if args.annotate and dumps:
            out = subprocess.run(["callgrind_annotate", "--inclusive=no", *dumps], capture_output=True, text=True).stdout
            rows = [line for line in out.splitlines() if "(" in line and "%)" in line][1:args.annotate + 1]
            print(f"== {name}\n" + "\n".join(row[:160] for row in rows))
    print(" ".join(f"{name} {count:.0f}" for name, count in counts.items()), f"sum {sum(counts.values()):.0f}",
          "(user-space instructions per order)")
    return 0 if all(counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
