#!/usr/bin/env python3
"""The benchmark driver behind bench/run.sh (which installs tools and builds).

Everything runs on 127.0.0.1. Each proxy (the gateway, nginx, HAProxy) gets
its own bench-hello backend so connection counts never mix, and the same
number of workers. Rounds alternate the targets, because the machine is
shared and noisy: a ratio is only meaningful between numbers of one run.

For every target and load shape it reports the median over rounds of
requests/s, p50 and p99 latency, errors, and CPU microseconds per request of
the proxy process(es), read from /proc/PID/stat before and after each run.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, os.environ.get("BENCH_BIN_DIR", os.path.join("target", "release")))
WORK = os.path.join(ROOT, "bench", "work")
RESULTS = os.path.join(ROOT, "bench", "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
# Reference proxies on the gateway's Pingora (bench/baselines).
BASELINES = ("pingora-bare", "pingora-proxyhttp")


def log(message):
    print(f"bench: {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


class Processes:
    """Every process the run starts; all stopped at the end."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, **kwargs):
        logfile = open(os.path.join(WORK, f"{name}.log"), "w")
        proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()


def cpu_ticks(pids):
    """(user, system) clock ticks the pids have used so far."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        except FileNotFoundError:
            pass
    return user, system


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return kids


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def oha_json_flag():
    help_text = subprocess.run(["oha", "--help"], capture_output=True, text=True).stdout
    return ["--output-format", "json"] if "--output-format" in help_text else ["-j"]


def oha(url, connections, seconds, method="GET", body=None, headers=()):
    # -w: requests still running at the deadline finish and count, instead
    # of being reported as "aborted due to deadline" errors.
    argv = ["oha", "--no-tui", *OHA_JSON, "-w", "-z", f"{seconds}s", "-c", str(connections), "-m", method]
    for header in headers:
        argv += ["-H", header]
    if body is not None:
        argv += ["-d", body]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    summary = data["summary"]
    statuses = {int(k): v for k, v in (data.get("statusCodeDistribution") or {}).items()}
    errors = sum((data.get("errorDistribution") or {}).values())
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    failed = errors + sum(v for k, v in statuses.items() if not 200 <= k < 300)
    pct = data.get("latencyPercentiles") or {}
    return {
        "rps": summary.get("requestsPerSec") or 0.0,
        "p50_us": (pct.get("p50") or 0.0) * 1e6,
        "p99_us": (pct.get("p99") or 0.0) * 1e6,
        "max_us": (summary.get("slowest") or 0.0) * 1e6,
        "ok": ok,
        "failed": failed,
        "statuses": statuses,
    }


def measured(run, pids):
    """Runs `run()` (an oha call) and adds the CPU the pids used per request."""
    user_before, system_before = cpu_ticks(pids)
    result = run()
    user_after, system_after = cpu_ticks(pids)
    requests = result["ok"] + result["failed"]
    per_request = lambda ticks: ticks * 1e6 / CLK_TCK / requests if requests else 0.0
    result["cpu_user_us_per_request"] = per_request(user_after - user_before)
    result["cpu_sys_us_per_request"] = per_request(system_after - system_before)
    result["cpu_us_per_request"] = result["cpu_user_us_per_request"] + result["cpu_sys_us_per_request"]
    return result


def measured_each(run, named_pids):
    """Runs `run()` (an oha call) and adds the CPU each named process used
    per request (`cpu_us_per_request_by_process`) and their sum."""
    before = {name: cpu_ticks([pid]) for name, pid in named_pids.items()}
    result = run()
    after = {name: cpu_ticks([pid]) for name, pid in named_pids.items()}
    requests = result["ok"] + result["failed"]
    by_process = {
        name: (sum(after[name]) - sum(before[name])) * 1e6 / CLK_TCK / requests if requests else 0.0
        for name in named_pids
    }
    result["cpu_us_per_request_by_process"] = by_process
    result["cpu_us_per_request"] = sum(by_process.values())
    return result



# --- paired A/B rounds (ab.py, stack_ab.py) ------------------------------------

def pair(a, b):
    """One pair of rounds: both results and the ratios B/A."""
    ratio = {
        "cpu": b["cpu_us_per_request"] / a["cpu_us_per_request"] if a["cpu_us_per_request"] else 0.0,
        "rps": b["rps"] / a["rps"] if a["rps"] else 0.0,
        "p99": b["p99_us"] / a["p99_us"] if a["p99_us"] else 0.0,
    }
    return {"a": a, "b": b, "ratio": ratio}


def pairs_summary(pairs):
    """The medians of the per-pair ratios, how many pairs B won, the
    medians of each side's figures and the failures of all."""
    def median(key):
        return statistics.median(p["ratio"][key] for p in pairs)

    def side(name, key):
        return statistics.median(p[name][key] for p in pairs)

    return {
        "pairs": len(pairs),
        "cpu_ratio": median("cpu"),
        "rps_ratio": median("rps"),
        "p99_ratio": median("p99"),
        "b_less_cpu": sum(p["ratio"]["cpu"] < 1 for p in pairs),
        "b_more_rps": sum(p["ratio"]["rps"] > 1 for p in pairs),
        "b_shorter_p99": sum(p["ratio"]["p99"] < 1 for p in pairs),
        "a_cpu_us": side("a", "cpu_us_per_request"),
        "b_cpu_us": side("b", "cpu_us_per_request"),
        "a_rps": side("a", "rps"),
        "b_rps": side("b", "rps"),
        "failed": sum(p["a"]["failed"] + p["b"]["failed"] for p in pairs),
    }


def report_pairs(summary, detail=""):
    """Prints the summary line (`detail`: more within the CPU part)."""
    n = summary["pairs"]
    print(f"B/A over {n} pairs (median of per-pair ratios): CPU per request x{summary['cpu_ratio']:.3f} "
          f"(B less in {summary['b_less_cpu']} of {n}; {summary['a_cpu_us']:.1f} -> {summary['b_cpu_us']:.1f} us"
          f"{'; ' + detail if detail else ''}), throughput x{summary['rps_ratio']:.3f} (B more in "
          f"{summary['b_more_rps']}; {summary['a_rps']:.0f} -> {summary['b_rps']:.0f} req/s), p99 "
          f"x{summary['p99_ratio']:.3f} (B shorter in {summary['b_shorter_p99']}); failed {summary['failed']}")


def save_pairs(prefix, args, summary, pairs):
    """bench/results/<prefix>-<label>-<time>.json"""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    path = os.path.join(RESULTS, f"{prefix}-{args.label}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"settings": vars(args), "argv": sys.argv[1:], "environment": environment(),
                   "summary": summary, "pairs": pairs}, f, indent=2)
    log(f"wrote {path}")


# --- the targets -------------------------------------------------------------

def start_backend(procs, name, threads):
    port = free_port()
    procs.start(name, [os.path.join(RELEASE, "bench-hello"), "--listen", f"127.0.0.1:{port}", "--threads", str(threads)])
    wait_http(f"http://127.0.0.1:{port}/health")
    return port


def cpu_list():
    """The CPUs this process may run on, in order: what nginx's `auto` and the gateway pin workers to."""
    return sorted(os.sched_getaffinity(0))


def gateway_config(port, backend, threads, admin=None, header_value="bench", extra=None):
    admin_line = f'admin_listen: "127.0.0.1:{admin}"\n' if admin else ""
    extra = GATEWAY_EXTRA if extra is None else extra
    if AFFINITY and "work_stealing: true" not in extra:
        extra += "\nworker_cpu_affinity: true"
    return f"""listen: "127.0.0.1:{port}"
{admin_line}threads: {threads}
{extra}
health_check: {{ path: /health, interval: 1s, timeout: 500ms }}
services:
  hello:
    instances: ["127.0.0.1:{backend}"]
routes:
  - prefix: /
    service: hello
    plugins:
      - headers:
          response: {{ set: {{ x-served-by: {header_value} }} }}
"""


def start_gateway(procs, backend, threads, name="gateway", admin=False, extra=None):
    port = free_port()
    admin_port = free_port() if admin else None
    # Not beside the logs: the gateway watches its configuration's directory.
    path = os.path.join(WORK, "conf", f"{name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(gateway_config(port, backend, threads, admin_port, extra=extra))
    env = dict(os.environ, RUST_LOG=GATEWAY_LOG)
    proc = procs.start(name, [os.path.join(RELEASE, "gateway"), "--config", path], env=env)
    wait_http(f"http://127.0.0.1:{port}/health")
    return port, proc, path


def start_baseline(procs, name, backend, threads):
    """A reference proxy from bench/baselines: `pingora-bare` or `pingora-proxyhttp`."""
    port = free_port()
    argv = [os.path.join(RELEASE, name), "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{backend}",
            "--threads", str(threads)]
    if threads > 1:
        argv.append("--work-stealing")  # stock Pingora: its default, off for one thread
    proc = procs.start(name, argv)
    wait_http(f"http://127.0.0.1:{port}/")
    return port, proc


def start_nginx(procs, backend, workers):
    port = free_port()
    conf = os.path.join(WORK, "nginx.conf")
    # nginx appends to its access log: start each run's afresh, as the
    # other targets' logs are, so runs do not fill the disk.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(WORK, "nginx-access.log"))
    with open(conf, "w") as f:
        f.write(f"""daemon off;
master_process on;
worker_processes {workers};
{"worker_cpu_affinity auto;" if AFFINITY else ""}
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {WORK}/nginx-access.log;
  upstream hello {{
    server 127.0.0.1:{backend};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      add_header x-served-by bench;
    }}
  }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = procs.start("nginx", [nginx, "-c", conf, "-e", f"{WORK}/nginx-error.log"])
    wait_http(f"http://127.0.0.1:{port}/")
    return port, proc


def start_haproxy(procs, backend, threads):
    port = free_port()
    conf = os.path.join(WORK, "haproxy.cfg")
    cpus = cpu_list()
    cpu_map = "".join(f"  cpu-map 1/{t + 1} {cpus[t % len(cpus)]}\n" for t in range(threads)) if AFFINITY else ""
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread {threads}
{cpu_map}  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend web
  bind 127.0.0.1:{port}
  http-response set-header x-served-by bench
  default_backend hello
backend hello
  server hello1 127.0.0.1:{backend} maxconn 1000
""")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    proc = procs.start("haproxy", [haproxy, "-f", conf, "-db"])
    wait_http(f"http://127.0.0.1:{port}/")
    return port, proc


def start_caddy(procs, backend, workers):
    port = free_port()
    conf = os.path.join(WORK, "Caddyfile")
    with open(conf, "w") as f:
        f.write(f"""{{
  admin off
  auto_https off
}}
http://127.0.0.1:{port} {{
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:{backend} {{
    header_down x-served-by bench
  }}
}}
""")
    caddy = shutil.which("caddy") or "/usr/bin/caddy"
    env = dict(os.environ, GOMAXPROCS=str(workers), XDG_DATA_HOME=WORK, XDG_CONFIG_HOME=WORK)
    proc = procs.start("caddy", [caddy, "run", "--config", conf, "--adapter", "caddyfile"], env=env)
    wait_http(f"http://127.0.0.1:{port}/")
    return port, proc


# --- the measurements ----------------------------------------------------------

def proxy_comparison(args, procs, threads=None, shapes=None):
    threads = threads or args.threads
    targets = {}
    direct = start_backend(procs, "backend-direct", args.backend_threads)
    targets["direct"] = (direct, lambda: [procs.procs[-1].pid])
    direct_pid = procs.procs[-1].pid
    targets["direct"] = (direct, lambda pid=direct_pid: [pid])

    gw_backend = start_backend(procs, "backend-gateway", args.backend_threads)
    # One thread: no work to steal, one runtime (measured best on 2 cores).
    extra = "work_stealing: false" if threads == 1 else None
    gw_port, gw, _ = start_gateway(procs, gw_backend, threads, name=f"gateway-t{threads}", extra=extra)
    targets["gateway"] = (gw_port, lambda pid=gw.pid: [pid])

    for name in BASELINES:
        backend = start_backend(procs, f"backend-{name}", args.backend_threads)
        port, proc = start_baseline(procs, name, backend, threads)
        targets[name] = (port, lambda pid=proc.pid: [pid])

    ng_backend = start_backend(procs, "backend-nginx", args.backend_threads)
    ng_port, ng = start_nginx(procs, ng_backend, threads)
    targets["nginx"] = (ng_port, lambda pid=ng.pid: [pid, *children(pid)])

    ha_backend = start_backend(procs, "backend-haproxy", args.backend_threads)
    ha_port, ha = start_haproxy(procs, ha_backend, threads)
    targets["haproxy"] = (ha_port, lambda pid=ha.pid: [pid, *children(pid)])

    if shutil.which("caddy") or os.path.exists("/usr/bin/caddy"):
        ca_backend = start_backend(procs, "backend-caddy", args.backend_threads)
        ca_port, ca = start_caddy(procs, ca_backend, threads)
        targets["caddy"] = (ca_port, lambda pid=ca.pid: [pid])

    # Warm every target up (connection pools, caches) before measuring.
    for port, _ in targets.values():
        oha(f"http://127.0.0.1:{port}/", 50, 1)

    shapes = shapes or {"c50": args.connections, "c1": 1}
    runs = {shape: {name: [] for name in targets} for shape in shapes}
    for round_no in range(1, args.rounds + 1):
        for shape, connections in shapes.items():
            order = list(targets) if round_no % 2 else list(reversed(targets))
            for name in order:
                port, pids = targets[name]
                result = measured(lambda: oha(f"http://127.0.0.1:{port}/", connections, args.seconds), pids())
                runs[shape][name].append(result)
                log(f"t{threads} round {round_no} {shape:>3} {name:<17} {result['rps']:>9.0f} req/s  p50 {result['p50_us']:>7.0f} us  "
                    f"p99 {result['p99_us']:>7.0f} us  cpu {result['cpu_us_per_request']:>5.1f} us/req  failed {result['failed']}")
    summary = {}
    for shape, by_target in runs.items():
        summary[shape] = {}
        for name, results in by_target.items():
            summary[shape][name] = {
                "rps": statistics.median(r["rps"] for r in results),
                "p50_us": statistics.median(r["p50_us"] for r in results),
                "p99_us": statistics.median(r["p99_us"] for r in results),
                "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in results),
                "cpu_user_us_per_request": statistics.median(r["cpu_user_us_per_request"] for r in results),
                "cpu_sys_us_per_request": statistics.median(r["cpu_sys_us_per_request"] for r in results),
                "failed": sum(r["failed"] for r in results),
                "requests": sum(r["ok"] + r["failed"] for r in results),
            }
    return {"runs": runs, "summary": summary}


def streaming(args, procs):
    size = args.stream_bytes
    backend = start_backend(procs, "backend-stream", 2)
    port, gw, _ = start_gateway(procs, backend, args.threads, name="gateway-stream")
    rss_before = peak_rss_kib(gw.pid)
    started = time.time()
    upload = subprocess.run(
        f"head -c {size} /dev/zero | curl -sS -X POST -T - -H 'content-type: application/octet-stream' "
        f"http://127.0.0.1:{port}/upload",
        shell=True, capture_output=True, text=True, check=True)
    upload_s = time.time() - started
    assert upload.stdout.strip() == str(size), f"upload answered {upload.stdout!r}"
    rss_after_upload = peak_rss_kib(gw.pid)
    started = time.time()
    download = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", f"http://127.0.0.1:{port}/download/{size}"],
        capture_output=True, text=True, check=True)
    download_s = time.time() - started
    assert int(download.stdout) == size, f"downloaded {download.stdout}"
    rss_after_download = peak_rss_kib(gw.pid)
    result = {
        "bytes": size,
        "upload_mib_per_s": size / upload_s / (1 << 20),
        "download_mib_per_s": size / download_s / (1 << 20),
        "peak_rss_kib_before": rss_before,
        "peak_rss_kib_after_upload": rss_after_upload,
        "peak_rss_kib_after_download": rss_after_download,
    }
    log(f"streaming {size >> 20} MiB: upload {result['upload_mib_per_s']:.0f} MiB/s, download "
        f"{result['download_mib_per_s']:.0f} MiB/s, gateway peak RSS {rss_before} -> {rss_after_upload} -> "
        f"{rss_after_download} KiB")
    return result


def reload_under_load(args, procs):
    backend = start_backend(procs, "backend-reload", args.backend_threads)
    port, gw, path = start_gateway(procs, backend, args.threads, name="gateway-reload")
    seconds = max(2, args.reload_rewrites)
    holder = {}

    def run_load():
        holder["result"] = oha(f"http://127.0.0.1:{port}/", args.connections, seconds)

    import threading
    load = threading.Thread(target=run_load)
    load.start()
    time.sleep(0.5)
    pause = (seconds - 1.0) / args.reload_rewrites
    for i in range(args.reload_rewrites):
        text = gateway_config(port, backend, args.threads, header_value=f"v{i}")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        time.sleep(pause)
    load.join()
    result = holder["result"]
    with open(os.path.join(WORK, "gateway-reload.log")) as f:
        reloads = sum(1 for line in f if "configuration reloaded" in line)
    out = {"rewrites": args.reload_rewrites, "reloads_applied": reloads, "requests": result["ok"] + result["failed"],
           "failed": result["failed"], "rps": result["rps"]}
    log(f"reload under load: {out['rewrites']} rewrites, {reloads} applied, {out['requests']} requests, "
        f"{out['failed']} failed")
    return out


def start_stack(procs, args, bin_dir=None, name="stack"):
    """The three services (fresh databases) and a gateway in front of them,
    from the binaries in `bin_dir` (default: the run's); a user and a
    product with plenty of stock made through the gateway. Returns the
    gateway's base URL, each process's pid, the services' ports and an
    order's JSON body."""
    bins = bin_dir or RELEASE
    data = os.path.join(WORK, f"{name}-data")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    users, products, orders = free_port(), free_port(), free_port()
    pids = {}
    pids["user-service"] = procs.start(f"{name}-user-service", [os.path.join(bins, "user-service"), "--listen", f"127.0.0.1:{users}", "--db", f"{data}/users.db"]).pid
    pids["product-service"] = procs.start(f"{name}-product-service", [os.path.join(bins, "product-service"), "--listen", f"127.0.0.1:{products}", "--db", f"{data}/products.db"]).pid
    pids["order-service"] = procs.start(f"{name}-order-service", [os.path.join(bins, "order-service"), "--listen", f"127.0.0.1:{orders}", "--db", f"{data}/orders.db",
                                         "--users-url", f"http://127.0.0.1:{users}", "--products-url", f"http://127.0.0.1:{products}"]).pid
    for port in (users, products, orders):
        wait_http(f"http://127.0.0.1:{port}/health")
    port = free_port()
    # The configuration lives outside the data directory: the gateway
    # watches its directory, and the services' WAL writes would wake it.
    path = os.path.join(WORK, "conf", f"gateway-{name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"""listen: "127.0.0.1:{port}"
threads: {args.threads}
services:
  user-service: {{ instances: ["127.0.0.1:{users}"] }}
  product-service: {{ instances: ["127.0.0.1:{products}"] }}
  order-service: {{ instances: ["127.0.0.1:{orders}"], timeouts: {{ read: 10s }} }}
routes:
  - {{ prefix: /api/users, service: user-service, strip_prefix: /api }}
  - {{ prefix: /api/products, service: product-service, strip_prefix: /api }}
  - {{ prefix: /api/orders, service: order-service, strip_prefix: /api }}
""")
    pids["gateway"] = procs.start(f"gateway-{name}", [os.path.join(bins, "gateway"), "--config", path], env=dict(os.environ, RUST_LOG="info")).pid
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health")

    def post(url, body):
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    user = post(f"{base}/api/users", {"username": "bench", "email": "bench@example.com", "full_name": "Bench"})
    product = post(f"{base}/api/products", {"name": "Plenty", "price": 1.5, "stock": 1_000_000_000, "category": "Bench"})
    order = json.dumps({"user_id": user["id"], "items": [{"product_id": product["id"], "quantity": 1}]})
    return {"base": base, "pids": pids, "ports": {"user-service": users, "product-service": products, "order-service": orders},
            "user": user, "product": product, "order": order}


def full_stack(args, procs):
    """The services at their pace, in one run: `bench-hello` direct and each
    service's GET by id direct (rounds alternated, ratios per round), then
    `GET /api/products/{id}` and `POST /api/orders` through the gateway at
    `--connections` clients and at 1, with the CPU of every process."""
    stack = start_stack(procs, args)
    pids, base, order = stack["pids"], stack["base"], stack["order"]
    users, products = stack["ports"]["user-service"], stack["ports"]["product-service"]
    user, product = stack["user"], stack["product"]
    hello = free_port()
    # As many runtime threads as the services' (one per core).
    hello_pid = procs.start("stack-bench-hello", [os.path.join(RELEASE, "bench-hello"), "--listen", f"127.0.0.1:{hello}",
                                                  "--threads", str(os.cpu_count() or 1)]).pid
    wait_http(f"http://127.0.0.1:{hello}/health")

    direct_targets = {
        "bench-hello": (f"http://127.0.0.1:{hello}/", {"bench-hello": hello_pid}),
        "GET /users/{id}": (f"http://127.0.0.1:{users}/users/{user['id']}", {"user-service": pids["user-service"]}),
        "GET /products/{id}": (f"http://127.0.0.1:{products}/products/{product['id']}", {"product-service": pids["product-service"]}),
    }
    direct = {name: [] for name in direct_targets}
    for round_ in range(args.rounds):
        order_ = list(direct_targets) if round_ % 2 == 0 else list(reversed(direct_targets))
        for name in order_:
            url, named = direct_targets[name]
            direct[name].append(measured_each(lambda: oha(url, args.connections, args.seconds), named))
    ratios = {
        name: statistics.median(r["rps"] / h["rps"] for r, h in zip(direct[name], direct["bench-hello"]) if h["rps"])
        for name in direct if name != "bench-hello"
    }
    through = {}
    for clients in (args.connections, 1):
        through[f"GET /api/products/{{id}} c{clients}"] = measured_each(
            lambda: oha(f"{base}/api/products/{product['id']}", clients, args.seconds), pids)
        through[f"POST /api/orders c{clients}"] = measured_each(
            lambda: oha(f"{base}/api/orders", clients, args.seconds, method="POST", body=order,
                        headers=["content-type: application/json"]), pids)
    hello_rps = statistics.median(r["rps"] for r in direct["bench-hello"])
    for name, runs in direct.items():
        r = runs[-1]
        log(f"direct {name}: {statistics.median(x['rps'] for x in runs):.0f} req/s (median of {len(runs)}), "
            f"last p99 {r['p99_us']:.0f} us, {r['cpu_us_per_request']:.1f} us CPU/req")
    for name, r in through.items():
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_request_by_process"].items())
        log(f"through the gateway {name}: {r['rps']:.0f} req/s, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
            f"max {r['max_us']:.0f} us, failed {r['failed']} {r['statuses']}; CPU us/req: {cpu}")
    return {
        "direct": direct,
        "direct_ratio_to_hello": ratios,
        "hello_rps": hello_rps,
        "through_gateway": through,
        "orders_ratio_to_hello": through[f"POST /api/orders c{args.connections}"]["rps"] / hello_rps if hello_rps else 0.0,
    }


# --- the report ------------------------------------------------------------------

def environment():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for tool, argv in {"oha": ["oha", "--version"], "nginx": [shutil.which("nginx") or "/usr/sbin/nginx", "-v"],
                       "haproxy": [shutil.which("haproxy") or "/usr/sbin/haproxy", "-v"],
                       "caddy": [shutil.which("caddy") or "/usr/bin/caddy", "version"]}.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            versions[tool] = "not installed"
            continue
        versions[tool] = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "kernel": platform.release(), "commit": commit, "versions": versions}


def names(summary):
    """Targets in report order, those that ran."""
    return [n for n in ("direct", "gateway", *BASELINES, "nginx", "haproxy", "caddy") if n in summary]


def cpu_cell(r):
    """CPU per request, and its user and kernel parts."""
    return f"{r['cpu_us_per_request']:.1f} ({r['cpu_user_us_per_request']:.1f} + {r['cpu_sys_us_per_request']:.1f})"


def bar(value, scale, width=40):
    n = int(round(value / scale * width)) if scale else 0
    return "#" * max(0, min(width, n))


def markdown(results, args):
    env = results["environment"]
    s = results["proxies"]["summary"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/run.sh` (do not edit by hand). Numbers from one run on one machine; "
        "ratios are between targets measured in the same run, in alternating rounds.",
        "",
        f"- Date: {env['date']}; commit `{env['commit']}`",
        f"- CPU: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']} (shared by oha, backends and proxies)",
        f"- Tools: {env['versions']['oha']}; {env['versions']['nginx']}; {env['versions']['haproxy']}; "
        f"Caddy {env['versions'].get('caddy', '?')}",
        f"- Each proxy: {args.threads} workers/threads, upstream keep-alive, its own `bench-hello` backend "
        f"({args.backend_threads} thread); the gateway with every feature on (health checks, per-request access log, "
        "a headers plugin); nginx with its access log; HAProxy `http-reuse always`; Caddy `reverse_proxy` "
        "with `GOMAXPROCS` = the worker count.",
        *([
            "- Workers pinned to CPUs, one each, where the proxy can do it: nginx `worker_cpu_affinity auto`, "
            "HAProxy `cpu-map 1/<thread> <cpu>`, the gateway `worker_cpu_affinity: true`. Caddy (Go) and "
            "stock Pingora (`pingora-bare`, `pingora-proxyhttp`) have no such setting and run unpinned. "
            "`--no-affinity` runs every proxy unpinned."
        ] if getattr(args, "affinity", False) else [
            "- Workers not pinned to CPUs (`--no-affinity`, or a run from before the option existed)."
        ]),
        f"- Load: `oha -z {args.seconds}s -c {args.connections}` and `-c 1`, {args.rounds} rounds, median shown.",
        "",
        f"## Proxies, {args.connections} keep-alive clients",
        "",
        "| target | req/s | p50 µs | p99 µs | CPU µs/req (user + kernel) | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names(s["c50"]):
        r = s["c50"][name]
        lines.append(f"| {name} | {r['rps']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {cpu_cell(r)} | {r['failed']} |")
    g, n, h, d = (s["c50"][k] for k in ("gateway", "nginx", "haproxy", "direct"))
    ratio = lambda a, b: a / b if b else float("nan")
    lines += [
        "",
        f"- gateway / nginx: throughput **{ratio(g['rps'], n['rps']):.2f}×**, CPU per request "
        f"**{ratio(g['cpu_us_per_request'], n['cpu_us_per_request']):.2f}×**, p99 **{ratio(g['p99_us'], n['p99_us']):.2f}×**",
        f"- gateway / HAProxy: throughput **{ratio(g['rps'], h['rps']):.2f}×**, CPU per request "
        f"**{ratio(g['cpu_us_per_request'], h['cpu_us_per_request']):.2f}×**, p99 **{ratio(g['p99_us'], h['p99_us']):.2f}×**",
        *([f"- gateway / Caddy: throughput **{ratio(g['rps'], s['c50']['caddy']['rps']):.2f}×**, CPU per request "
            f"**{ratio(g['cpu_us_per_request'], s['c50']['caddy']['cpu_us_per_request']):.2f}×**"] if "caddy" in s["c50"] else []),
        f"- gateway / direct: throughput **{ratio(g['rps'], d['rps']):.2f}×**",
        *baseline_lines(s["c50"]),
        "",
        "## One client (added latency)",
        "",
        "| target | req/s | p50 µs | p99 µs | p50 added over direct µs | CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    direct_p50 = s["c1"]["direct"]["p50_us"]
    for name in names(s["c1"]):
        r = s["c1"][name]
        lines.append(f"| {name} | {r['rps']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
                     f"{r['p50_us'] - direct_p50:.0f} | {r['cpu_us_per_request']:.1f} |")
    scale = max(s["c50"][k]["p99_us"] for k in s["c50"])
    lines += ["", f"Latency at {args.connections} clients (p50 `=`, p99 `#`, scale {scale:.0f} µs):", "", "```"]
    for name in names(s["c50"]):
        r = s["c50"][name]
        lines.append(f"{name:<8} p50 {'=' * max(1, int(r['p50_us'] / scale * 50))} {r['p50_us']:.0f}")
        lines.append(f"{'':<8} p99 {'#' * max(1, int(r['p99_us'] / scale * 50))} {r['p99_us']:.0f}")
    lines.append("```")
    st = results["streaming"]
    rl = results["reload"]
    fs = results["full_stack"]
    lines += [
        "",
        *also_section(results, args),
        "## Streaming through the gateway",
        "",
        f"{st['bytes'] >> 20} MiB upload: {st['upload_mib_per_s']:.0f} MiB/s; {st['bytes'] >> 20} MiB download: "
        f"{st['download_mib_per_s']:.0f} MiB/s. Gateway peak RSS: {st['peak_rss_kib_before'] / 1024:.1f} MiB before, "
        f"{st['peak_rss_kib_after_upload'] / 1024:.1f} MiB after the upload, {st['peak_rss_kib_after_download'] / 1024:.1f} MiB "
        "after the download: flat, the body is never buffered.",
        "",
        "## Reload under load",
        "",
        f"`gateway.yaml` rewritten {rl['rewrites']} times during an oha run ({args.connections} clients): "
        f"{rl['reloads_applied']} reloads applied, {rl['requests']} requests, **{rl['failed']} failed**.",
        "",
        *full_stack_section(fs, args),
        "## Commands",
        "",
        "```",
        " ".join(["bench/run.sh", *results.get("argv", [])]),
        f"oha --no-tui {' '.join(OHA_JSON)} -z {args.seconds}s -c {args.connections} http://127.0.0.1:PORT/   # and -c 1",
        f"head -c {st['bytes']} /dev/zero | curl -X POST -T - http://127.0.0.1:PORT/upload",
        f"curl -o /dev/null http://127.0.0.1:PORT/download/{st['bytes']}",
        "```",
        "",
        "Generated configurations (gateway, nginx, HAProxy) are in `bench/work/` after a run; "
        "machine-readable results in `bench/results/`.",
        "",
    ]
    notes = os.path.join(ROOT, "bench", "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines.append(f.read())
    return "\n".join(lines)


def full_stack_section(fs, args):
    if "direct" not in fs:  # a run saved before the services' part existed
        return [
            "## Full stack through the gateway",
            "",
            "| request | req/s | p50 µs | p99 µs | failed |",
            "|---|---:|---:|---:|---:|",
            *(f"| {label} | {fs[key]['rps']:.0f} | {fs[key]['p50_us']:.0f} | {fs[key]['p99_us']:.0f} | {fs[key]['failed']} |"
              for key, label in (("get_products", "`GET /api/products`"), ("post_orders", "`POST /api/orders` (one item)"))),
            "",
        ]
    lines = [
        "## The services",
        "",
        f"Direct, {args.connections} clients, {len(fs['direct']['bench-hello'])} alternated rounds of {args.seconds} s "
        "(req/s, p50, p99, CPU: medians of the rounds; max: of all rounds; ratio: median of the per-round ratios to "
        "`bench-hello`, an axum hello on as many threads as the services):",
        "",
        "| request | req/s | ratio to bench-hello | p50 µs | p99 µs | max µs | failed | CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in fs["direct"].items():
        ratio = "1" if name == "bench-hello" else f"**{fs['direct_ratio_to_hello'][name]:.2f}×**"
        median = lambda key: statistics.median(r[key] for r in runs)
        lines.append(f"| `{name}` | {median('rps'):.0f} | {ratio} | {median('p50_us'):.0f} | {median('p99_us'):.0f} | "
                     f"{max(r['max_us'] for r in runs):.0f} | {sum(r['failed'] for r in runs)} | "
                     f"{median('cpu_us_per_request'):.1f} |")
    lines += [
        "",
        "Through the gateway (CPU per request of each process, from `/proc`):",
        "",
        "| request | clients | req/s | p50 µs | p99 µs | max µs | failed | CPU µs/req: gateway, users, products, orders (sum) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in fs["through_gateway"].items():
        name, clients = key.rsplit(" c", 1)
        cpu = r["cpu_us_per_request_by_process"]
        lines.append(f"| `{name}` | {clients} | {r['rps']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['max_us']:.0f} | "
                     f"{r['failed']} | {cpu['gateway']:.0f}, {cpu['user-service']:.0f}, {cpu['product-service']:.0f}, "
                     f"{cpu['order-service']:.0f} ({r['cpu_us_per_request']:.0f}) |")
    lines += ["", f"Orders per second / bench-hello's req/s: **{fs['orders_ratio_to_hello']:.3f}**.", ""]
    return lines


def baseline_lines(by_target):
    """What the reference proxies say about the gateway's CPU per request."""
    if not all(name in by_target for name in ("gateway", "nginx", *BASELINES)):
        return []
    cpu = {name: by_target[name]["cpu_us_per_request"] for name in ("gateway", "nginx", *BASELINES)}
    return [
        f"- gateway / stock Pingora `ProxyHttp` (`pingora-proxyhttp`): CPU per request "
        f"**{cpu['gateway'] / cpu['pingora-proxyhttp']:.2f}×**, throughput "
        f"**{by_target['gateway']['rps'] / by_target['pingora-proxyhttp']['rps']:.2f}×**",
        f"- the floor, pingora-core with nothing on top (`pingora-bare`): {cpu['pingora-bare']:.1f} µs/request, "
        f"{cpu['pingora-bare'] / cpu['nginx']:.2f}× nginx's; the gateway's features add "
        f"{cpu['gateway'] - cpu['pingora-bare']:.1f} µs",
    ]


def render(path):
    """BENCHMARKS.md again from a saved full run, with the current notes."""
    global OHA_JSON
    with open(path) as f:
        results = json.load(f)
    args = argparse.Namespace(**results["settings"])
    OHA_JSON = oha_json_flag()
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write(markdown(results, args))
    log(f"wrote BENCHMARKS.md from {path}")
    return 0


def also_section(results, args):
    if "proxies_also" not in results:
        return []
    s = results["proxies_also"]["summary"]
    lines = [
        f"## The same with {args.also_threads} worker{'s' if args.also_threads > 1 else ''} each "
        "(gateway with `work_stealing: false`)",
        "",
        "| target | clients | req/s | p50 µs | p99 µs | CPU µs/req (user + kernel) | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, clients in (("c50", args.connections), ("c1", 1)):
        for name in names(s[shape]):
            r = s[shape][name]
            lines.append(f"| {name} | {clients} | {r['rps']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
                         f"{cpu_cell(r)} | {r['failed']} |")
    g, n, h = (s["c50"][k] for k in ("gateway", "nginx", "haproxy"))
    lines += [
        "",
        f"- gateway / nginx: throughput **{g['rps'] / n['rps']:.2f}×**, CPU per request "
        f"**{g['cpu_us_per_request'] / n['cpu_us_per_request']:.2f}×**, p99 **{g['p99_us'] / n['p99_us']:.2f}×**",
        f"- gateway / HAProxy: throughput **{g['rps'] / h['rps']:.2f}×**, CPU per request "
        f"**{g['cpu_us_per_request'] / h['cpu_us_per_request']:.2f}×**",
        *([f"- gateway / Caddy: throughput **{g['rps'] / s['c50']['caddy']['rps']:.2f}×**, CPU per request "
           f"**{g['cpu_us_per_request'] / s['c50']['caddy']['cpu_us_per_request']:.2f}×**"] if "caddy" in s["c50"] else []),
        *baseline_lines(s["c50"]),
        "",
    ]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every step, about a second each (CI)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="length of each oha run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="workers of each proxy")
    parser.add_argument("--also-threads", type=int, default=1,
                        help="repeat the proxy comparison with this many workers each (0: skip)")
    parser.add_argument("--backend-threads", type=int, default=1)
    parser.add_argument("--stream-bytes", type=int, default=GIB)
    parser.add_argument("--reload-rewrites", type=int, default=10)
    parser.add_argument("--only", choices=["proxies", "streaming", "reload", "stack"], action="append",
                        help="run only these parts (repeatable); BENCHMARKS.md is then not written")
    parser.add_argument("--gateway-log", default="info", help="RUST_LOG of the gateway (info: access log on)")
    parser.add_argument("--no-affinity", dest="affinity", action="store_false",
                        help="leave every proxy's workers unpinned (default: pinned to one CPU each where the proxy can)")
    parser.add_argument("--gateway-extra", default="", help="extra top-level gateway.yaml lines, e.g. 'work_stealing: false'")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite BENCHMARKS.md from a saved full run (e.g. after editing bench/notes.md)")
    args = parser.parse_args()
    if args.render:
        return render(args.render)
    if args.smoke:
        args.rounds, args.seconds, args.stream_bytes, args.reload_rewrites = 1, 1, 16 << 20, 2

    global OHA_JSON, GATEWAY_LOG, GATEWAY_EXTRA, AFFINITY
    OHA_JSON = oha_json_flag()
    AFFINITY = args.affinity
    GATEWAY_LOG = args.gateway_log
    GATEWAY_EXTRA = args.gateway_extra.replace("\\n", "\n")
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    results = {"environment": environment(), "settings": vars(args), "argv": sys.argv[1:]}
    procs = Processes()
    parts = {"proxies": proxy_comparison, "streaming": streaming, "reload": reload_under_load, "stack": full_stack}
    keys = {"proxies": "proxies", "streaming": "streaming", "reload": "reload", "stack": "full_stack"}
    try:
        for part, run in parts.items():
            if not args.only or part in args.only:
                results[keys[part]] = run(args, procs)
        if args.also_threads and (not args.only or "proxies" in args.only):
            # Separate processes, so the first comparison's stay out of it.
            procs.stop()
            procs = Processes()
            results["proxies_also"] = proxy_comparison(args, procs, threads=args.also_threads)
    finally:
        procs.stop()
    if args.only:
        if not args.smoke:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
            path = os.path.join(RESULTS, f"{stamp}-only-{'-'.join(args.only)}.json")
            with open(path, "w") as f:
                json.dump(results, f, indent=2)
            log(f"wrote {path}")
        if "stack" in args.only:
            print("\n".join(full_stack_section(results["full_stack"], args)))
        print(json.dumps(results.get("proxies", {}).get("summary", {}), indent=1))
        return 0

    failures = results["reload"]["failed"]
    if args.smoke:
        path = os.path.join(WORK, "smoke.json")
        # The report is rendered too, so a change that breaks it fails CI.
        with open(os.path.join(WORK, "smoke.md"), "w") as f:
            f.write(markdown(results, args))
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
        path = os.path.join(RESULTS, f"{stamp}.json")
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
            f.write(markdown(results, args))
        log("wrote BENCHMARKS.md")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    log(f"wrote {path}")
    print(markdown(results, args) if not args.smoke else "smoke run done")
    return 1 if failures else 0


OHA_JSON = []
GATEWAY_LOG = "info"
GATEWAY_EXTRA = ""
AFFINITY = True

if __name__ == "__main__":
    sys.exit(main())
