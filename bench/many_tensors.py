"""Benchmark: checkpoints of many small tensors, ``polyak`` against reading every member once.

What it measures
    Members of ``--tensors`` tiny float32 tensors (4 values each, as in a large
    mixture-of-experts checkpoint's biases and norms), ``--members`` of them, as
    safetensors files. Each contender is its own child process; its wall-clock seconds
    (spawn to reap) and CPU seconds (user + system, from ``os.wait4``) are reported.
    The machine these helpers run on is shared, so CPU seconds are the steadier figure.

    - ``read-once``: the floor: ``safe_open`` each member and ``get_tensor`` every name,
      once, nothing else (what any tool that averages them must at least do).
    - ``polyak-average``: ``python -m polyak average DIR -o OUT --overwrite``.
    - ``polyak-inspect``: ``python -m polyak inspect DIR``.

    Before the fix of the check that members hold the same tensors (a set of all names
    built once per name), time grew with the square of the tensor count: 2 x 30,000
    tensors took 70 s of CPU to inspect.

Run:
    python bench/many_tensors.py [--tensors 30000] [--members 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

READ_ONCE = """
import sys
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path, framework="numpy") as handle:
        for name in handle.keys():
            handle.get_tensor(name)
"""


def timed(command: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed with exit code {process.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=30_000)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        run = Path(temporary) / "run"
        run.mkdir()
        for step in range(1, arguments.members + 1):
            tensors = {
                f"experts.{i}.bias": np.full(4, step, np.float32) for i in range(arguments.tensors)
            }
            save_file(tensors, str(run / f"model_{step}.safetensors"))
        files = [str(path) for path in sorted(run.iterdir())]
        out = str(Path(temporary) / "avg.safetensors")
        contenders = {
            "read-once": [sys.executable, "-c", READ_ONCE, *files],
            "polyak-average": [sys.executable, "-m", "polyak", "average", str(run), "-o", out,
                               "--overwrite"],
            "polyak-inspect": [sys.executable, "-m", "polyak", "inspect", str(run)],
        }  # fmt: skip
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        for _ in range(arguments.repeats):
            for name, command in contenders.items():
                results[name].append(timed(command))
    floor_wall = min(wall for wall, _ in results["read-once"])
    floor_cpu = min(cpu for _, cpu in results["read-once"])
    print(f"{arguments.members} members x {arguments.tensors} tensors, best of {arguments.repeats}")
    print(f"{'contender':<16} {'wall s':>8} {'cpu s':>8} {'wall/floor':>11} {'cpu/floor':>10}")
    for name, runs in results.items():
        wall = min(w for w, _ in runs)
        cpu = min(c for _, c in runs)
        print(
            f"{name:<16} {wall:8.2f} {cpu:8.2f} {wall / floor_wall:11.2f} {cpu / floor_cpu:10.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
