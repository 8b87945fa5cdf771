"""Where the front door's time goes: the refit service's own CPU per Predict, and a sampled
profile of the service process, next to direct TorchServe gRPC calls on the same stack.

CPU time per call (from /proc, user + system, all of the service's threads) is what the service
adds to every Predict whatever the machine's load; wall-clock p50s are printed beside it, both
paths interleaved in rounds. With ``--profile`` (needs ``py-spy``), the service is sampled
during the refit rounds at concurrency 1 and its samples are summed by function.

Usage: PYTHONPATH=. .venv/bin/python bench/frontdoor_cost.py [--requests 300] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from predict_latency import jpeg, load, summarize, via_refit, via_torchserve_grpc
from running_stack import running_stack
from skimage import data


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sampled(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summed_by_function(collapsed: Path, top: int) -> tuple[list, list]:
    """From py-spy's raw (collapsed-stack) output: each function's share of the samples with it
    on the stack (inclusive), and with it at the top of the stack (its own time)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    share = lambda counts: [(f, n / total) for f, n in counts.most_common(top)]  # noqa: E731
    return (share(inclusive), share(own)) if total else ([], [])


def _short(frame: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (file.py:line)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="per path and concurrency")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="sample the service with py-spy")
    args = parser.parse_args()
    images = [jpeg(data.coffee()), jpeg(data.astronaut()), jpeg(data.chelsea())]
    with running_stack() as stack, tempfile.TemporaryDirectory() as tmp:
        port = int(stack.torchserve_inference.rsplit(":", 1)[1])
        paths = {
            "refit": via_refit(stack.address, stack.predict_token),
            "torchserve": via_torchserve_grpc(port, stack.torchserve_inference_key),
        }
        for concurrency in map(int, args.concurrency.split(",")):
            per_round = args.requests // args.rounds
            results = {name: ([], 0.0, 0.0) for name in paths}
            spy = None
            if args.profile and concurrency == 1:
                spy = sampled(stack.service_pid, Path(tmp) / "service.txt")
                time.sleep(1)
            for _ in range(args.rounds):
                for name, make in paths.items():
                    before = cpu_seconds(stack.service_pid)
                    latencies, seconds = load(make, images, per_round, concurrency)
                    used = cpu_seconds(stack.service_pid) - before
                    done, total, cpu = results[name]
                    results[name] = (done + latencies, total + seconds, cpu + used)
            if spy:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            print(f"\nconcurrency {concurrency}, {args.requests} requests per path")
            for name, (latencies, seconds, cpu) in results.items():
                summary = summarize(latencies, seconds)
                print(
                    f"  {name:10} p50 {summary['p50_ms']:7.2f} ms  {summary['rps']:6.1f} req/s  "
                    f"service CPU {1000 * cpu / len(latencies):5.2f} ms per call"
                )
            if spy:
                inclusive, own = summed_by_function(Path(tmp) / "service.txt", 20)
                for title, rows in (("on the stack", inclusive), ("own time", own)):
                    print(f"  service profile, share of samples, {title}:")
                    for frame, share in rows:
                        print(f"    {100 * share:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
