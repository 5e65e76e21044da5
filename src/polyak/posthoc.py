"""Power-function EMA profiles and post-hoc EMA reconstruction (Karras et al., 2024). numpy only.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models"
(2024), average the weights seen up to training time ``t`` with a power-function
profile, the weight of time ``tau`` being

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose width relative to ``t`` is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

Tracked during training, one update per step of length ``delta``:

    ema <- beta ema + (1 - beta) theta,   beta = (1 - delta / t)^(gamma + 1),

which gives step ``tau`` (unit steps from 1 to T) exactly the weight
``(tau^(gamma+1) - (tau-1)^(gamma+1)) / T^(gamma+1)``.

Post-hoc reconstruction: snapshots of such EMAs, saved at times ``t_i`` with
exponents ``gamma_i`` (two profiles in the paper), combine into the profile of any
other ``sigma_rel`` at time ``t``: the coefficients ``x`` minimize the L2 distance
between ``sum_i x_i p_{t_i, gamma_i}`` and ``p_{t, gamma}``, i.e. solve ``A x = b``
with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``, where for ``t_a <= t_b``

    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) (t_a / t_b)^gamma_b / ((gamma_a + gamma_b + 1) t_b),

then are scaled to sum to 1 (a profile has unit mass). Coefficients may be negative.

Over plain snapshots (the ``power:SIGMA_REL`` scheme), snapshot ``i`` at position
``p_i`` (its step, newest first) stands for the steps ``(p_i - d_i, p_i]``, ``d_i`` the
spacing to its newer neighbour (the newest: to the next older one); its weight is the
profile's mass there, ``p_i^(gamma+1) - (p_i - d_i)^(gamma+1)``, normalized over the
snapshots: the profile restricted to the saved window. With a snapshot at every step
from 1 this is exactly the tracked EMA.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.errors import DiscoveryError, SchemeError

__all__ = [
    "DEFAULT_PROFILE_KEEP",
    "MAX_SIGMA_REL",
    "PROFILES_DIRECTORY",
    "PosthocResult",
    "ProfileSnapshot",
    "check_profile_arguments",
    "find_profile_snapshots",
    "gamma_of",
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

# sigma_rel of gamma -> 0 (the flattest power profile, a uniform average from 0 to t).
MAX_SIGMA_REL = float(np.sqrt(1 / 12))


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power profile with exponent ``gamma``."""
    gamma = float(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_of(sigma_rel: float) -> float:
    """The exponent of the power profile of width ``sigma_rel`` (0 < sigma_rel < 1/sqrt(12)).

    The largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0``.

    Raises:
        SchemeError: ``sigma_rel`` is not a number in (0, 0.2887).
    """
    if not isinstance(sigma_rel, (int, float, np.floating)) or not (
        0 < float(sigma_rel) < MAX_SIGMA_REL
    ):
        raise SchemeError(
            f"sigma_rel must be a number in (0, {MAX_SIGMA_REL:.4f}) (a width relative to the "
            f"training length; 0.05 to 0.2 are usual); received {sigma_rel!r}."
        )
    inverse = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def power_beta(gamma: float, t: float, delta: float = 1.0) -> float:
    """The decay of one tracking update at time ``t`` after a step of ``delta``.

    ``beta = (1 - delta / t)^(gamma + 1)``; 0 at the first step (``t == delta``),
    so the EMA starts from the weights themselves.
    """
    if not t > 0 or not 0 < delta <= t:
        raise SchemeError(f"power EMA update: need 0 < delta <= t; received t={t}, delta={delta}.")
    return float((1.0 - delta / t) ** (gamma + 1.0))


def profile_inner_product(
    t_a: np.ndarray | float, gamma_a: np.ndarray | float, t_b: np.ndarray | float, gamma_b
) -> np.ndarray:
    """``<p_a, p_b>`` of power profiles at times ``t_a``, ``t_b`` (broadcast), in float64."""
    t_a, gamma_a, t_b, gamma_b = (
        np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b)
    )
    earlier = t_a <= t_b
    ratio = np.where(earlier, t_a / t_b, t_b / t_a)
    exponent = np.where(earlier, gamma_b, gamma_a)
    later = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * later)


def posthoc_coefficients(
    times: Sequence[float],
    sigma_rels: Sequence[float],
    target_sigma_rel: float,
    target_time: float | None = None,
) -> np.ndarray:
    """Coefficients that combine EMA snapshots into the profile of ``target_sigma_rel``.

    Args:
        times: each snapshot's training time (its step), in any order.
        sigma_rels: the ``sigma_rel`` of the EMA each snapshot holds.
        target_sigma_rel: the width of the profile to reconstruct.
        target_time: when; by default the latest snapshot's time.

    Returns:
        One coefficient per snapshot, summing to 1 (some may be negative).

    Raises:
        SchemeError: no snapshots, times not positive, ``target_time`` outside the
            snapshots' times (or not a finite number), or two snapshots of the same
            profile at the same time (the system is singular).
    """
    times = np.asarray(times, dtype=np.float64)
    if times.size == 0 or times.shape != np.shape(sigma_rels):
        raise SchemeError(
            f"post-hoc EMA: one time per snapshot profile is needed; received {times.size} "
            f"times for {np.size(sigma_rels)} profiles."
        )
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise SchemeError(f"post-hoc EMA: snapshot times must be > 0; received {times.tolist()}.")
    gammas = np.array([gamma_of(s) for s in sigma_rels])
    pairs = list(zip(times.tolist(), gammas.tolist(), strict=True))
    if len(set(pairs)) != len(pairs):
        raise SchemeError(
            "post-hoc EMA: two snapshots hold the same profile at the same time; keep one."
        )
    first, last = float(times.min()), float(times.max())
    target_time = last if target_time is None else float(target_time)
    # Only reconstructions between the first and the last snapshot are interpolations;
    # outside, the least-squares fit extrapolates silently (and 0, inf, nan fail in numpy).
    if not first <= target_time <= last:
        raise SchemeError(
            f"post-hoc EMA: the time (CLI --time) must lie within the snapshots' steps, "
            f"{first:g} to {last:g}; received {target_time:g}."
        )
    target_gamma = gamma_of(target_sigma_rel)
    rows, columns = times[:, None], times[None, :]
    a = profile_inner_product(rows, gammas[:, None], columns, gammas[None, :])
    b = profile_inner_product(times, gammas, target_time, target_gamma)
    coefficients = np.linalg.solve(a, b)
    return coefficients / coefficients.sum()


def power_snapshot_weights(positions: Sequence[float], sigma_rel: float) -> np.ndarray:
    """Weights of plain snapshots under the power profile of ``sigma_rel`` (``power:`` scheme).

    Args:
        positions: the snapshots' steps, newest first, strictly decreasing, > 0.
        sigma_rel: the profile's width.

    Returns:
        Weights newest first, summing to 1; see the module docstring for the formula.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size == 0:
        raise SchemeError("power scheme: at least one checkpoint is needed.")
    if not np.all(np.isfinite(positions)) or np.any(positions <= 0):
        raise SchemeError(
            "power scheme: every checkpoint needs a step > 0 in its name; received "
            f"{positions.tolist()}."
        )
    if np.any(np.diff(positions) >= 0):
        raise SchemeError(
            "power scheme: checkpoints must be newest first with strictly decreasing steps; "
            f"received {positions.tolist()}."
        )
    exponent = gamma_of(sigma_rel) + 1.0
    if positions.size == 1:
        return np.ones(1)
    spacing = np.empty_like(positions)
    spacing[1:] = positions[:-1] - positions[1:]
    spacing[0] = positions[0] - positions[1]
    lower = np.maximum(positions - spacing, 0.0)
    # Scaled by the newest position: same ratios, no overflow for large steps.
    mass = (positions / positions[0]) ** exponent - (lower / positions[0]) ** exponent
    return mass / mass.sum()


# ---------------------------------------------------------------- profiles on disk


def profile_directory(directory: str | Path, sigma_rel: float) -> Path:
    """Where a snapshot directory keeps the EMA snapshots of one tracked profile."""
    from polyak.schemes import format_number

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
    from polyak.schemes import format_number

    if isinstance(posthoc, (str, bytes)) or not isinstance(posthoc, (tuple, list)):
        raise ValueError(
            "posthoc takes the widths (sigma_rel) of the EMA profiles to track, as a tuple or "
            f"list such as (0.05, 0.10), or () for none; received {posthoc!r}."
        )
    widths = []
    for width in posthoc:
        gamma_of(width)  # a SchemeError (a ValueError) naming the allowed range
        widths.append(float(width))
    names = [format_number(width) for width in widths]
    if len(set(names)) != len(names):
        raise ValueError(f"posthoc widths must differ from each other; received {posthoc!r}.")
    for name, value, minimum in (
        ("posthoc_keep", posthoc_keep, 1),
        ("posthoc_every", posthoc_every, 1),
    ):
        if value is None and name == "posthoc_every":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = f"a whole number >= {minimum}" + (" or None" if name == "posthoc_every" else "")
            raise ValueError(f"{name} must be {what}; received {value!r}.")
    return tuple(widths)


def profile_steps(directory: str | Path, sigma_rel: float) -> list[int | None]:
    """The steps of the EMA snapshots one profile's manifest lists, oldest first ([] if none).

    Reads the manifest only (no checksums); :func:`find_profile_snapshots` verifies.
    """
    from polyak.snapshots import read_manifest

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
    from polyak.snapshots import verify

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
    from polyak.averaging import average_readers, open_members
    from polyak.discovery import order_key

    snapshots, coefficients, time = _plan(directory, sigma_rel, time)
    readers = open_members([order_key(s.path) for s in snapshots], None)
    try:
        tensors = average_readers(readers, coefficients, signed=True)
        arrays = {name: np.array(array, copy=True) for name, array in tensors}
    finally:
        for reader in readers:
            reader.close()
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
    from polyak.averaging import average_readers, open_members, write_output
    from polyak.discovery import order_key
    from polyak.files import check_output_path, is_directory_output
    from polyak.formats import format_for_output, format_of

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
    readers = open_members([order_key(s.path) for s in snapshots], None)
    try:
        tensors = average_readers(readers, coefficients, signed=True)
        write_output(out, tensors, readers[0], output_format, overwrite=overwrite)
    finally:
        for reader in readers:
            reader.close()
    return PosthocResult(float(sigma_rel), time, snapshots, coefficients, out)
