"""A/B of the ingest path: the gateway from two source trees, in alternating short runs.

    git worktree add /tmp/base main                    # the tree to compare against
    .venv/bin/python bench/compare.py /tmp/base .      # [--runs 4] [--seconds 4]

This machine's speed drifts by 20% within minutes, so two ``bench/ingest.py`` runs minutes apart
cannot show a 5% change. Here the two trees take turns (A B A B ...), each run a fresh gateway on
bench/ingest.py's embedded-default shape (SQLite journal + storage sink, pinned to CPU 0, wrk on
CPU 1, distinct signed bodies). Printed per run and as means: requests/s and the gateway's CPU
time per request (all its threads, from /proc), and the ratio of the means. Figures only, no
pass/fail; the CPU per request is the steadier figure of the two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import ingest  # noqa: E402 - the bodies, wrk driver and server handling of bench/ingest.py


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of every thread of ``pid``."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def one_run(tree: Path, bodies: Path, warm_up: Path, seconds: float,
            connections: int) -> tuple[float, float]:
    """(requests/s, CPU microseconds per request) of the gateway from ``tree``."""
    data = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    port, metrics_port = ingest.free_port(), ingest.free_port()
    config = data / "gateway.toml"
    config.write_text(f'[server]\nport = {port}\nmetrics_port = {metrics_port}\n'
                      f'data_dir = "{data}"\n[logging]\nlevel = "warning"\n'
                      f'[channels.whatsapp]\napp_secret = "{ingest.SECRET.decode()}"\n'
                      "[sinks.storage]\n")
    # The tree's packages come first on the path; the plugins' entry points are the installed
    # project's, and name the same modules (gateway, channels.*, sinks.*).
    server = ingest.Server([ingest.PYTHON, "-m", "gateway", "serve", "--config", str(config)],
                           port, env={"PYTHONPATH": str(tree)}, cwd=str(tree))
    try:
        ingest.run_wrk(port, warm_up, 2, connections)
        before = cpu_ticks(server.proc.pid)
        result = ingest.run_wrk(port, bodies, seconds, connections)
        ticks = cpu_ticks(server.proc.pid) - before
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
    return result["rps"], ticks / os.sysconf("SC_CLK_TCK") / result["requests"] * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="source tree A (e.g. a git worktree of main)")
    parser.add_argument("b", type=Path, help="source tree B (e.g. .)")
    parser.add_argument("--runs", type=int, default=4, help="runs of each tree")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    trees = [args.a.resolve(), args.b.resolve()]
    for tree in trees:
        if not (tree / "gateway" / "__init__.py").exists():
            print(f"compare.py: {tree} is not a source tree of this project", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        return compare(args, trees, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, trees: list[Path], work: Path) -> int:
    bodies, warm_up = work / "bodies.txt", work / "warm-up.txt"
    count = int(15_000 * args.seconds)
    ingest.write_bodies(bodies, count)
    ingest.write_bodies(warm_up, ingest.WARM_UP_BODIES, first=count)  # no id of the runs'
    figures: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for run in range(args.runs):
        for label, tree in zip("AB", trees, strict=True):
            rps, cpu = one_run(tree, bodies, warm_up, args.seconds, args.connections)
            figures[tree].append((rps, cpu))
            print(f"run {run + 1} {label}: {rps:8.0f} req/s {cpu:7.1f} us CPU per request")
    means = {}
    for label, tree in zip("AB", trees, strict=True):
        rows = figures[tree]
        means[label] = (sum(r for r, _ in rows) / len(rows), sum(c for _, c in rows) / len(rows))
        print(f"mean {label}: {means[label][0]:8.0f} req/s {means[label][1]:7.1f} us CPU per "
              f"request  ({tree})")
    print(f"B / A: {means['B'][0] / means['A'][0]:.3f} x req/s, "
          f"{means['B'][1] / means['A'][1]:.3f} x CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
