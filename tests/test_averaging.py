"""The engine against an independent float64 reference, its numeric policy and refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import polyak
from polyak.averaging import average_readers, check_compatible
from polyak.errors import (
    ArgumentError,
    IncompatibleCheckpointsError,
    NonFiniteError,
    OutputError,
    SchemeError,
)
from polyak.formats import open_checkpoint
from polyak.formats.base import TensorInfo

# Mantissa bits of each dtype: the final rounding to it costs at most 2**-(m+1) relative.
MANTISSA_BITS = {np.float32: 23, np.float16: 10, ml_dtypes.bfloat16: 7}
SUBNORMAL_FLOOR = {np.float32: 2.0**-150, np.float16: 2.0**-25, ml_dtypes.bfloat16: 2.0**-134}


def write_members(directory: Path, members: list[dict[str, np.ndarray]]) -> list[Path]:
    """Write members oldest first as ck_<i>.safetensors; return paths oldest first."""
    paths = []
    for step, tensors in enumerate(members):
        path = directory / f"ck_{step}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def reference_mean(members_newest_first: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return sum(w * x.astype(np.float64) for w, x in zip(weights, members_newest_first, strict=True))


def error_bound(members_newest_first: list[np.ndarray], weights: np.ndarray, dtype) -> np.ndarray:
    """The bound of average_readers' docstring plus the final rounding to the dtype."""
    n = len(members_newest_first)
    unit = 2.0**-24
    newest = members_newest_first[0].astype(np.float64)
    spread = np.abs(newest) + sum(
        w * np.abs(x.astype(np.float64) - newest)
        for w, x in zip(weights[1:], members_newest_first[1:], strict=True)
    )
    accumulation = (n + 2) * unit * spread
    reference = np.abs(reference_mean(members_newest_first, weights))
    rounding = 2.0 ** -(MANTISSA_BITS[dtype] + 1) * (reference + accumulation)
    return accumulation + rounding + SUBNORMAL_FLOOR[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("scheme", ["equal", "linear", "exp:2", "exp:0.5", "custom:3,0,1,2,5,1"])
def test_average_matches_float64_reference_within_bound(tmp_path, dtype, scheme):
    rng = np.random.default_rng(7)
    base = rng.normal(size=(64, 33))
    members = [{"w": (base + 0.05 * rng.normal(size=base.shape)).astype(dtype)} for _ in range(6)]
    write_members(tmp_path, members)
    result = polyak.average(tmp_path, scheme=scheme)["w"]
    newest_first = [m["w"] for m in reversed(members)]
    weights = polyak.parse_scheme(scheme).weights(6)
    reference = reference_mean(newest_first, weights)
    assert result.dtype == np.dtype(dtype)
    error = np.abs(result.astype(np.float64) - reference)
    assert np.all(error <= error_bound(newest_first, weights, dtype))


def test_float32_accumulation_beats_summing_in_bfloat16(tmp_path):
    # Summing bf16 in bf16 loses the small differences between members; polyak does not.
    members = [
        {"w": np.full(1000, 1.0 + step * 2.0**-7, dtype=ml_dtypes.bfloat16)} for step in range(8)
    ]
    write_members(tmp_path, members)
    result = polyak.average(tmp_path)["w"].astype(np.float64)
    exact = np.mean([1.0 + step * 2.0**-7 for step in range(8)])
    assert np.all(np.abs(result - exact) <= 2.0**-8)


def test_float64_tensors_accumulate_in_float64(tmp_path):
    rng = np.random.default_rng(1)
    members = [{"w": rng.normal(size=50)} for _ in range(4)]
    write_members(tmp_path, members)
    result = polyak.average(tmp_path, scheme="linear")["w"]
    weights = polyak.parse_scheme("linear").weights(4)
    reference = reference_mean([m["w"] for m in reversed(members)], weights)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, reference, rtol=1e-14, atol=1e-15)


def test_large_tensor_spanning_many_chunks(tmp_path):
    rng = np.random.default_rng(2)
    members = [{"big": rng.normal(size=(700, 1000)).astype(np.float32)} for _ in range(3)]
    write_members(tmp_path, members)
    result = polyak.average(tmp_path, scheme="exp:1")["big"]
    weights = polyak.parse_scheme("exp:1").weights(3)
    newest_first = [m["big"] for m in reversed(members)]
    reference = reference_mean(newest_first, weights)
    assert np.all(np.abs(result - reference) <= error_bound(newest_first, weights, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_many_members_make_short_chunks_and_still_match_the_reference(tmp_path, dtype):
    # 60 members: the scratch block holds a short chunk of each, so a tensor spans many.
    rng = np.random.default_rng(3)
    members = [{"w": (1 + 0.01 * rng.normal(size=(50, 700))).astype(dtype)} for _ in range(60)]
    write_members(tmp_path, members)
    weights = polyak.parse_scheme("linear").weights(60)
    result = polyak.average(tmp_path, scheme="linear")["w"]
    newest_first = [m["w"] for m in reversed(members)]
    reference = reference_mean(newest_first, weights)
    if dtype == np.float64:  # accumulated in float64: a few ulps
        bound = 64 * 2.0**-53 * np.abs(reference)
    else:
        bound = error_bound(newest_first, weights, dtype)
    assert result.dtype == np.dtype(dtype)
    assert np.all(np.abs(result.astype(np.float64) - reference) <= bound)


def test_safetensors_output_streams_without_whole_tensors(tmp_path, monkeypatch):
    from polyak.formats.base import StreamedTensor

    def refuse(*arguments, **options):
        raise AssertionError("a whole averaged tensor was collected in memory")

    monkeypatch.setattr(StreamedTensor, "__array__", refuse)
    rng = np.random.default_rng(4)
    members = [{"a": rng.normal(size=(600, 900)).astype(np.float32)} for _ in range(3)]
    (tmp_path / "in").mkdir()
    write_members(tmp_path / "in", members)
    polyak.average_to(tmp_path / "in", tmp_path / "out.safetensors")
    reference = reference_mean([m["a"] for m in reversed(members)], np.full(3, 1 / 3))
    np.testing.assert_allclose(load_file(tmp_path / "out.safetensors")["a"], reference, atol=1e-6)


def test_integer_and_bool_tensors_come_from_the_newest_member(tmp_path):
    members = [
        {
            "w": np.ones(3, np.float32) * step,
            "num_batches_tracked": np.array(100 * step, dtype=np.int64),
            "mask": np.array([step % 2 == 0, True]),
        }
        for step in range(4)
    ]
    write_members(tmp_path, members)
    result = polyak.average(tmp_path)
    assert result["num_batches_tracked"].dtype == np.int64
    assert result["num_batches_tracked"] == 300
    np.testing.assert_array_equal(result["mask"], [False, True])
    np.testing.assert_allclose(result["w"], 1.5)


def test_require_equal_refuses_differing_integers(tmp_path):
    members = [{"w": np.ones(2, np.float32), "steps": np.array(step)} for step in range(2)]
    write_members(tmp_path, members)
    with pytest.raises(
        IncompatibleCheckpointsError, match=r"ck_0.safetensors: integer tensor steps differs"
    ):
        polyak.average(tmp_path, integers="require-equal")
    same = [{"w": np.ones(2, np.float32), "steps": np.array(5)} for _ in range(2)]
    write_members(tmp_path, same)
    assert polyak.average(tmp_path, integers="require-equal")["steps"] == 5


def test_unknown_integer_policy_is_refused(tmp_path):
    write_members(tmp_path, [{"w": np.ones(2, np.float32)}])
    with pytest.raises(SchemeError, match="integers policy must be one of newest, require-equal"):
        polyak.average(tmp_path, integers="mean")


def test_identical_members_give_themselves_back_exactly(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "a": rng.normal(size=100).astype(np.float32),
        "b": rng.normal(size=100).astype(np.float16),
        "c": rng.normal(size=100).astype(ml_dtypes.bfloat16),
        "d": rng.normal(size=100),
    }
    write_members(tmp_path, [tensors] * 7)
    for scheme in ("equal", "linear", "exp:2", "custom:1,2,3,4,5,6,7"):
        result = polyak.average(tmp_path, scheme=scheme)
        for name, array in tensors.items():
            np.testing.assert_array_equal(result[name], array, err_msg=f"{scheme} {name}")


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_order_of_equal_weight_members_does_not_matter(values, seed):
    members = [np.array([v], dtype=np.float32) for v in values]
    permuted = list(np.random.default_rng(seed).permutation(len(members)))
    weights = np.full(len(members), 1 / len(members))
    first = _average_in_memory(members, weights)
    second = _average_in_memory([members[i] for i in permuted], weights)
    bound_first = error_bound(members, weights, np.float32)
    bound_second = error_bound([members[i] for i in permuted], weights, np.float32)
    assert abs(float(first[0]) - float(second[0])) <= float(bound_first[0] + bound_second[0])


class _ArrayReader:
    """A reader over in-memory arrays, to drive the engine without files."""

    format = "memory"

    def __init__(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        self.path = Path(name)
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def info(self, name):
        from polyak.formats.base import TensorInfo, dtype_name

        array = self.tensors[name]
        return TensorInfo(tuple(array.shape), dtype_name(array.dtype))

    def read(self, name):
        return self.tensors[name]

    def close(self):
        pass


def _average_in_memory(members: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    readers = [_ArrayReader(f"m{i}", {"x": member}) for i, member in enumerate(members)]
    return np.array(dict(average_readers(readers, weights))["x"])


@settings(max_examples=30, deadline=None)
@given(
    value=st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32),
    count=st.integers(1, 9),
    raw=st.lists(st.floats(0.01, 100), min_size=9, max_size=9),
)
def test_identical_inputs_any_weights_are_exact(value, count, raw):
    members = [np.array([value], dtype=np.float32)] * count
    result = _average_in_memory(members, np.array(raw[:count]))
    assert result[0] == np.float32(value)


def test_members_with_different_tensors_are_refused_with_the_differences(tmp_path):
    members = [
        {"dense/kernel": np.zeros((2, 25), np.float32), "dense/bias": np.zeros(25, np.float32)},
        {"dense/kernel": np.zeros((2, 26), np.float32), "dense/bias": np.zeros(25, np.float32)},
        {"dense/kernel": np.zeros((2, 25), np.float32)},
        {"dense/kernel": np.zeros((2, 25), np.float16), "dense/bias": np.zeros(25, np.float32)},
    ]
    write_members(tmp_path, members)
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        polyak.average(tmp_path)
    message = str(caught.value)
    # ck_3 is the newest member, the reference the others are compared with.
    # Named after the member that holds it (ck_3), as an extra tensor is.
    assert "ck_3.safetensors has tensor dense/bias that ck_2.safetensors lacks" in message
    assert (
        "ck_1.safetensors: tensor dense/kernel has shape (2, 26); ck_3.safetensors has (2, 25)"
        in message
    )
    assert (
        "ck_0.safetensors: tensor dense/kernel has dtype float32; ck_3.safetensors has float16"
        in message
    )


def test_extra_tensor_in_an_older_member_is_refused(tmp_path):
    write_members(
        tmp_path,
        [
            {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)},
            {"a": np.zeros(1, np.float32)},
        ],
    )
    with pytest.raises(
        IncompatibleCheckpointsError,
        match="ck_0.safetensors has tensor b that ck_1.safetensors lacks",
    ):
        polyak.average(tmp_path)


def test_long_difference_lists_are_cut(tmp_path):
    write_members(
        tmp_path,
        [{f"t{i}": np.zeros(1, np.float32) for i in range(20)}, {"other": np.zeros(1, np.float32)}],
    )
    with pytest.raises(IncompatibleCheckpointsError, match=r"and 16 more difference\(s\)"):
        polyak.average(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_are_refused_naming_file_and_tensor(tmp_path, bad):
    members = [{"w": np.ones(4, np.float32)} for _ in range(3)]
    members[1]["w"][2] = bad
    write_members(tmp_path, members)
    with pytest.raises(NonFiniteError, match=r"ck_1.safetensors: tensor w holds NaN or infinite"):
        polyak.average(tmp_path)
    allowed = polyak.average(tmp_path, allow_nonfinite=True)["w"]
    assert not np.isfinite(allowed[2])
    np.testing.assert_array_equal(allowed[[0, 1, 3]], 1.0)


def test_nonfinite_member_with_zero_weight_is_still_refused(tmp_path):
    members = [{"w": np.ones(2, np.float32)}, {"w": np.array([1.0, np.nan], np.float32)}]
    write_members(tmp_path, members)
    with pytest.raises(NonFiniteError, match="ck_1.safetensors: tensor w"):
        polyak.average(tmp_path, scheme="custom:0,1")


def test_wrong_number_of_weights_is_refused(tmp_path):
    write_members(tmp_path, [{"w": np.ones(2, np.float32)}] * 2)
    readers = [open_checkpoint(tmp_path / f"ck_{i}.safetensors") for i in range(2)]
    with pytest.raises(SchemeError, match="3 weights were given for 2 checkpoints"):
        average_readers(readers, [1, 1, 1])


def test_check_compatible_returns_the_newest_members_plan(tmp_path):
    write_members(tmp_path, [{"a": np.zeros((2, 3), np.float16), "n": np.array(1)}] * 2)
    readers = [open_checkpoint(tmp_path / f"ck_{i}.safetensors") for i in (1, 0)]
    plan = check_compatible(readers)
    assert [name for name, _ in plan] == readers[0].names()
    assert sorted((name, info.shape, info.dtype) for name, info in plan) == [
        ("a", (2, 3), "float16"),
        ("n", (), "int64"),
    ]


def test_last_keeps_the_newest_members(tmp_path):
    write_members(tmp_path, [{"w": np.full(2, float(step), np.float32)} for step in range(10)])
    np.testing.assert_allclose(polyak.average(tmp_path, last=3)["w"], 8.0)


def test_average_to_writes_the_format_and_reports_members(tmp_path):
    members = [{"w": np.full(2, float(step), np.float32), "n": np.array(step)} for step in range(3)]
    write_members(tmp_path, members)
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    result = polyak.average_to(tmp_path, out, scheme="linear")
    weights = np.array([3, 2, 1]) / 6
    np.testing.assert_allclose(result.weights, weights)
    assert [m.path.name for m in result.members] == [
        "ck_2.safetensors",
        "ck_1.safetensors",
        "ck_0.safetensors",
    ]
    assert (result.tensors, result.averaged, result.format) == (2, 1, "safetensors")
    written = load_file(str(out))
    np.testing.assert_allclose(written["w"], np.dot(weights, [2.0, 1.0, 0.0]))
    assert written["n"] == 2
    assert not [p for p in out.parent.iterdir() if p.name != "avg.safetensors"]


def test_average_to_converts_to_npz_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    inputs = tmp_path / "run"
    inputs.mkdir()
    write_members(inputs, [{"w": np.full(2, float(step), np.float32)} for step in range(2)])
    polyak.average_to(inputs, tmp_path / "avg.npz")
    np.testing.assert_allclose(np.load(tmp_path / "avg.npz")["w"], 0.5)
    polyak.average_to(inputs, tmp_path / "avg.pt")
    state = torch.load(tmp_path / "avg.pt", weights_only=True)
    np.testing.assert_allclose(state["w"].numpy(), 0.5)


def test_average_to_refuses_existing_output_and_leaves_it(tmp_path):
    write_members(tmp_path, [{"w": np.ones(2, np.float32)}] * 2)
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(OutputError, match="already exists. Pass overwrite=True"):
        polyak.average_to(tmp_path / "ck_*.safetensors", out)
    assert out.read_bytes() == b"previous"
    polyak.average_to(tmp_path / "ck_*.safetensors", out, overwrite=True)
    assert load_file(str(out))["w"].tolist() == [1.0, 1.0]


def test_failed_average_leaves_no_output_and_no_temporary(tmp_path):
    members = [{"w": np.ones(2, np.float32)}, {"w": np.array([np.nan, 1], np.float32)}]
    paths = write_members(tmp_path, members)
    before = {p: p.read_bytes() for p in paths}
    out = tmp_path / "avg.safetensors"
    with pytest.raises(NonFiniteError):
        polyak.average_to(tmp_path / "ck_*", out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck_0.safetensors", "ck_1.safetensors"]
    assert {p: p.read_bytes() for p in paths} == before


# ---------------------------------------------------------------- checkpoint directory output


def write_sharded_members(directory: Path, steps: range) -> list[Path]:
    """Hugging Face-style checkpoint-N/ directories, each in two shards with an index."""
    rng = np.random.default_rng(7)
    paths = []
    for step in steps:
        checkpoint = directory / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        shards = {
            "model-00001-of-00002.safetensors": {
                "embed.weight": rng.standard_normal((8, 4)).astype(np.float32),
                "norm.weight": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
            },
            "model-00002-of-00002.safetensors": {
                "head.weight": rng.standard_normal((4, 3)).astype(np.float16),
                "norm.num_batches_tracked": np.array(step, np.int64),
            },
        }
        weight_map = {}
        for shard, tensors in shards.items():
            save_file(tensors, str(checkpoint / shard), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, shard)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
        (checkpoint / "optimizer.pt").write_bytes(b"not read")
        paths.append(checkpoint)
    return paths


def directory_tensors(directory: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(directory) as reader:
        return {name: np.array(reader.read(name)) for name in reader.names()}


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and a[n].tobytes() == b[n].tobytes()
        for n in a
    )


def test_sharded_inputs_average_into_the_same_shards(tmp_path):
    write_sharded_members(tmp_path / "run", range(100, 400, 100))
    single = tmp_path / "single.safetensors"
    polyak.average_to(tmp_path / "run", single, scheme="linear")
    out = tmp_path / "averaged"
    result = polyak.average_to(tmp_path / "run", f"{out}/", scheme="linear")
    assert (result.output, result.format) == (out, "sharded-safetensors")
    assert result.files == (
        out / "model-00001-of-00002.safetensors",
        out / "model-00002-of-00002.safetensors",
        out / "model.safetensors.index.json",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged", "run", "single.safetensors"]
    newest = json.loads((tmp_path / "run/checkpoint-300/model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == newest["weight_map"]
    assert index["metadata"] == {
        "total_size": 8 * 4 * 4 + 4 * 2 + 4 * 3 * 2 + 8,
        "polyak": "average",
    }
    # Bit for bit what the single-file average holds, whatever the container.
    assert same_bits(directory_tensors(out), load_file(str(single)))
    assert same_bits(directory_tensors(out), polyak.average(tmp_path / "run", "linear"))
    assert directory_tensors(out)["norm.num_batches_tracked"] == 300


def test_max_shard_size_splits_any_input(tmp_path):
    write_members(
        tmp_path,
        [{f"w{i}": np.full(250, float(s + i), np.float32) for i in range(4)} for s in range(3)],
    )
    result = polyak.average_to(tmp_path / "ck_*", tmp_path / "averaged", max_shard_size="2KB")
    assert [p.name for p in result.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert same_bits(directory_tensors(tmp_path / "averaged"), polyak.average(tmp_path / "ck_*"))
    # Without a limit, a directory output of unsharded inputs is one model.safetensors.
    result = polyak.average_to(tmp_path / "ck_*", tmp_path / "one")
    assert [p.name for p in result.files] == ["model.safetensors"]


@pytest.mark.parametrize("min_members", [0, 1.5, True])
def test_min_members_must_be_a_whole_number(tmp_path, min_members):
    write_members(tmp_path, [{"w": np.ones(2, np.float32)}] * 2)
    with pytest.raises(ArgumentError, match=r"^min_members must be a whole number >= 1; ") as e:
        polyak.average_to(tmp_path / "ck_*", tmp_path / "avg.npz", min_members=min_members)
    assert e.value.parameter == "min_members"
    assert not (tmp_path / "avg.npz").exists()


def test_max_shard_size_refused_for_a_file_output(tmp_path):
    write_members(tmp_path, [{"w": np.ones(2, np.float32)}] * 2)
    out = tmp_path / "avg.safetensors"
    with pytest.raises(
        ArgumentError,
        match=rf"output {re.escape(str(out))}: max_shard_size splits the output into "
        r"safetensors shards in a directory, but avg\.safetensors names a single safetensors "
        rf"file\. Give a directory instead, e\.g\. {re.escape(str(tmp_path / 'avg'))}/",
    ):
        polyak.average_to(tmp_path / "ck_*", out, max_shard_size="1MB")
    with pytest.raises(ArgumentError, match="max_shard_size must be a size above 0"):
        polyak.average_to(tmp_path / "ck_*", tmp_path / "averaged", max_shard_size="lots")
    assert not out.exists() and not (tmp_path / "averaged").exists()


def failing_after_first_shard(monkeypatch):
    """Make the shard writer fail as a full disk would, once the first shard is written."""
    import polyak.formats.safetensors as module

    real = module._write_arrays
    written = []

    def write(file, *args, **kwargs):
        if written:
            raise OSError(28, "No space left on device")
        real(file, *args, **kwargs)
        written.append(file.name)

    monkeypatch.setattr(module, "_write_arrays", write)
    return written


def test_failed_directory_write_leaves_no_output_and_no_temporary(tmp_path, monkeypatch):
    write_sharded_members(tmp_path / "run", range(100, 300, 100))
    written = failing_after_first_shard(monkeypatch)
    out = tmp_path / "averaged"
    with pytest.raises(
        OutputError, match=rf"output {re.escape(str(out))}: cannot be written \(No space left"
    ):
        polyak.average_to(tmp_path / "run", out)
    assert len(written) == 1  # the first shard was complete before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_overwrite_keeps_the_previous_output_directory(tmp_path, monkeypatch):
    write_sharded_members(tmp_path / "run", range(100, 300, 100))
    out = tmp_path / "averaged"
    polyak.average_to(tmp_path / "run", out, scheme="custom:1,0")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing_after_first_shard(monkeypatch)
    with pytest.raises(OutputError, match="No space left"):
        polyak.average_to(tmp_path / "run", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged", "run"]
    monkeypatch.undo()
    polyak.average_to(tmp_path / "run", out, overwrite=True)
    assert same_bits(directory_tensors(out), polyak.average(tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged", "run"]


def test_nonfinite_in_a_later_shard_leaves_no_output(tmp_path):
    paths = write_sharded_members(tmp_path / "run", range(100, 300, 100))
    shard = paths[0] / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors["head.weight"][0, 0] = np.inf
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="tensor head.weight holds NaN or infinite"):
        polyak.average_to(tmp_path / "run", tmp_path / "averaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_output_directory_needs_overwrite(tmp_path):
    write_sharded_members(tmp_path / "run", range(100, 300, 100))
    out = tmp_path / "averaged"
    polyak.average_to(tmp_path / "run", out)
    with pytest.raises(OutputError, match=rf"output {re.escape(str(out))}: already exists"):
        polyak.average_to(tmp_path / "run", out)
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputError, match=r"holds config\.json, which polyak did not write"):
        polyak.average_to(tmp_path / "run", out, overwrite=True)
    assert (out / "config.json").exists()


def test_the_library_imports_no_command_line_and_no_heavy_module(tmp_path):
    """``import polyak`` and a safetensors average: numpy and safetensors' header, nothing more."""
    for step in (1, 2):
        save_file(
            {"w": np.full(3, float(step), np.float32)}, str(tmp_path / f"m_{step}.safetensors")
        )
    probe = (
        "import sys, polyak; "
        f"polyak.average_to({str(tmp_path)!r}, {str(tmp_path / 'out.npz')!r}); "
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    imported = set(completed.stdout.split())
    assert "polyak" in imported
    unwanted = {"typer", "rich", "click", "ml_dtypes", "torch", "keras", "h5py", "matplotlib"}
    assert sorted(imported & (unwanted | {"scipy"})) == []
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["w"], np.full(3, 1.5, np.float32))


class CountedNames(list):
    """A names() list that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        CountedNames.walks += 1
        return super().__iter__()


class NamesOnly:
    """The part of the reader interface check_compatible uses, over many tiny tensors."""

    def __init__(self, path: str, count: int) -> None:
        self.path = Path(path)
        self._names = CountedNames(f"layer{i}.weight" for i in range(count))

    def names(self) -> list[str]:
        return self._names

    def info(self, name: str) -> TensorInfo:
        return TensorInfo((4,), "float32")


def test_checking_members_walks_each_name_list_a_fixed_number_of_times():
    """Linear in the number of tensors: before, a set of all names was built per name
    (30,000 tensors took 47 s to average and 70 s of CPU to inspect)."""
    readers = [NamesOnly(f"m_{step}.safetensors", 2_000) for step in (3, 2, 1)]
    CountedNames.walks = 0
    plan = check_compatible(readers)
    assert len(plan) == 2_000
    assert CountedNames.walks <= 4 * len(readers)


@pytest.mark.parametrize("scheme", ["equal", "custom:0.2,0.3,0.5"])
def test_members_near_opposite_float32_extremes_average_without_overflow(tmp_path, scheme):
    """Before: refused as "overflowed" though the mean is in range (x_2 - x_1 overflowed)."""
    big = np.finfo(np.float32).max
    members = [  # oldest first
        {"w": np.array([big, -big, 1.0, big], np.float32)},
        {"w": np.array([-big, big, 2.0, big], np.float32)},
        {"w": np.array([big, -big, 3.0, big], np.float32)},
    ]
    write_members(tmp_path, members)
    averaged = polyak.average(tmp_path, scheme=scheme)["w"]
    raw = np.ones(3) if scheme == "equal" else np.array([0.2, 0.3, 0.5])
    weights = raw / raw.sum()  # newest first
    newest_first = [m["w"].astype(np.float64) for m in members[::-1]]
    expected = sum(w * x for w, x in zip(weights, newest_first, strict=True))
    assert averaged.dtype == np.float32 and np.isfinite(averaged).all()
    np.testing.assert_allclose(averaged, expected.astype(np.float32), rtol=1e-6)
