"""Benchmark: averaging K torch.distributed.checkpoint (DCP) steps, side by side.

What it measures
    Wall-clock seconds and peak anonymous memory (``RssAnon``, sampled every 5 ms) of one
    child process per contender, measured by bench/average.py's launcher (see its
    docstring for how). The inputs: K DCP steps of about SIZE each, written by a 2-rank
    torchrun (gloo, CPU) the way FSDP2 writes them: every tensor split by rows into two
    chunks, one ``__R_0.distcp`` per rank, a ``model`` subtree (float32) and an AdamW-like
    ``optimizer`` subtree of the same size, which is not averaged. Contenders:

    - ``floor``: read every ``.distcp`` byte once from a memory map (numpy
      ``bitwise_or.reduce`` over it in 1 MiB slices) and write one output of the model's
      size in 1 MiB writes, fsynced: the warm-cache I/O floor. It reads the optimizer
      bytes too (they lie interleaved in the same files), so it is a generous floor.
    - ``polyak``: ``polyak average RUN -o OUT.safetensors``.
    - ``polyak-dcp``: ``polyak average RUN -o OUT --format dcp`` (the newest step's
      optimizer state copied into the output).
    - ``convert``: what users do today: ``format_utils.dcp_to_torch_save`` of each step,
      then ``torch.load`` each, a running sum of the model's tensors, ``torch.save``.
    - ``dcp-load``: ``torch.distributed.checkpoint.load`` of each step's model subtree
      into preallocated tensors (no process group), a running sum, ``torch.save``.
    - ``start-floor`` and ``start-polyak``: the fixed cost inside those times, each
      process's start-up alone: ``python -c "import numpy"`` (all the floor imports)
      and ``python -m polyak --version`` (the interpreter, numpy, polyak and its CLI).

    Every contender is timed the same way, as a whole child process (interpreter
    start-up and imports included, run from bytecode caches as an installed package
    is; see ``contender_environment`` in bench/average.py), so the ratio is like for
    like. The start-up rows say how much of each time is fixed.

    ``--repeats`` rounds each run every contender once, in turn, so that a change in
    the machine's load weighs on all alike; the table shows each one's median time and
    largest peak. Before every timed run the inputs are read once, untimed, so every
    contender finds them in the page cache: on these machines the kernel pages out
    files left alone for a minute (DAMON reclaim), and a contender that met such pages
    would pay for the disk. The result replaces the README block ``bench-dcp``.

Run: ``python bench/dcp.py [--size 400MB] [--steps 4] [--repeats 5] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from average import measure_process, parse_size, remove_output, size_label, warm
from readme_block import has_readme_block, replace_readme_block

BLOCK = "bench-dcp"
SECTION = "You train with FSDP, torchtitan, Megatron or accelerate FSDP"
FLOOR_TARGET = 1.5
ANON_TARGET_MB = 256

WRITE = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
run, steps, tensors, rows, columns = sys.argv[1], *map(int, sys.argv[2:6])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
local = rows // world
for step in range(1, steps + 1):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    def shard():
        data = torch.randn(local, columns, generator=generator)
        return DTensor.from_local(data, mesh, [Shard(0)], run_check=False)
    model = {f"layers.{i}.weight": shard() for i in range(tensors)}
    optimizer = {f"state.layers.{i}.weight.exp_avg": shard() for i in range(tensors)}
    dcp.save({"model": model, "optimizer": optimizer, "step": step},
             checkpoint_id=f"{run}/step-{step}")
dist.destroy_process_group()
"""

FLOOR = """
import glob, mmap, os, sys, numpy as np
run, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
for path in sorted(glob.glob(f"{run}/step-*/*.distcp")):
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        words = np.frombuffer(mapped, np.uint8)
        words = words[: words.size // 8 * 8].view(np.uint64)
        for start in range(0, words.size, 1 << 17):
            np.bitwise_or.reduce(words[start : start + (1 << 17)])
        del words
        mapped.close()
block = bytes(1 << 20)
with open(out, "wb") as file:
    for _ in range(0, size, 1 << 20):
        file.write(block)
    os.fsync(file.fileno())
"""

CONVERT = """
import glob, sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
run, out = sys.argv[1], sys.argv[2]
steps = sorted(glob.glob(f"{run}/step-*"))
total = None
for number, step in enumerate(steps):
    converted = f"{out}.{number}.pt"
    dcp_to_torch_save(step, converted)
    model = torch.load(converted, mmap=True, weights_only=True)["model"]
    if total is None:
        total = {name: tensor.clone() for name, tensor in model.items()}
    else:
        for name, tensor in model.items():
            total[name] += tensor
    del model
torch.save({name: tensor / len(steps) for name, tensor in total.items()}, out)
for number in range(len(steps)):
    import os; os.remove(f"{out}.{number}.pt")
"""

DCP_LOAD = """
import glob, sys, warnings, torch, torch.distributed.checkpoint as dcp
warnings.filterwarnings("ignore")
run, out, tensors, rows, columns = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
steps = sorted(glob.glob(f"{run}/step-*"))
buffer = {f"layers.{i}.weight": torch.empty(rows, columns) for i in range(tensors)}
total = {name: torch.zeros(rows, columns) for name in buffer}
for step in steps:
    dcp.load({"model": buffer}, checkpoint_id=step)
    for name, tensor in buffer.items():
        total[name] += tensor
torch.save({name: tensor / len(steps) for name, tensor in total.items()}, out)
"""


def shape_for(member_bytes: int) -> tuple[int, int, int]:
    """Tensors of 2048 x 2048 float32 (16 MiB); half the member is the model."""
    rows = columns = 2048
    tensors = max(1, round(member_bytes / 2 / (rows * columns * 4)))
    return tensors, rows, columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="400MB", help="bytes per DCP step (model + optimizer)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("bench-dcp-work"))
    arguments = parser.parse_args()
    if not has_readme_block(BLOCK):
        raise SystemExit(f"README.md: no block <!-- {BLOCK}:begin ... --> under '{SECTION}'.")
    python = sys.executable
    work = arguments.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tensors, rows, columns = shape_for(parse_size(arguments.size))
    run = work / f"run-{arguments.steps}x{tensors}"
    scripts = {}
    for name, text in {
        "write": WRITE,
        "floor": FLOOR,
        "convert": CONVERT,
        "load": DCP_LOAD,
    }.items():
        scripts[name] = work / f"{name}.py"
        scripts[name].write_text(textwrap.dedent(text))
    if not (run / f"step-{arguments.steps}" / ".metadata").exists():
        shutil.rmtree(run, ignore_errors=True)
        torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        shape = [str(arguments.steps), str(tensors), str(rows), str(columns)]
        subprocess.run([*torchrun, str(scripts["write"]), str(run), *shape], check=True)
    model_bytes = tensors * rows * columns * 4
    step_bytes = sum(f.stat().st_size for f in (run / "step-1").iterdir())
    polyak = [python, "-m", "polyak", "average", str(run), "--overwrite", "-o"]
    contenders = {
        "floor": lambda out: [python, str(scripts["floor"]), str(run), out, str(model_bytes)],
        "polyak": lambda out: [*polyak, out + ".safetensors"],
        "polyak-dcp": lambda out: [*polyak, out + "-dcp", "--format", "dcp"],
        "convert": lambda out: [python, str(scripts["convert"]), str(run), out + ".pt"],
        "dcp-load": lambda out: [
            python, str(scripts["load"]), str(run), out + ".pt", str(tensors), str(rows),
            str(columns),
        ],
        "start-floor": lambda out: [python, "-c", "import numpy"],
        "start-polyak": lambda out: [python, "-m", "polyak", "--version"],
    }  # fmt: skip
    log = work / "log.txt"
    inputs = sorted(path for path in run.rglob("*") if path.is_file())
    # Round after round, every contender once per round: a change in the machine's load
    # during the run then weighs on all of them alike, not on whichever ran then.
    times: dict[str, list[float]] = {name: [] for name in contenders}
    anon: dict[str, int] = dict.fromkeys(contenders, 0)
    for _ in range(arguments.repeats):
        for name, command in contenders.items():
            out = str(work / f"out-{name}")
            warm(inputs)
            measurement = measure_process(command(out), log, 3600)
            if measurement.returncode != 0:
                raise SystemExit(f"{name} failed; see {log}")
            times[name].append(measurement.seconds)
            anon[name] = max(anon[name], measurement.peak_anon_kb)
            for suffix in ("", ".safetensors", "-dcp", ".pt"):
                remove_output(Path(out + suffix))
    results: dict[str, tuple[float, float]] = {}
    for name in contenders:
        results[name] = (statistics.median(times[name]), anon[name] / 1024)
        print(f"{name:12s} {results[name][0]:7.2f} s  {results[name][1]:7.0f} MB", flush=True)
    floor = results["floor"][0]
    lines = [
        f"{arguments.steps} DCP steps of {size_label(step_bytes)} each (2 ranks, "
        f"{tensors} float32 tensors of {rows} x {columns} in `model`, as much in `optimizer`), "
        f"median of {arguments.repeats}, {platform.machine()}, {os.cpu_count()} CPUs, "
        "warm page cache:",
        "",
        "| contender | seconds | x floor | peak anonymous memory |",
        "|---|---|---|---|",
    ]
    for name, (seconds, anon_mb) in results.items():
        lines.append(f"| {name} | {seconds:.2f} | {seconds / floor:.2f} | {anon_mb:.0f} MB |")
    polyak_ratio, polyak_anon = results["polyak"][0] / floor, results["polyak"][1]
    work_polyak = results["polyak"][0] - results["start-polyak"][0]
    work_floor = floor - results["start-floor"][0]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines += [
        "",
        f"Targets: polyak <= {FLOOR_TARGET}x the floor ({polyak_ratio:.2f}x: "
        f"{'met' if polyak_ratio <= FLOOR_TARGET else 'not met'}), peak anonymous memory "
        f"< {ANON_TARGET_MB} MB ({polyak_anon:.0f} MB: "
        f"{'met' if polyak_anon < ANON_TARGET_MB else 'not met'}). Every row is a whole "
        "process; without each one's start-up (the `start-` rows), polyak's work took "
        f"{work_polyak:.2f} s against the floor's {work_floor:.2f} s "
        f"({work_polyak / work_floor:.2f}x). Load average at the end: {load}.",
    ]
    replace_readme_block(BLOCK, "\n".join(lines), SECTION)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
