"""Bounds every parser checks before it allocates: one rule for compressed data.

A compressed member (a zip record of a ``.pt``, an ``.npz`` member, a file in a
``.keras`` archive) is inflated only if the size it declares is plausible: at most
:data:`MAX_INFLATION` times its compressed size (deflate, the only method these
formats use, cannot do better than about 1032 to 1) and, for data read whole into
memory rather than streamed (a pickle, an array for evaluation), at most the
absolute ``limit`` the caller gives. Anything beyond is a crafted or corrupt file,
refused from the zip directory alone, before a byte is inflated.
"""

from __future__ import annotations

__all__ = [
    "MAX_DIMENSIONS",
    "MAX_DIMENSION_SIZE",
    "MAX_INFLATION",
    "MAX_PICKLE_BYTES",
    "inflation_refusal",
    "shape_refusal",
]

# Deflate inflates at most about 1032-fold; a member declaring more than this times its
# compressed size is lying about its size.
MAX_INFLATION = 1100
# numpy's and torch's limit on dimensions.
MAX_DIMENSIONS = 64
# A checkpoint's pickle describes tensors (about 100 bytes each) and small settings.
MAX_PICKLE_BYTES = 256 << 20


def inflation_refusal(declared: int, compressed: int, *, limit: int | None = None) -> str | None:
    """Why a compressed member declaring ``declared`` bytes is refused, or None.

    Example:
        >>> inflation_refusal(10_000, 100) is None
        True
        >>> inflation_refusal(2**40, 500_000)
        'declares 1099511627776 bytes from 500000 compressed bytes, more than deflate can inflate'
    """
    if declared > MAX_INFLATION * max(compressed, 1):
        return (
            f"declares {declared} bytes from {compressed} compressed bytes, more than deflate "
            "can inflate"
        )
    if limit is not None and declared > limit:
        return f"declares {declared} bytes, more than the {limit} allowed"
    return None


# No file holds a dimension this large; numpy cannot even describe an empty array with it.
MAX_DIMENSION_SIZE = 2**62


def shape_refusal(shape: tuple[int, ...] | list[int]) -> str | None:
    """Why a declared shape is refused before anything is allocated, or None.

    Example:
        >>> shape_refusal((1,) * 65)
        'has 65 dimensions, more than 64'
    """
    if len(shape) > MAX_DIMENSIONS:
        return f"has {len(shape)} dimensions, more than {MAX_DIMENSIONS}"
    if any(size > MAX_DIMENSION_SIZE for size in shape):
        text = str(tuple(shape))
        return f"has shape {text if len(text) <= 60 else text[:57] + '...'}, larger than any file"
    return None
