"""torch.distributed.checkpoint directories: real ones, written by torch in the test run.

Fixtures: a 2-rank FSDP2 run under torchrun (gloo, CPU) saving three steps with model and
AdamW state; a single-process ``dcp.save`` of the same model (a member saved with another
world size); saves with SAFETENSORS payloads; and Megatron-shaped ``iter_XXXXXXX/``
directories. megatron-core's own ``torch_dist`` save calls CUDA unconditionally and does
not run on this CPU-only machine, so the Megatron-shaped checkpoints are written with plain
DCP, as megatron-core writes them: flat dotted keys, tensor-parallel splits as chunks at
row offsets (DTensor ``Shard``), an ``_extra_state`` bytes entry, ``common.pt``,
``metadata.json`` and ``latest_checkpointed_iteration.txt``.

The reference is torch's own ``format_utils.dcp_to_torch_save`` of each member, then a
float64 average.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polyak import average, average_to  # noqa: E402
from polyak.discovery import find_checkpoints  # noqa: E402
from polyak.errors import CheckpointError, IncompatibleCheckpointsError, OutputError  # noqa: E402
from polyak.formats import open_checkpoint  # noqa: E402
from polyak.formats.dcp import DcpReader  # noqa: E402

POLYAK = [sys.executable, "-m", "polyak"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
_TORCHRUN_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}

MODEL = """
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.ReLU(), torch.nn.Linear(33, 4))

def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
"""

SAVE = """
import io, json, os, sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from dcp_model import batch, build

root = sys.argv[1]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
model = build()
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
x, y = batch()
for step in (1, 2, 3):
    loss = ((model(x) - y) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": step}
    dcp.save(state, checkpoint_id=f"{root}/fsdp/step-{step}")

# Megatron torch_dist layout, written with plain DCP (megatron-core's save needs CUDA).
for iteration in (100, 200):
    generator = torch.Generator().manual_seed(iteration)
    full = {
        "embedding.word_embeddings.weight": (torch.randn(10, 6, generator=generator), Shard(0)),
        "decoder.layers.self_attention.linear_qkv.weight": (
            torch.randn(2, 18, 6, generator=generator), Shard(1)),
        "decoder.final_layernorm.weight": (torch.randn(6, generator=generator), Replicate()),
        "optimizer.state.exp_avg.embedding.word_embeddings.weight": (
            torch.randn(10, 6, generator=generator), Shard(0)),
    }
    state = {k: distribute_tensor(v, mesh, [p]) for k, (v, p) in full.items()}
    state["decoder.layers.self_attention.core_attention._extra_state/shard_0_2"] = io.BytesIO(
        b"transformer-engine extra state")
    state["rng_state/shard_0.0_1.2"] = io.BytesIO(b"rng")
    directory = f"{root}/megatron/iter_{iteration:07d}"
    dcp.save(state, checkpoint_id=directory)
    if dist.get_rank() == 0:
        torch.save({"iteration": iteration, "checkpoint_version": 3.0}, f"{directory}/common.pt")
        backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
        with open(f"{directory}/metadata.json", "w") as file:
            json.dump(backend, file)
if dist.get_rank() == 0:
    with open(f"{root}/megatron/latest_checkpointed_iteration.txt", "w") as file:
        file.write("200")
# Every process reaches this point before any leaves the group: one that left while
# another still talked to it made gloo abort at exit ("terminate called without an
# active exception"), as polyak.distributed.shut_down avoids for polyak's own runs.
dist.barrier()
dist.destroy_process_group()
# Even so, a rank can still abort that way in torch's C++ teardown after this point
# (exit code -6, seen in CI): all this script writes is written, so it leaves without
# the interpreter's teardown, which is torch's, not what the tests are about.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

LOAD = """
import json, os, sys
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from dcp_model import batch, build

checkpoint, expected, result = sys.argv[1:4]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = build()
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model_state, optimizer_state = get_state_dict(model, optimizer)
state = {"model": model_state, "optimizer": optimizer_state}
dcp.load(state, checkpoint_id=checkpoint)
set_state_dict(model, optimizer, model_state_dict=state["model"],
               optim_state_dict=state["optimizer"])
reference = np.load(expected)
loaded = {k: v.full_tensor().detach().numpy() for k, v in model.state_dict().items()}
difference = max(float(np.abs(loaded[k] - reference[k]).max()) for k in reference)
steps = sorted({float(s["step"]) for s in optimizer.state.values()})
x, y = batch()
loss = ((model(x) - y) ** 2).mean()
optimizer.zero_grad()
loss.backward()
optimizer.step()
after = {k: v.full_tensor().detach().numpy() for k, v in model.state_dict().items()}
moved = all(not np.array_equal(after[k], loaded[k]) for k in loaded)
if dist.get_rank() == 0:
    with open(result, "w") as file:
        json.dump({"difference": difference, "loss": float(loss), "steps": steps,
                   "moved": moved}, file)
# Every process reaches this point before any leaves the group: one that left while
# another still talked to it made gloo abort at exit ("terminate called without an
# active exception"), as polyak.distributed.shut_down avoids for polyak's own runs.
dist.barrier()
dist.destroy_process_group()
# Even so, a rank can still abort that way in torch's C++ teardown after this point
# (exit code -6, seen in CI): all this script writes is written, so it leaves without
# the interpreter's teardown, which is torch's, not what the tests are about.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in _TORCHRUN_KEYS}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(cwd), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    environment["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )
    if check and completed.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr}")
    return completed


def scripts(directory: Path) -> None:
    (directory / "dcp_model.py").write_text(textwrap.dedent(MODEL))
    (directory / "dcp_save.py").write_text(textwrap.dedent(SAVE))
    (directory / "dcp_load.py").write_text(textwrap.dedent(LOAD))


def dcp_save(state: dict, directory: Path, **options) -> None:
    """``dcp.save`` in this process, without a process group (a world of one)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        if options:
            writer = dcp.FileSystemWriter(str(directory), **options)
            dcp.save(state, storage_writer=writer)
        else:
            dcp.save(state, checkpoint_id=str(directory))


def reference(directory: Path, tmp: Path) -> dict:
    """torch's own conversion of a DCP directory to one torch.save file, loaded."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{directory.parent.name}-{directory.name}.pt"
    dcp_to_torch_save(str(directory), str(target))
    return torch.load(target, weights_only=False)


def mean64(arrays: list, weights: list[float] | None = None) -> np.ndarray:
    weights = weights or [1.0] * len(arrays)
    total = sum(w * np.asarray(a, dtype=np.float64) for w, a in zip(weights, arrays, strict=True))
    return total / sum(weights)


def as_numpy(tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.numpy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The 2-rank FSDP2 run (step-1..3), a 1-process member step-0, Megatron iterations."""
    root = tmp_path_factory.mktemp("dcp")
    scripts(root)
    # torch's own FSDP2 training and dcp.save write the fixture (no polyak in it). Its
    # torchrun start failed once in many runs on a loaded machine, failing every test of
    # this module: it is tried a second time, and both errors are shown if that fails too.
    first = run([*TORCHRUN, "dcp_save.py", str(root)], root, check=False)
    if first.returncode != 0:
        for partial in ("fsdp", "megatron"):
            shutil.rmtree(root / partial, ignore_errors=True)
        again = run([*TORCHRUN, "dcp_save.py", str(root)], root, check=False)
        if again.returncode != 0:
            pytest.fail(
                f"the FSDP2 fixture run failed twice:\n{first.stderr[-3000:]}\n---\n"
                f"{again.stderr[-3000:]}"
            )
    sys.path.insert(0, str(root))
    try:
        from dcp_model import build  # the same architecture, no FSDP: a world of one
    finally:
        sys.path.remove(str(root))
    model = build()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    dcp_save({"model": model.state_dict(), "step": 0}, root / "fsdp" / "step-0")
    return root


def test_fsdp2_step_reads_as_torch_converts_it(runs, tmp_path):
    directory = runs / "fsdp" / "step-3"
    expected = reference(directory, tmp_path)
    with DcpReader(directory) as reader:
        assert reader.selection == "subtree 'model' (the model's weights)"
        assert reader.world_size() == 2
        assert reader.names() == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert [len(reader.entry(name).chunks) for name in reader.names()] == [2, 2, 2, 2]
        assert reader.entry("0.weight").chunks[1].offsets == (17, 0)  # 33 rows: 17 and 16
        for name in reader.names():
            np.testing.assert_array_equal(reader.read(name), expected["model"][name].numpy())
        assert set(reader.subtrees()) == {"model", "optimizer", "step"}
    with DcpReader(directory, key="optimizer") as reader:
        np.testing.assert_array_equal(
            reader.read("state.0.weight.exp_avg"),
            expected["optimizer"]["state"]["0.weight"]["exp_avg"].numpy(),
        )


def test_reading_a_dcp_directory_imports_no_torch(runs):
    code = (
        "import sys; from polyak.formats.dcp import DcpReader; "
        f"r = DcpReader({str(runs / 'fsdp' / 'step-3')!r}); [r.read(n) for n in r.names()]; "
        "print('torch' in sys.modules)"
    )
    completed = run([sys.executable, "-c", code], runs)
    assert completed.stdout.strip() == "False"


def test_average_of_fsdp2_steps_and_another_world_size_matches_torch(runs, tmp_path):
    members = [runs / "fsdp" / f"step-{step}" for step in (3, 2, 1, 0)]  # newest first
    found = find_checkpoints(runs / "fsdp")
    assert [checkpoint.path for checkpoint in found] == members
    assert [checkpoint.step for checkpoint in found] == [3, 2, 1, 0]
    references = [reference(member, tmp_path)["model"] for member in members]
    result = average_to(runs / "fsdp", tmp_path / "averaged", scheme="linear")
    assert result.selection == "subtree 'model' (the model's weights)"
    assert [path.name for path in result.files] == ["model.safetensors"]
    from safetensors.numpy import load_file

    averaged = load_file(tmp_path / "averaged" / "model.safetensors")
    weights = [4.0, 3.0, 2.0, 1.0]  # linear, newest first
    with DcpReader(members[-1]) as reader:  # step-0, saved by one process
        entries = [reader.entry(name) for name in reader.names()]
        aligned = [
            reader.chunk_array(e, chunk).flags.aligned for e in entries for chunk in e.chunks
        ]
    # torch writes a payload wherever its file has reached: these float32 chunks start at
    # odd offsets, which the engine copies into its aligned scratch before computing.
    assert not all(aligned)
    assert set(averaged) == set(references[0])
    for name, value in averaged.items():
        expected = mean64([r[name].numpy() for r in references], weights)
        np.testing.assert_allclose(value, expected, rtol=2e-6, atol=1e-7)
        assert value.dtype == np.float32


def test_averaging_identical_members_gives_them_back_exactly(runs):
    step = runs / "fsdp" / "step-2"
    averaged = average([step, step.parent / "step-1"], scheme="custom:1,0")
    with DcpReader(step) as reader:
        for name in reader.names():
            np.testing.assert_array_equal(averaged[name], reader.read(name))


def test_inspect_shows_subtrees_world_size_and_step(runs):
    completed = run([*POLYAK, "inspect", str(runs / "fsdp"), "--json"], runs)
    rows = json.loads(completed.stdout)["checkpoints"]
    assert [row["step"] for row in rows] == [3, 2, 1, 0]
    assert [row["dcp"]["world_size"] for row in rows] == [2, 2, 2, 1]
    subtrees = rows[0]["dcp"]["subtrees"]
    assert subtrees["model"] == {"tensors": 4, "bytes": (33 * 8 + 33 + 4 * 33 + 4) * 4,
                                 "byte_entries": 0}  # fmt: skip
    assert subtrees["optimizer"]["tensors"] == 12
    assert json.loads(completed.stdout)["compatible"]
    text = run([*POLYAK, "inspect", str(runs / "fsdp" / "step-3")], runs).stdout
    assert "DCP saved by 2 rank(s)" in " ".join(text.split())


def test_dcp_output_loads_into_the_fsdp2_model_on_two_ranks_and_trains(runs, tmp_path):
    members = [runs / "fsdp" / f"step-{step}" for step in (3, 2, 1)]
    references = [reference(member, tmp_path)["model"] for member in members]
    expected = {name: mean64([r[name].numpy() for r in references]) for name in references[0]}
    np.savez(tmp_path / "expected.npz", **expected)
    out = tmp_path / "averaged-dcp"
    completed = run(
        [*POLYAK, "average", *map(str, members), "-o", str(out), "--format", "dcp"], runs
    )
    assert "Kept the newest member's other entries" in " ".join(completed.stdout.split())
    assert sorted(path.name for path in out.iterdir()) == [".metadata", "__0_0.distcp"]
    result = tmp_path / "load.json"
    run([*TORCHRUN, "dcp_load.py", str(out), str(tmp_path / "expected.npz"), str(result)], runs)
    loaded = json.loads(result.read_text())
    assert loaded["difference"] < 1e-6
    assert loaded["steps"] == [3.0]  # the newest member's AdamW state was kept
    assert np.isfinite(loaded["loss"]) and loaded["moved"]


def test_dcp_output_without_optimizer_loads_in_one_process(runs, tmp_path):
    import torch.distributed.checkpoint as dcp

    members = [runs / "fsdp" / "step-3", runs / "fsdp" / "step-0"]  # world sizes 2 and 1
    out = tmp_path / "model-only"
    result = average_to(members, out, format="dcp", keep_other=False)
    assert result.other_entries == "dropped"
    with DcpReader(out) as reader:
        assert set(reader.subtrees()) == {"model"}
        assert reader.world_size() == 1
    references = [reference(member, tmp_path)["model"] for member in members]
    sys.path.insert(0, str(runs))
    try:
        from dcp_model import build
    finally:
        sys.path.remove(str(runs))
    model = build()
    state = {"model": model.state_dict()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(out))
    model.load_state_dict(state["model"])
    for name, value in model.state_dict().items():
        expected = mean64([r[name].numpy() for r in references])
        np.testing.assert_allclose(value.numpy(), expected, rtol=2e-6, atol=1e-7)


def test_safetensors_payloads_are_read(tmp_path):
    generator = torch.Generator().manual_seed(3)
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    saved = []
    for step in (1, 2, 3):
        state = {
            "weight": torch.randn(5, 3, generator=generator),
            "half": torch.randn(4, generator=generator).bfloat16(),
            "count": torch.tensor(step),
        }
        saved.append(state)
        directory = tmp_path / "run" / f"step-{step}"
        dcp_save(
            {"model": state, "step": step},
            directory,
            serialization_format=SerializationFormat.SAFETENSORS,
        )
    with DcpReader(tmp_path / "run" / "step-1") as reader:  # a safetensors blob, no zip
        payload = reader.payload_bytes(reader.entry("weight").chunks[0].payload)
        assert payload[:2].tobytes() != b"PK"
    averaged = average(tmp_path / "run")
    np.testing.assert_allclose(
        averaged["weight"], mean64([s["weight"].numpy() for s in saved]), rtol=2e-6, atol=1e-7
    )
    half = mean64([as_numpy(s["half"]) for s in saved])
    np.testing.assert_allclose(averaged["half"].astype(np.float64), half, rtol=2**-8)
    assert averaged["count"] == 3 and averaged["count"].dtype == np.int64  # the newest, exact


def test_megatron_iterations_are_found_and_averaged(runs, tmp_path):
    root = runs / "megatron"
    found = find_checkpoints(root)
    assert [checkpoint.path.name for checkpoint in found] == ["iter_0000200", "iter_0000100"]
    assert [checkpoint.step for checkpoint in found] == [200, 100]
    with open_checkpoint(found[0].path) as reader:
        assert reader.selection == "the top-level model entries, without optimizer, rng_state"
        assert sorted(reader.names()) == [
            "decoder.final_layernorm.weight",
            "decoder.layers.self_attention.linear_qkv.weight",
            "embedding.word_embeddings.weight",
        ]
        qkv = reader.entry("decoder.layers.self_attention.linear_qkv.weight")
        assert [chunk.offsets for chunk in qkv.chunks] == [(0, 0, 0), (0, 9, 0)]  # TP split
        assert list(reader.extras) == [
            "decoder.layers.self_attention.core_attention._extra_state/shard_0_2"
        ]
    references = [reference(checkpoint.path, tmp_path) for checkpoint in found]
    averaged = average(root)
    assert set(averaged) == set(reader.names())
    for name, value in averaged.items():
        expected = mean64([r[name].numpy() for r in references])
        np.testing.assert_allclose(value, expected, rtol=2e-6, atol=1e-7)
    optimizer = average(root, key="optimizer")
    assert list(optimizer) == ["state.exp_avg.embedding.word_embeddings.weight"]
    out = tmp_path / "megatron-average"
    average_to(root, out, format="dcp")
    name = "decoder.layers.self_attention.core_attention._extra_state/shard_0_2"
    with DcpReader(out) as written, DcpReader(found[0].path) as newest:
        copied = written.payload_bytes(written.entries[name].payload).tobytes()
        assert copied == newest.payload_bytes(newest.entries[name].payload).tobytes()
    converted = reference(out, tmp_path)
    np.testing.assert_array_equal(
        converted["decoder.final_layernorm.weight"].numpy(),
        averaged["decoder.final_layernorm.weight"],
    )
    assert converted["rng_state/shard_0.0_1.2"].getvalue() == b"rng"


def test_accelerate_fsdp_checkpoint_directories_are_found(runs, tmp_path):
    import shutil

    for step in (10, 20):
        target = tmp_path / "out" / f"checkpoint-{step}"
        shutil.copytree(runs / "fsdp" / f"step-{step // 10}", target / "pytorch_model_fsdp_0")
        (target / "optimizer_0").mkdir()
        (target / "trainer_state.json").write_text("{}")
    found = find_checkpoints(tmp_path / "out")
    assert [checkpoint.step for checkpoint in found] == [20, 10]
    averaged = average(tmp_path / "out")
    expected = average([runs / "fsdp" / "step-2", runs / "fsdp" / "step-1"])
    for name in expected:
        np.testing.assert_array_equal(averaged[name], expected[name])


# --- bad input ------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path) -> Path:
    directory = tmp_path / "step-1"
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(6, 2, generator=generator), "b": torch.randn(6, generator=generator)}
    dcp_save({"model": state, "step": 1}, directory)
    return directory


def rewrite_metadata(directory: Path, change) -> None:
    """Change our own trusted fixture's metadata with pickle (as torch wrote it)."""
    path = directory / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def storage_of(metadata, fqn):
    return next(info for index, info in metadata.storage_data.items() if index.fqn == fqn)


class _CreatesAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_hostile_metadata_never_runs(small, tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    hostile = pickle.dumps(_CreatesAFile(marker))
    pickle.loads(hostile)  # what torch's pickle.load would do: it runs
    assert marker.exists()
    marker.rmdir()
    (small / ".metadata").write_bytes(hostile)
    with pytest.raises(
        CheckpointError, match=r"\.metadata: refused to unpickle global posix\.mkdir"
    ):
        DcpReader(small)
    completed = run([*POLYAK, "inspect", str(small)], tmp_path, check=False)
    assert completed.returncode == 2
    assert "refused to unpickle global posix.mkdir" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_metadata_of_torch_before_2_3_is_read_the_same(small, tmp_path):
    """torch 1.13 to 2.2 pickled TensorProperties from ShardedTensor's module."""
    from torch.distributed._shard.sharded_tensor import metadata as sharded

    with DcpReader(small) as reader:
        expected = {name: (reader.info(name), reader.read(name).copy()) for name in reader.names()}

    def as_old_torch_wrote_it(metadata):
        for value in metadata.state_dict_metadata.values():
            properties = getattr(value, "properties", None)
            if properties is not None:
                value.properties = sharded.TensorProperties(dtype=properties.dtype)

    rewrite_metadata(small, as_old_torch_wrote_it)
    written = (small / ".metadata").read_bytes()
    assert b"torch.distributed._shard.sharded_tensor.metadata" in written
    assert b"MEM_FORMAT_ENCODING" in written and b"_MEM_FORMAT_ENCODING" not in written
    with DcpReader(small) as reader:
        got = {name: (reader.info(name), reader.read(name).copy()) for name in reader.names()}
    assert got.keys() == expected.keys()
    for name, (info, array) in expected.items():
        assert got[name][0] == info
        np.testing.assert_array_equal(got[name][1], array)
    completed = run([*POLYAK, "inspect", str(small)], tmp_path)
    assert "model" in completed.stdout

    def another_sharded_tensor_record(metadata):
        next(iter(metadata.state_dict_metadata.values())).properties = sharded.ShardMetadata(
            [0], [1], None
        )

    rewrite_metadata(small, another_sharded_tensor_record)
    refused = r"refused to unpickle global torch\.distributed\._shard\.metadata\.ShardMetadata"
    with pytest.raises(CheckpointError, match=refused):
        DcpReader(small)


def test_a_payload_outside_the_directory_is_refused(small):
    def escape(metadata):
        storage_of(metadata, "model.w").relative_path = "../elsewhere.distcp"

    rewrite_metadata(small, escape)
    with pytest.raises(CheckpointError, match=r"names the payload file '\.\./elsewhere"):
        DcpReader(small)


def test_a_truncated_distcp_is_refused(small, tmp_path):
    data = small / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=r"__0_0\.distcp: entry model\.\w lies at .* beyond its end"
    ):
        DcpReader(small)
    out = tmp_path / "out.safetensors"
    completed = run([*POLYAK, "average", str(small), "-o", str(out)], tmp_path, check=False)
    assert completed.returncode == 2 and "truncated" in completed.stderr
    assert not out.exists()


def test_chunks_that_overlap_or_leave_holes_are_refused(small, tmp_path):
    import copy
    import shutil

    other = tmp_path / "other"
    shutil.copytree(small, other)

    def overlap(metadata):
        chunks = metadata.state_dict_metadata["model.w"].chunks
        chunks.append(copy.deepcopy(chunks[0]))

    rewrite_metadata(small, overlap)
    with pytest.raises(CheckpointError, match=r"tensor model\.w: the chunks at \[0, 0\] and"):
        DcpReader(small)

    def hole(metadata):
        metadata.state_dict_metadata["model.w"].size = torch.Size([7, 2])

    rewrite_metadata(other, hole)
    with pytest.raises(CheckpointError, match=r"model\.w: its chunks cover 12 of its 14"):
        DcpReader(other)


def test_a_storage_transform_is_refused_by_name(small):
    def compress(metadata):
        storage_of(metadata, "model.b").transform_descriptors = ["zstd"]

    rewrite_metadata(small, compress)
    with pytest.raises(CheckpointError, match=r"model\.b is stored with the transform\(s\) zstd"):
        DcpReader(small)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: setattr(storage_of(m, "model.b"), "transform_descriptors", 7),
            r"model\.b is stored with the transform\(s\) 7,",
        ),
        (
            lambda m: setattr(storage_of(m, "model.b"), "relative_path", "x" * 10_000),
            r"model\.b is stored in 'x+\.\.\.x+', which is missing",
        ),
    ],
)
def test_malformed_storage_records_are_refused_in_one_short_line(small, change, message):
    # (A storage key that is not hashable, which the fuzzer found, is replayed from
    # tests/fuzz_regressions/dcp_directory/.)
    rewrite_metadata(small, change)
    with pytest.raises(CheckpointError, match=message) as refused:
        DcpReader(small)
    assert len(str(refused.value)) < 400


def test_members_with_different_global_shapes_are_refused(small, tmp_path):
    other = tmp_path / "step-2"
    dcp_save({"model": {"w": torch.zeros(5, 2), "b": torch.zeros(6)}}, other)
    with pytest.raises(IncompatibleCheckpointsError, match=r"w"):
        average([small, other])


def test_dcp_output_needs_dcp_inputs_and_a_directory(small, tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "m_1.safetensors"))
    with pytest.raises(OutputError, match="from DCP inputs only"):
        average_to(tmp_path / "m_1.safetensors", tmp_path / "out", format="dcp")
    with pytest.raises(OutputError, match="a DCP checkpoint is a directory"):
        average_to(small, tmp_path / "x.metadata")


def test_torchtitan_and_lightning_layouts(tmp_path):
    import io

    generator = torch.Generator().manual_seed(5)
    saved = []
    for step in (10, 20):
        model = {
            "tok_embeddings.weight": torch.randn(7, 4, generator=generator),
            "layers.0.attention.wq.weight": torch.randn(4, 4, generator=generator),
        }
        saved.append(model)
        # torchtitan flattens the model's entries to the top level, beside the rest.
        state = {
            **model,
            "optimizer": {"state.layers.0.attention.wq.weight.exp_avg": torch.zeros(4, 4)},
            "lr_scheduler": {"last_epoch": io.BytesIO(b"1")},
            "dataloader": io.BytesIO(b"position"),
            "train_state": io.BytesIO(b"step"),
        }
        dcp_save(state, tmp_path / "titan" / f"step-{step}")
        # Lightning's FSDP strategy with state_dict_type="sharded": a DCP directory per .ckpt.
        dcp_save({"model": model}, tmp_path / "lightning" / f"epoch=0-step={step}.ckpt")
    expected = {name: mean64([s[name].numpy() for s in saved]) for name in saved[0]}
    with open_checkpoint(tmp_path / "titan" / "step-20") as reader:
        assert reader.selection == (
            "the top-level model entries, without dataloader, lr_scheduler, optimizer, train_state"
        )
        assert reader.names() == list(saved[0])
    for run_directory in ("titan", "lightning"):
        found = find_checkpoints(tmp_path / run_directory)
        assert [checkpoint.step for checkpoint in found] == [20, 10]
        averaged = average(tmp_path / run_directory)
        assert set(averaged) == set(expected)
        for name, value in averaged.items():
            np.testing.assert_allclose(value, expected[name], rtol=2e-6, atol=1e-7)


def test_a_damaged_payload_is_refused_in_one_line_and_nothing_is_written(small, tmp_path):
    with DcpReader(small) as reader:
        payload = reader.entry("w").chunks[0].payload
    data = bytearray((small / "__0_0.distcp").read_bytes())
    data[payload.offset : payload.offset + 4] = b"XXXX"  # neither a zip nor safetensors
    (small / "__0_0.distcp").write_bytes(bytes(data))
    out = tmp_path / "out"
    completed = run([*POLYAK, "average", str(small), "-o", str(out) + "/"], tmp_path, check=False)
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1
    assert "__0_0.distcp: tensor model.w: the payload at byte" in completed.stderr
    assert not out.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["step-1"]


def test_a_declared_size_beyond_the_payload_is_refused_before_allocating(small):
    def huge(metadata):
        tensor = metadata.state_dict_metadata["model.w"]
        tensor.size = torch.Size([6 << 40, 2])
        tensor.chunks[0].sizes = torch.Size([6 << 40, 2])

    rewrite_metadata(small, huge)
    with pytest.raises(
        CheckpointError, match=r"model\.w: the chunk at \[0, 0\] declares \d+ bytes"
    ):
        DcpReader(small)


def test_a_directory_output_from_dcp_inputs_is_sharded_by_default(runs, tmp_path, monkeypatch):
    import polyak.averaging

    assert polyak.averaging.DCP_MAX_SHARD_SIZE == 5 * 10**9
    monkeypatch.setattr(polyak.averaging, "DCP_MAX_SHARD_SIZE", 1000)  # bytes; the model: 1732
    result = average_to(runs / "fsdp", tmp_path / "averaged")
    names = [path.name for path in result.files]
    assert names[-1] == "model.safetensors.index.json" and len(names) > 2
    index = json.loads(result.files[-1].read_text())
    assert sorted(index["weight_map"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(runs, tmp_path):
    members = [str(runs / "fsdp" / f"step-{step}") for step in (1, 2, 3)]
    arguments = ["average", *members, "--max-shard-size", "1KB", "-o"]
    run([*POLYAK, *arguments, str(tmp_path / "one") + "/"], runs)
    run([*TORCHRUN, "-m", "polyak", *arguments, str(tmp_path / "two") + "/"], runs)
    one = {path.name: path.read_bytes() for path in (tmp_path / "one").iterdir()}
    two = {path.name: path.read_bytes() for path in (tmp_path / "two").iterdir()}
    assert len(one) > 2 and one == two


@pytest.mark.slow
def test_two_processes_split_a_dcp_output_and_it_reads_and_loads_as_one_processs(runs, tmp_path):
    members = [runs / "fsdp" / f"step-{step}" for step in (3, 2, 1)]
    arguments = ["average", *map(str, members), "--format", "dcp", "-o"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([*POLYAK, *arguments, str(one)], runs)
    run([*TORCHRUN, "-m", "polyak", *arguments, str(two)], runs)
    assert sorted(path.name for path in one.iterdir()) == [".metadata", "__0_0.distcp"]
    assert sorted(path.name for path in two.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    # Each process wrote a contiguous run of the same payloads (split_by_cost).
    parts = [(two / f"__{rank}_0.distcp").read_bytes() for rank in (0, 1)]
    assert parts[0] + parts[1] == (one / "__0_0.distcp").read_bytes()
    with DcpReader(one, key="model") as first, DcpReader(two, key="model") as second:
        assert second.world_size() == 2 and list(first.entries) == list(second.entries)
        for name, entry in first.entries.items():
            other = second.entries[name]
            assert (entry.dtype, entry.shape, entry.path) == (other.dtype, other.shape, other.path)
            if entry.is_tensor:
                np.testing.assert_array_equal(first.read_entry(entry), second.read_entry(other))
            else:
                assert (
                    first.payload_bytes(entry.payload).tobytes()
                    == second.payload_bytes(other.payload).tobytes()
                )
    # torch loads it into the 2-rank FSDP2 model as it loads one process's, and trains on.
    references = [reference(member, tmp_path)["model"] for member in members]
    expected = {name: mean64([r[name].numpy() for r in references]) for name in references[0]}
    np.savez(tmp_path / "expected.npz", **expected)
    result = tmp_path / "load.json"
    run([*TORCHRUN, "dcp_load.py", str(two), str(tmp_path / "expected.npz"), str(result)], runs)
    loaded = json.loads(result.read_text())
    assert loaded["difference"] < 1e-6 and loaded["steps"] == [3.0] and loaded["moved"]


def test_work_is_split_into_contiguous_runs_of_about_equal_cost():
    from polyak.formats.dcp import split_by_cost

    rng = np.random.default_rng(5)
    for parts in (1, 2, 3, 8):
        for _ in range(50):
            costs = [int(c) for c in rng.integers(0, 1000, rng.integers(1, 40))]
            owners = split_by_cost(costs, parts)
            assert owners == sorted(owners) and set(owners) <= set(range(parts))
            total, largest = sum(costs), max(costs)
            for part in range(parts):
                mine = sum(c for c, o in zip(costs, owners, strict=True) if o == part)
                assert abs(mine - total / parts) <= largest
    assert split_by_cost([5, 5, 5, 5], 2) == [0, 0, 1, 1]
    assert split_by_cost([0, 0], 2) == [0, 0]  # nothing to share: one file


@pytest.mark.slow
def test_a_failure_on_one_process_leaves_no_dcp_output(tmp_path):
    generator = torch.Generator().manual_seed(4)
    for step in (1, 2):
        model = {"w": torch.randn(64, 8, generator=generator), "b": torch.randn(64)}
        dcp_save({"model": model, "extra": torch.randn(16)}, tmp_path / "run" / f"step-{step}")
    # The newest member's entry outside the model is damaged: only the process that
    # copies it (the last one, whose share ends the output) finds out.
    newest = tmp_path / "run" / "step-2"
    with DcpReader(newest) as reader:
        payload = reader.entries["extra"].chunks[0].payload
    data = bytearray((newest / payload.file).read_bytes())
    data[payload.offset : payload.offset + 8] = b"damaged!"
    (newest / payload.file).write_bytes(bytes(data))
    out = tmp_path / "averaged"
    command = ["-m", "polyak", "average", str(tmp_path / "run"), "--format", "dcp", "-o", str(out)]
    completed = run([*TORCHRUN, *command], tmp_path, check=False)
    assert completed.returncode != 0
    told = [line for line in completed.stderr.splitlines() if line.startswith("polyak: ")]
    # One line from each process that got to say it: torchrun stops the others as soon
    # as one has exited, at times before they print. Each says that process 1 failed.
    assert 1 <= len(told) <= 2, completed.stderr
    for line in told:
        assert line.startswith(
            (
                "polyak: error (process 1 of 2): ",
                "polyak: error (process 0 of 2): process 1 of 2 failed: ",
            )
        ), line
        assert "tensor extra:" in line
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no temporary left
    run([sys.executable, *command, "--drop-optimizer"], tmp_path)  # without the damaged entry
    assert sorted(path.name for path in out.iterdir()) == [".metadata", "__0_0.distcp"]


def test_an_entry_polyak_cannot_copy_is_refused_before_writing(tmp_path):
    for step in (1, 2):
        state = {
            "model": {"w": torch.ones(3) * step},
            "extra": torch.zeros(2, dtype=torch.complex64),
        }
        dcp_save(state, tmp_path / "run" / f"step-{step}")
    out = tmp_path / "averaged"
    with pytest.raises(OutputError, match=r"entry extra of .*step-2.* has dtype complex64"):
        average_to(tmp_path / "run", out, format="dcp")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    average_to(tmp_path / "run", out, format="dcp", keep_other=False)


def test_chunked_tensors_are_sliced_flat_without_assembling_them(runs):
    from polyak.formats.dcp import FlatChunks

    rng = np.random.default_rng(0)
    cases = [
        (runs / "fsdp" / "step-3", "0.weight"),  # FSDP2 rows 17 + 16: views of one chunk
        (runs / "megatron" / "iter_0000200", "decoder.layers.self_attention.linear_qkv.weight"),
    ]
    for directory, name in cases:
        with DcpReader(directory) as reader:
            whole = reader.read(name).reshape(-1)
            flat = reader.read_flat(name)
            assert isinstance(flat, FlatChunks) and flat.reshape(-1) is flat
            bounds = [(0, whole.size), (0, 1), (whole.size - 1, whole.size), (5, 5)]
            bounds += [tuple(sorted(rng.integers(0, whole.size + 1, 2))) for _ in range(50)]
            for start, stop in bounds:
                np.testing.assert_array_equal(flat[start:stop], whole[start:stop])
                # views(): the rows of each chunk that a slice reads (what the prefetcher
                # brings in), in the chunks' order, none of them copied.
                views = flat.views(start, stop)
                assert all(view.base is not None for view in views)
                row = whole.size // flat.shape[0]
                first, last = start // row, -(-stop // row)
                touched = [
                    chunk
                    for chunk, _ in flat._parts
                    if stop > start
                    and max(first, chunk.offsets[0]) < min(last, chunk.offsets[0] + chunk.sizes[0])
                ]
                assert len(views) == len(touched)
                for view, chunk in zip(views, touched, strict=True):
                    top = max(first, chunk.offsets[0])
                    bottom = min(last, chunk.offsets[0] + chunk.sizes[0])
                    region = (slice(top, bottom), *chunk.slices[1:])
                    np.testing.assert_array_equal(view, whole.reshape(flat.shape)[region])
            np.testing.assert_array_equal(np.asarray(flat), whole)


def test_a_hostile_payload_never_runs(small, tmp_path):
    import io

    marker = tmp_path / "created-by-the-payload"
    hostile = io.BytesIO()
    torch.save(_CreatesAFile(marker), hostile)  # a torch.save zip whose pickle runs os.mkdir
    data = small / "__0_0.distcp"
    offset = data.stat().st_size
    data.write_bytes(data.read_bytes() + hostile.getvalue() + bytes(64))

    def point_at_it(metadata):
        info = storage_of(metadata, "model.b")
        info.offset, info.length = offset, len(hostile.getvalue()) + 64

    rewrite_metadata(small, point_at_it)
    with DcpReader(small) as reader, pytest.raises(CheckpointError, match="global posix.mkdir"):
        reader.read("b")
    assert not marker.exists()
