"""Under torchrun: two real processes on the gloo backend give what one process gives."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from polyak.distributed import ProcessGroup, current, launched_by_torchrun  # noqa: E402

POLYAK = [sys.executable, "-m", "polyak"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in _TORCHRUN_KEYS}
    # cwd first (the model's module), then any PYTHONPATH the tests run under.
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(cwd), os.environ.get("PYTHONPATH")])
    )
    environment["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=240
    )
    if check and completed.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr}")
    return completed


_TORCHRUN_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """Three Hugging Face checkpoint-N directories, each in four shards."""
    root = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    for step in (100, 200, 300):
        directory = root / f"checkpoint-{step}"
        directory.mkdir()
        weight_map = {}
        for shard in range(1, 5):
            name = f"model-{shard:05d}-of-00004.safetensors"
            tensors = {
                f"layer{shard}.weight": rng.normal(size=(64, 48)).astype(np.float32),
                f"layer{shard}.bias": rng.normal(size=48).astype(np.float32),
                f"layer{shard}.steps": np.array(step, dtype=np.int64),
            }
            save_file(tensors, str(directory / name), {"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_a_plain_process_has_no_group():
    assert not launched_by_torchrun()
    assert current() is None


# Runs polyak's command line, recording which floating tensors this process read from
# the members: the engine reads a tensor only to average it, so these are the tensors
# this process averaged (integer tensors, taken from the newest member, left out).
COUNTING = """
import json, os, sys
from polyak.cli.main import main
from polyak.formats.base import is_floating
from polyak.formats.safetensors import SafetensorsReader

read, averaged = SafetensorsReader.read, set()

def counting(self, name):
    if is_floating(self.info(name).dtype):
        averaged.add(name)
    return read(self, name)

SafetensorsReader.read = counting
try:
    main()
finally:
    with open(f"averaged-{os.environ.get('RANK', 'alone')}.json", "w") as file:
        json.dump(sorted(averaged), file)
"""


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="the-inputs-shards"),
        pytest.param(["--max-shard-size", "20KB"], id="several-shards"),
        pytest.param(["--max-shard-size", "1GB"], id="one-shard", marks=pytest.mark.slow),
    ],
)
def test_average_of_a_sharded_checkpoint_is_identical_with_two_processes(
    sharded_run, tmp_path, extra
):
    (tmp_path / "counting.py").write_text(COUNTING)
    arguments = ["average", str(sharded_run), "--scheme", "linear", *extra]
    run([*POLYAK, *arguments, "-o", str(tmp_path / "one") + "/"], tmp_path)
    completed = run(
        [*TORCHRUN, "counting.py", *arguments, "-o", str(tmp_path / "two") + "/"], tmp_path
    )
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert len(one) >= (1 if "1GB" in extra else 3) and one == two  # byte for byte
    assert filecmp.dircmp(tmp_path / "one", tmp_path / "two").diff_files == []
    leftovers = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".py", ".json")))
    assert leftovers == ["one", "two"]  # no temporaries, no pieces
    assert completed.stdout.count("Wrote ") == 1  # process 0 alone prints
    # Both processes averaged: each its own contiguous run of the tensors, together all.
    first, second = (json.loads((tmp_path / f"averaged-{r}.json").read_text()) for r in (0, 1))
    order = [name for name in json.loads(_index_or_names(tmp_path / "one")) if "steps" not in name]
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(order)
    assert max(order.index(name) for name in first) < min(order.index(name) for name in second)


def _index_or_names(directory: Path) -> str:
    """The tensor names of an output directory, in output order, as JSON."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return json.dumps(list(json.loads(index.read_text())["weight_map"]))
    with safe_open(directory / "model.safetensors", framework="numpy") as opened:
        return json.dumps(list(opened.keys()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "output", [pytest.param(["--max-shard-size", "1GB", "-o", "out/"], id="one-shard"),
               pytest.param(["-o", "out.safetensors"], id="one-file")],
)  # fmt: skip
def test_a_failure_on_one_process_fails_all_and_leaves_nothing(sharded_run, tmp_path, output):
    """Process 1 alone averages the last layer, which one member holds NaN in; process 0
    has written its part of the one shard (or file) by then: nothing of it is left."""
    damaged = tmp_path / "run"
    shutil.copytree(sharded_run, damaged)
    shard = damaged / "checkpoint-200" / "model-00004-of-00004.safetensors"
    tensors = load_file(shard)
    tensors["layer4.weight"][5, 7] = np.nan
    save_file(tensors, str(shard), {"format": "pt"})
    arguments = ["average", str(damaged), *output]
    completed = run([*TORCHRUN, "-m", "polyak", *arguments], tmp_path, check=False)
    assert completed.returncode != 0
    # One line per process that got to say it (torchrun stops the other once one has
    # exited), each naming the file and the tensor; torchrun's own report follows.
    errors = [line for line in completed.stderr.splitlines() if line.startswith("polyak:")]
    assert 1 <= len(errors) <= 2, completed.stderr
    for line in errors:
        # Process 1 failed; process 0 says that process 1 failed, and why.
        assert re.match(
            r"polyak: error \(process (1 of 2\)|0 of 2\): process 1 of 2 failed): checkpoint ", line
        ), line
        assert "checkpoint-200/model.safetensors.index.json: tensor layer4.weight holds NaN" in line
    assert not re.search(r'File ".*/polyak/', completed.stderr)  # no traceback of polyak's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no temporary


def test_average_to_a_single_file_is_identical_with_two_processes(sharded_run, tmp_path):
    (tmp_path / "counting.py").write_text(COUNTING)
    arguments = ["average", str(sharded_run), "--scheme", "exp:1"]
    run([*POLYAK, *arguments, "-o", str(tmp_path / "one.safetensors")], tmp_path)
    run([*TORCHRUN, "counting.py", *arguments, "-o", str(tmp_path / "two.safetensors")], tmp_path)
    assert filecmp.cmp(tmp_path / "one.safetensors", tmp_path / "two.safetensors", shallow=False)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".py", ".json")))
    assert leftovers == ["one.safetensors", "two.safetensors"]  # no temporaries, no pieces
    with safe_open(tmp_path / "one.safetensors", framework="numpy") as opened:
        order = [name for name in opened.keys() if "steps" not in name]
    first, second = (json.loads((tmp_path / f"averaged-{r}.json").read_text()) for r in (0, 1))
    assert first and second and not set(first) & set(second)  # both averaged, apart
    assert sorted(first + second) == sorted(order)


def test_a_refusal_fails_every_process_and_writes_nothing(sharded_run, tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    completed = run(
        [*TORCHRUN, "-m", "polyak", "average", str(sharded_run), "-o", str(existing) + "/",
         "--overwrite"],
        tmp_path,
        check=False,
    )  # fmt: skip
    assert completed.returncode != 0
    assert "(process 0 of 2)" in completed.stderr and "(process 1 of 2)" in completed.stderr
    assert files_of(existing) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- the sweep

NET = """
import numpy as np
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def evaluate(module):
    test, val = np.load("test.npz"), np.load("val.npz")
    module.eval()
    with torch.no_grad():
        scores = {}
        for split, data in (("test", test), ("validation", val)):
            predicted = module(torch.from_numpy(data["x"])).argmax(-1).numpy()
            scores[split] = float(np.mean(predicted == data["y"]))
            if split == "test":  # per-example outcomes, for the report's uncertainty
                scores["outcomes"] = predicted == data["y"]
    return scores
"""


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> Path:
    """A small bouncy training run's state dicts, data files and the model's module."""
    root = tmp_path_factory.mktemp("torch-sweep")
    (root / "net.py").write_text(textwrap.dedent(NET))
    x, y = datasets.make_blobs(n_samples=701, centers=3, cluster_std=2.5, random_state=4)
    x = x.astype(np.float32)
    np.savez(root / "test.npz", x=x[100:401], y=y[100:401])  # an odd count: uneven shares
    np.savez(root / "val.npz", x=x[401:], y=y[401:])
    sys.path.insert(0, str(root))
    try:
        import net
    finally:
        sys.path.remove(str(root))
    model = net.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    inputs, labels = torch.from_numpy(x[:100]), torch.from_numpy(y[:100])
    (root / "run").mkdir()
    for epoch in range(12):
        for start in range(0, 100, 25):
            loss = torch.nn.functional.cross_entropy(
                model(inputs[start : start + 25]), labels[start : start + 25]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch >= 6:
            torch.save(model.state_dict(), root / "run" / f"checkpoint_{epoch}.pt")
    return root


def sweep_report(root: Path, command: list[str], extra: list[str], name: str) -> dict:
    arguments = ["sweep", "run", "--model", "net:build", "--schemes", "equal,linear,exp:2,greedy"]
    run([*command, *arguments, *extra, "--json", name, "--overwrite"], root)
    return json.loads((root / name).read_text())


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--data", "test.npz", "--val", "val.npz"], id="data-shared-out"),
        pytest.param(["--eval", "net:evaluate"], id="candidates-shared-out"),
    ],
)
def test_sweep_is_identical_with_two_processes(torch_run, extra):
    one = sweep_report(torch_run, POLYAK, extra, "one.json")
    two = sweep_report(torch_run, [*TORCHRUN, "-m", "polyak"], extra, "two.json")
    assert one == two
    assert one["selected_on"] == "validation" and len(one["candidates"]) == 3 * 6 + 1
    # Each process kept the outcomes of what it scored; the report has them all.
    for comparison in one["uncertainty"].values():
        assert comparison["examples"] == 301 and comparison["p_value"] is not None


def test_sweep_best_model_is_identical_with_two_processes(torch_run):
    arguments = ["sweep", "run", "--model", "net:build", "--eval", "net:evaluate", "--overwrite"]
    run([*POLYAK, *arguments, "--out-model", "one.pt"], torch_run)
    run([*TORCHRUN, "-m", "polyak", *arguments, "--out-model", "two.pt"], torch_run)
    one = torch.load(torch_run / "one.pt", weights_only=True)
    two = torch.load(torch_run / "two.pt", weights_only=True)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0)


# ---------------------------------------------------------------- shares


class _Group(ProcessGroup):
    def __init__(self, rank: int, size: int) -> None:  # no torch.distributed needed
        self.rank, self.size = rank, size


@pytest.mark.parametrize(("count", "size"), [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shares_cover_every_item_once_in_order(count, size):
    shares = [range(count)[_Group(rank, size).share(count)] for rank in range(size)]
    assert [item for share in shares for item in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_items_go_round_robin():
    assert [[i for i in range(7) if _Group(rank, 3).owned(i)] for rank in range(3)] == [
        [0, 3, 6],
        [1, 4],
        [2, 5],
    ]
