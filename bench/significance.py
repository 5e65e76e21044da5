"""How much time the sweep's uncertainty adds: both comparisons on 10,000 test examples.

Every sweep report compares the selected candidate with the final model and with the
best single member (``SweepResult.comparisons``): two paired bootstraps of 2,000
resamples, and McNemar's exact test for accuracy. The target: under 1 s in all on
10,000 test examples. Timed here for correct-or-not outcomes (accuracy) and for
per-example losses, each ``--repeats`` times; min and median of the two comparisons
together, in wall time and in this process's CPU time (on a shared machine the
wall time also counts the other processes' turns).

Usage:
    .venv/bin/python bench/significance.py [--examples 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from polyak.significance import compare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    count = args.examples
    cases = {
        "accuracy (bool)": (rng.random((3, count)) < 0.8),
        "loss (float64)": rng.gamma(2.0, size=(3, count)),
    }
    print(f"{count} test examples, 2 comparisons per sweep, {args.repeats} repeats")
    for name, (selected, final, best_single) in cases.items():
        times, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            compare(selected, final, higher_is_better=True, against="the final model")
            compare(selected, best_single, higher_is_better=True, against="the best single")
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        print(
            f"{name:16}: wall min {min(times):.3f} s, median {statistics.median(times):.3f} s; "
            f"CPU min {min(cpu):.3f} s, median {statistics.median(cpu):.3f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
