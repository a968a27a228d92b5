"""Ingest benchmark: the gateway's durable webhook path against a bare aiohttp server.

    .venv/bin/python bench/ingest.py            # full run (~2 minutes)
    .venv/bin/python bench/ingest.py --quick    # smoke run (~30 s)

Both servers run pinned to CPU 0 (``taskset -c 0``), the load generator ``wrk`` to CPU 1, over
127.0.0.1. Every request is a distinct, correctly signed WhatsApp text webhook (a duplicate would be
a cheaper path); each server is warmed up for 2 s first, the gateway on bodies of its own. The
bare server is measured right before and right after the gateway's burst, and the ratio is taken
against the mean of the two (this machine's speed drifts within minutes). The gateway runs on its
embedded-default shape: the durable SQLite journal (``synchronous=FULL``, group commit) and the
SQLite ``storage`` sink. Printed: requests/s and p50/p99 latency of both, their ratio; p99 at half
the gateway's peak rate; how long the sinks take to catch up after the peak burst; the gateway's
peak RSS. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
PYTHON = sys.executable
SECRET = b"bench-app-secret"
WARM_UP_BODIES = 40_000  # 2 s of warm-up at up to 20,000 req/s
TARGETS = {"ratio": 0.65, "p99_half_ms": 20.0, "catch_up_s": 2.0, "rss_mb": 150.0}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_bodies(path: Path, count: int, first: int = 0) -> None:
    """``count`` distinct signed webhook bodies, one ``signature<TAB>body`` per line, numbered
    from ``first`` (files with disjoint ranges share no message id)."""
    template = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "190000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001000",
                         "phone_number_id": "100000000000001"},
            "contacts": [{"profile": {"name": "Bench Customer"}, "wa_id": ""}],
            "messages": [{"from": "", "id": "", "timestamp": "", "type": "text",
                          "text": {"body": ""}}]}}]}],
    }
    value = template["entry"][0]["changes"][0]["value"]
    with open(path, "w") as out:
        for i in range(first, first + count):
            customer = f"1555{i % 997:07d}"
            value["contacts"][0]["wa_id"] = customer
            message = value["messages"][0]
            message.update({"from": customer,
                            "id": f"wamid.BENCH.{i:09d}.HBgLMTU1NTAwMDEyMzQVAgASGBQ",
                            "timestamp": str(1760000000 + i // 100)})
            message["text"]["body"] = f"Bench message {i}: is my order on its way? Caf\u00e9 \u2615"
            body = json.dumps(template, separators=(",", ":")).encode()
            sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            out.write(sig + "\t" + body.decode() + "\n")


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout}s")


class Server:
    """A server process pinned to CPU 0."""

    def __init__(self, argv: list[str], port: int, env: dict | None = None, cwd: str | None = None):
        self.port = port
        log = open(Path(tempfile.gettempdir()) / f"bench-server-{port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(["taskset", "-c", "0", *argv],
                                     env={**os.environ, **(env or {})},
                                     cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/healthz")

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def run_wrk(port: int, bodies: Path, seconds: float, connections: int, delay_ms: float = 0,
            sample=None) -> dict:
    """Run wrk on CPU 1; return requests/s, p50/p99 (ms), request and error counts."""
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s",
            "--latency", "-s", str(HERE / "wrk_post.lua"), f"http://127.0.0.1:{port}"]
    env = {**os.environ, "BODIES_FILE": str(bodies), "DELAY_MS": str(delay_ms)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if sample:
            sample()
        time.sleep(0.5)
    out = proc.stdout.read()
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s|m)\b", out).groups()
        result[f"p{pct}_ms"] = float(value) * UNITS[unit]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(bad.group(1)) if bad else 0
    result["socket_errors"] = errors.group(1) if errors else "none"
    return result


def metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def stored(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def start_gateway(data: Path) -> tuple[Server, int]:
    port, metrics_port = free_port(), free_port()
    config = data / "gateway.toml"
    config.write_text(f'[server]\nport = {port}\nmetrics_port = {metrics_port}\n'
                      f'data_dir = "{data}"\n[logging]\nlevel = "warning"\n'
                      f'[channels.whatsapp]\napp_secret = "{SECRET.decode()}"\n[sinks.storage]\n')
    gw = Server([str(Path(PYTHON).with_name("gateway")), "serve", "--config", str(config)], port,
                cwd=str(data))
    return gw, metrics_port


def catch_up(db: Path, metrics_port: int, timeout: float = 120.0) -> tuple[float, int, int]:
    """Seconds from now until every accepted request is in the storage sink."""
    accepted = int(metric(metrics_port, "gateway_webhook_requests_total",
                          'channel="whatsapp",outcome="accepted"'))
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        have = stored(db)
        if have >= accepted:
            return time.monotonic() - start, accepted, have
        time.sleep(0.05)
    return float("inf"), accepted, stored(db)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~30 s)")
    parser.add_argument("--duration", type=float, default=10.0, help="peak runs, seconds")
    parser.add_argument("--soak", type=float, default=60.0,
                        help="half-rate run (p99, RSS), seconds")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.soak = 3.0, 8.0
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            print(f"ingest.py: {tool} is not installed (make install installs wrk)",
                  file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    count = int(max(60_000, 12_000 * (args.duration + 1)))
    bodies = work / "bodies.txt"
    t0 = time.monotonic()
    write_bodies(bodies, count)
    warm_up = work / "warm-up.txt"
    write_bodies(warm_up, WARM_UP_BODIES, first=count)
    print(f"{count} distinct signed bodies ({bodies.stat().st_size / 1e6:.0f} MB) in "
          f"{time.monotonic() - t0:.1f}s; servers on CPU 0, wrk on CPU 1, "
          f"{args.connections} connections")

    # The bare server runs right before and right after the gateway's burst, and the ratio is
    # taken against the mean of the two: this machine's speed drifts within minutes.
    # Each server runs alone: the gateway starts after the first bare run and stops (caught up)
    # before the second; the bare server, idle meanwhile, waits in epoll.
    bare = Server([PYTHON, str(HERE / "bare_server.py"), str(port := free_port())], port)
    data = work / "peak"
    data.mkdir()
    peak_rss = [0.0]
    try:
        run_wrk(port, bodies, 2, args.connections)  # warm-up
        before = run_wrk(port, bodies, args.duration, args.connections)
        gw, metrics_port = start_gateway(data)
        try:
            # Warmed up like the bare server, on bodies of their own: the peak run's are new.
            run_wrk(gw.port, warm_up, 2, args.connections)
            peak = run_wrk(gw.port, bodies, args.duration, args.connections,
                           sample=lambda: peak_rss.__setitem__(0, max(peak_rss[0], gw.rss_mb())))
            lag, accepted, have = catch_up(data / "storage.db", metrics_port)
        finally:
            gw.stop()
        after = run_wrk(port, bodies, args.duration, args.connections)
    finally:
        bare.stop()
    base = {key: (before[key] + after[key]) / 2 for key in ("rps", "p50_ms", "p99_ms")}
    base.update(non_2xx=before["non_2xx"] + after["non_2xx"], runs=(before, after))
    if peak["requests"] > count:
        print(f"warning: {peak['requests']} requests > {count} bodies: some bodies were repeated")

    data = work / "soak"
    data.mkdir()
    gw, metrics_port = start_gateway(data)
    conns = 32
    rate = peak["rps"] / 2
    delay_ms = conns * 1000.0 / rate  # each connection waits this long between requests
    rss = [0.0]
    try:
        half = run_wrk(gw.port, bodies, args.soak, conns, delay_ms,
                       sample=lambda: rss.__setitem__(0, max(rss[0], gw.rss_mb())))
    finally:
        gw.stop()

    report(base, peak, half, rate, lag, accepted, have, max(rss[0], peak_rss[0]), args)
    return 0


def report(base, peak, half, rate, lag, accepted, have, rss, args) -> None:
    ratio = peak["rps"] / base["rps"]
    print()
    print(f"{'':28}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}")
    for label, run in zip(("bare, before the gateway", "bare, after the gateway"), base["runs"],
                          strict=True):
        print(f"{label:28}{run['rps']:>12.0f}{run['p50_ms']:>10.2f}{run['p99_ms']:>10.2f}"
              f"{run['non_2xx']:>10}")
    print(f"{'bare aiohttp, mean':28}{base['rps']:>12.0f}{base['p50_ms']:>10.2f}"
          f"{base['p99_ms']:>10.2f}{base['non_2xx']:>10}")
    print(f"{'gateway (journal+storage)':28}{peak['rps']:>12.0f}{peak['p50_ms']:>10.2f}"
          f"{peak['p99_ms']:>10.2f}{peak['non_2xx']:>10}")
    print(f"{'gateway at half peak':28}{half['rps']:>12.0f}{half['p50_ms']:>10.2f}"
          f"{half['p99_ms']:>10.2f}{half['non_2xx']:>10}   (target rate {rate:.0f}/s, "
          f"{args.soak:.0f} s)")
    print()
    low, high = (peak["rps"] / r["rps"] for r in sorted(base["runs"], key=lambda r: -r["rps"]))
    print(f"throughput ratio gateway/bare : {ratio:.2f}   (target >= {TARGETS['ratio']}; "
          f"{low:.2f}-{high:.2f} against either bare run alone)")
    print(f"p99 ack at half peak          : {half['p99_ms']:.2f} ms   "
          f"(target < {TARGETS['p99_half_ms']} ms)")
    print(f"sinks caught up after burst   : {lag:.2f} s after {args.duration:.0f} s of load "
          f"({have}/{accepted} accepted requests stored)   (target < {TARGETS['catch_up_s']} s)")
    print(f"gateway peak RSS              : {rss:.0f} MB   (target < {TARGETS['rss_mb']:.0f} MB)")


if __name__ == "__main__":
    sys.exit(main())
