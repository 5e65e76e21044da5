"""The framework-free evaluation helpers both adapters' sweeps share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from polyak.data import sweep_metric, with_recalibrated

EVALUATOR = SimpleNamespace(metric="loss", higher_is_better=False)


def test_sweep_metric_of_data_is_the_evaluators():
    assert sweep_metric(EVALUATOR, None, "loss", None) == ("loss", False)


def test_sweep_metric_of_evaluate_is_named_by_metric_and_higher_is_better():
    evaluate = object()
    assert sweep_metric(EVALUATOR, evaluate, "accuracy", None) == ("metric", True)
    assert sweep_metric(EVALUATOR, evaluate, "f1", None) == ("f1", True)
    assert sweep_metric(EVALUATOR, evaluate, len, None) == ("metric", True)


@pytest.mark.parametrize("evaluate", [None, object()])
def test_sweep_metric_direction_given_by_the_caller_wins(evaluate):
    assert sweep_metric(EVALUATOR, evaluate, "loss", True)[1] is True
    assert sweep_metric(EVALUATOR, evaluate, "loss", False)[1] is False


def test_with_recalibrated_from_floats():
    assert with_recalibrated(0.5, 0.75) == {"test": 0.5, "recalibrated": {"test": 0.75}}


def test_with_recalibrated_from_splits_keeps_the_plain_splits():
    plain = {"test": 0.5, "validation": 0.25}
    result = with_recalibrated(plain, {"test": 0.75, "validation": 0.5})
    assert result == {
        "test": 0.5,
        "validation": 0.25,
        "recalibrated": {"test": 0.75, "validation": 0.5},
    }
    assert "recalibrated" not in plain


# ---------------------------------------------------------------- load_dataset on hostile files


def npy_bytes(shape: tuple[int, ...], data: bytes, dtype: str = "<f8") -> bytes:
    """A .npy member by hand: a header declaring ``shape``, then ``data``."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def test_an_npz_declaring_16_tib_is_refused_before_allocating(tmp_path):
    """Before: numpy allocated what the header declared (MemoryError: internal error)."""
    import zipfile

    from polyak.data import load_dataset
    from polyak.errors import DataError

    path = tmp_path / "test.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy_bytes((2**41, 1), b"\x00" * 64))  # 16 TiB of float64
        archive.writestr("y.npy", npy_bytes((1,), b"\x00" * 8))
    with pytest.raises(DataError, match=r"array x: declares shape \(2199023255552, 1\)"):
        load_dataset(path)


def test_an_npz_member_beyond_the_inflation_limit_is_refused(tmp_path):
    import struct
    import zipfile

    from polyak.data import load_dataset
    from polyak.errors import DataError

    path = tmp_path / "test.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_bytes((512,), b"\x00" * 4096))
        archive.writestr("y.npy", npy_bytes((1,), b"\x00" * 8))
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")  # x.npy's entry
    struct.pack_into("<I", data, central + 24, 2**32 - 2)  # declares 4 GiB
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"array x: its zip entry declares 4294967294 bytes"):
        load_dataset(path)
