"""Post-hoc EMA on disk: the tracked power-profile directories, and reconstructions from them.

The formulas (Karras et al., 2024) live in :mod:`polyak.weights.profiles`; their names
are re-exported here, as they always were.

On disk: the snapshot helpers (``posthoc=(0.05, 0.10)``) keep each tracked profile in
its own crash-safe snapshot directory, ``DIR/posthoc/sigma-0.05/``, whose manifest
records each EMA snapshot's step; :func:`find_profile_snapshots` reads them and
:func:`reconstruct_to` (``polyak posthoc DIR --sigma-rel ...``) writes the
reconstructions. The helpers update each profile after every training step, its time
``t`` the global step counting from 1 (``t = 1`` after the first optimizer step, whose
update copies the weights) and ``delta`` the steps since its previous update, and
commit the EMA of every profile with each raw snapshot, every ``posthoc_every`` steps
if given, and (the Keras and Lightning callbacks) otherwise at every epoch end; each
profile directory keeps its newest
``posthoc_keep`` snapshots (:data:`DEFAULT_PROFILE_KEEP`).

Example:
    >>> from polyak.posthoc import gamma_of, sigma_rel_of
    >>> round(sigma_rel_of(gamma_of(0.1)), 6)
    0.1
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.checks import whole_number
from polyak.discovery import order_key
from polyak.engine import average_readers, closing_all, open_members
from polyak.errors import DiscoveryError
from polyak.files import check_output_path, is_directory_output
from polyak.formats import format_for_output, format_of
from polyak.output import write_output
from polyak.snapshots import check_posthoc_widths, read_manifest, verify
from polyak.weights.profiles import (
    MAX_SIGMA_REL,
    gamma_of,
    parse_widths,
    posthoc_coefficients,
    power_beta,
    power_snapshot_weights,
    profile_inner_product,
    sigma_rel_of,
)
from polyak.weights.schemes import format_number

__all__ = [
    "DEFAULT_PROFILE_KEEP",
    "MAX_SIGMA_REL",
    "PROFILES_DIRECTORY",
    "PosthocResult",
    "ProfileSnapshot",
    "check_profile_arguments",
    "find_profile_snapshots",
    "gamma_of",
    "parse_widths",
    "posthoc_coefficients",
    "power_beta",
    "power_snapshot_weights",
    "profile_directory",
    "profile_inner_product",
    "profile_steps",
    "reconstruct",
    "reconstruct_to",
    "sigma_rel_of",
]

#: The subdirectory of a snapshot directory that holds the tracked EMA profiles.
PROFILES_DIRECTORY = "posthoc"
#: How many EMA snapshots each tracked profile keeps by default (the newest).
DEFAULT_PROFILE_KEEP = 1000
_PROFILE_NAME = re.compile(r"^sigma-(\d+(?:\.\d+)?)$")


def profile_directory(directory: str | Path, sigma_rel: float) -> Path:
    """Where a snapshot directory keeps the EMA snapshots of one tracked profile."""
    gamma_of(sigma_rel)
    return Path(directory) / PROFILES_DIRECTORY / f"sigma-{format_number(float(sigma_rel))}"


def check_profile_arguments(
    posthoc: object, posthoc_keep: object, posthoc_every: object
) -> tuple[float, ...]:
    """Check the ``posthoc``, ``posthoc_keep`` and ``posthoc_every`` of a snapshot helper.

    Args:
        posthoc: the widths (``sigma_rel``) of the profiles to track, e.g. ``(0.05, 0.10)``;
            empty to track none.
        posthoc_keep: how many EMA snapshots each profile keeps, a whole number >= 1.
        posthoc_every: save the profiles every this many steps (a whole number >= 1),
            or None.

    Returns:
        The widths as floats, in the order given.

    Raises:
        ValueError: (SchemeError for a width out of range) naming the argument, the rule
            and what was received.

    Example:
        >>> check_profile_arguments([0.05, 0.1], 1000, None)
        (0.05, 0.1)
    """
    widths = check_posthoc_widths(posthoc)
    whole_number(posthoc_keep, "posthoc_keep", minimum=1)
    whole_number(posthoc_every, "posthoc_every", minimum=1, or_none=True)
    return widths


def profile_steps(directory: str | Path, sigma_rel: float) -> list[int | None]:
    """The steps of the EMA snapshots one profile's manifest lists, oldest first ([] if none).

    Reads the manifest only (no checksums); :func:`find_profile_snapshots` verifies.
    """
    return [s.step for s in read_manifest(profile_directory(directory, sigma_rel)) or []]


@dataclass(frozen=True)
class ProfileSnapshot:
    """One saved snapshot of a tracked power-function EMA."""

    path: Path
    step: int
    sigma_rel: float


def find_profile_snapshots(directory: str | Path) -> list[ProfileSnapshot]:
    """The EMA snapshots of every profile tracked for a snapshot directory.

    Args:
        directory: a snapshot directory (holding ``posthoc/``), or its ``posthoc/``.

    Returns:
        Every profile's snapshots, each checked against its manifest's checksum,
        by profile then step.

    Raises:
        DiscoveryError: no profiles, or a snapshot without a step.
        CheckpointError: a damaged manifest or snapshot.
    """
    directory = Path(directory)
    base = directory / PROFILES_DIRECTORY if directory.name != PROFILES_DIRECTORY else directory
    profiles = sorted(
        (float(match.group(1)), child)
        for child in (base.iterdir() if base.is_dir() else ())
        if child.is_dir() and (match := _PROFILE_NAME.match(child.name))
    )
    if not profiles:
        raise DiscoveryError(
            f"directory {directory}: holds no tracked EMA profiles "
            f"({PROFILES_DIRECTORY}/sigma-*/). Save them while training with the snapshot "
            "helpers' posthoc=(0.05, 0.10)."
        )
    found = []
    for sigma_rel, child in profiles:
        gamma_of(sigma_rel)
        for snapshot in verify(child):
            if snapshot.step is None or snapshot.step <= 0:
                raise DiscoveryError(
                    f"snapshot {snapshot.path}: its manifest gives no step > 0 (received "
                    f"{snapshot.step}); post-hoc EMA needs the step each profile was saved at."
                )
            found.append(ProfileSnapshot(snapshot.path, snapshot.step, sigma_rel))
    if not found:
        raise DiscoveryError(f"directory {base}: its profiles hold no snapshots yet.")
    return found


@dataclass(frozen=True)
class PosthocResult:
    """One reconstructed profile.

    Attributes:
        sigma_rel: the profile's width.
        time: the step it is reconstructed at.
        snapshots: the EMA snapshots combined.
        coefficients: their coefficients (sum 1, some may be negative).
        output: the file written, or None.
    """

    sigma_rel: float
    time: float
    snapshots: list[ProfileSnapshot]
    coefficients: np.ndarray
    output: Path | None = None


def _plan(directory: str | Path, sigma_rel: float, time: float | None):
    snapshots = find_profile_snapshots(directory)
    # Newest first, as the engine takes its members (its template is the first).
    snapshots.sort(key=lambda snapshot: (-snapshot.step, snapshot.sigma_rel))
    coefficients = posthoc_coefficients(
        [s.step for s in snapshots], [s.sigma_rel for s in snapshots], sigma_rel, time
    )
    time = float(max(s.step for s in snapshots)) if time is None else float(time)
    return snapshots, coefficients, time


def reconstruct(
    directory: str | Path, sigma_rel: float, *, time: float | None = None
) -> tuple[dict[str, np.ndarray], PosthocResult]:
    """The post-hoc EMA of width ``sigma_rel`` at step ``time``, as numpy arrays.

    Args:
        directory: a snapshot directory with tracked profiles (``posthoc/``).
        sigma_rel: the width of the profile to reconstruct.
        time: the step; by default the latest EMA snapshot's.

    Returns:
        ``({name: array}, PosthocResult)``.
    """
    snapshots, coefficients, time = _plan(directory, sigma_rel, time)
    with closing_all(open_members([order_key(s.path) for s in snapshots], None)) as readers:
        tensors = average_readers(readers, coefficients, signed=True)
        arrays = {name: np.array(array, copy=True) for name, array in tensors}
    return arrays, PosthocResult(float(sigma_rel), time, snapshots, coefficients)


def reconstruct_to(
    directory: str | Path,
    sigma_rel: float,
    out: str | Path,
    *,
    time: float | None = None,
    overwrite: bool = False,
) -> PosthocResult:
    """Write the post-hoc EMA of width ``sigma_rel`` at step ``time`` to ``out``, atomically.

    The output's suffix picks its format, as for :func:`polyak.average_to`; by
    default (no suffix given) use the snapshots' own.
    """
    snapshots, coefficients, time = _plan(directory, sigma_rel, time)
    out_text = out
    out = Path(out)
    output_format = format_for_output(out_text, format_of(snapshots[0].path))
    check_output_path(
        out,
        [s.path for s in snapshots],
        overwrite=overwrite,
        directory=is_directory_output(out_text),
    )
    with closing_all(open_members([order_key(s.path) for s in snapshots], None)) as readers:
        tensors = average_readers(readers, coefficients, signed=True)
        write_output(out, tensors, readers[0], output_format, overwrite=overwrite)
    return PosthocResult(float(sigma_rel), time, snapshots, coefficients, out)
