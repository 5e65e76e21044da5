"""The shared argument checks: one whole-number rule and one size parser, one error type."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.checks import parse_size, whole_number
from polyak.errors import ArgumentError, PolyakError


@pytest.mark.parametrize("value", [0, 5, np.int64(7), np.uint8(3), np.array(4)])
def test_whole_number_takes_what_operator_index_takes(value):
    assert whole_number(value, "keep") == int(value)
    assert type(whole_number(value, "keep")) is int


@pytest.mark.parametrize("value", [True, False, 2.5, 2.0, "3", None, np.float32(1), -1])
def test_whole_number_refuses_bools_floats_strings_and_negatives(value):
    with pytest.raises(ArgumentError, match=r"^keep must be a whole number >= 0; received ") as e:
        whole_number(value, "keep")
    assert e.value.parameter == "keep"
    assert isinstance(e.value, ValueError) and isinstance(e.value, PolyakError)


def test_whole_number_bounds_and_none():
    assert whole_number(None, "every_steps", minimum=1, or_none=True) is None
    with pytest.raises(ArgumentError, match=r"every_steps must be a whole number >= 1 or None; "):
        whole_number(0, "every_steps", minimum=1, or_none=True)
    assert whole_number(9, "seed", maximum=9) == 9
    with pytest.raises(ArgumentError, match=r"seed must be a whole number from 0 to 9; received"):
        whole_number(10, "seed", maximum=9)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (4096, 4096),
        (np.int64(10), 10),
        ("4096", 4096),
        ("4096B", 4096),
        ("500MB", 500 * 10**6),
        ("1.5KiB", 1536),
        (" 2 gb ", 2 * 10**9),
        ("0.5KB", 500),
        (".5MiB", 2**19),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize(
    "size", [0, -1, True, 1.5, "0", "0.1B", "1.5", "lots", "5 XB", "", "0.0001KB", None, b"5MB"]
)
def test_parse_size_refuses_what_is_not_a_size(size):
    with pytest.raises(ArgumentError, match=r"^shard_bytes must be a size above 0 such as ") as e:
        parse_size(size, "shard_bytes")
    assert e.value.parameter == "shard_bytes"
