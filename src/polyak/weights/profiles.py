"""Power-function EMA profiles (Karras et al., 2024): their widths, updates and mixtures.

numpy only; the formulas of post-hoc EMA, used by the ``power`` scheme, the online
``power`` mode and :mod:`polyak.posthoc`. Each formula is in the docstring of the function
that computes it.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models"
(2024), average the weights seen up to training time ``t`` with a power-function
profile, the weight of time ``tau`` being

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose relative width is :func:`sigma_rel_of` (inverse :func:`gamma_of`). It is tracked
during training with the decay :func:`power_beta`, combined after training by
:func:`posthoc_coefficients`, and restricted to plain snapshots by
:func:`power_snapshot_weights`.

Example:
    >>> from polyak.weights.profiles import gamma_of, sigma_rel_of
    >>> round(sigma_rel_of(gamma_of(0.1)), 6)
    0.1
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polyak.errors import SchemeError

__all__ = [
    "MAX_SIGMA_REL",
    "gamma_of",
    "parse_widths",
    "posthoc_coefficients",
    "power_beta",
    "power_snapshot_weights",
    "profile_inner_product",
    "sigma_rel_of",
]

# sigma_rel of gamma -> 0 (the flattest power profile, a uniform average from 0 to t).
MAX_SIGMA_REL = float(np.sqrt(1 / 12))


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power profile with exponent ``gamma``.

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``.
    """
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

    One update per step: ``ema <- beta ema + (1 - beta) theta`` with
    ``beta = (1 - delta / t)^(gamma + 1)``; 0 at the first step (``t == delta``),
    so the EMA starts from the weights themselves. With unit steps from 1 to ``T``,
    step ``tau`` then gets exactly the profile's mass
    ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / T^(gamma+1)``.
    """
    if not t > 0 or not 0 < delta <= t:
        raise SchemeError(f"power EMA update: need 0 < delta <= t; received t={t}, delta={delta}.")
    return float((1.0 - delta / t) ** (gamma + 1.0))


def profile_inner_product(
    t_a: np.ndarray | float, gamma_a: np.ndarray | float, t_b: np.ndarray | float, gamma_b
) -> np.ndarray:
    """``<p_a, p_b>`` of power profiles at times ``t_a``, ``t_b`` (broadcast), in float64.

    For ``t_a <= t_b``: ``(gamma_a + 1)(gamma_b + 1) (t_a / t_b)^gamma_b /
    ((gamma_a + gamma_b + 1) t_b)``; symmetric otherwise.
    """
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

    Snapshots of such EMAs, saved at times ``t_i`` with exponents ``gamma_i`` (two
    profiles in the paper), combine into the profile of any other ``sigma_rel`` at time
    ``t``: the coefficients ``x`` minimize the L2 distance between ``sum_i x_i p_i`` and
    the target profile, i.e. solve ``A x = b`` with ``A_ij = <p_i, p_j>`` and
    ``b_i = <p_i, p_target>`` (:func:`profile_inner_product`); then ``x`` is scaled to
    sum to 1 (a profile has unit mass). Coefficients may be negative.

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
            f"post-hoc EMA: the time to reconstruct at must lie within the snapshots' steps, "
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

    Snapshot ``i`` at position ``p_i`` (its step, newest first) stands for the steps
    ``(p_i - d_i, p_i]``; its weight is the profile's mass there, normalized over the
    snapshots: the profile restricted to the saved window. With a snapshot at every
    step from 1 this is exactly the tracked EMA.

    Args:
        positions: the snapshots' steps, newest first, strictly decreasing, > 0.
        sigma_rel: the profile's width.

    Returns:
        Weights newest first, summing to 1: ``w_i ~ p_i^(g+1) - (p_i - d_i)^(g+1)``, with
        ``g = gamma_of(sigma_rel)`` and ``d_i`` the spacing to the newer neighbour (the
        newest: to the next older one).
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


def parse_widths(text: str) -> list[float]:
    """Profile widths (``sigma_rel``) written as text: ``"0.05,0.1"`` -> ``[0.05, 0.1]``.

    Only the text is checked here; :func:`gamma_of` refuses a width out of range.

    Raises:
        SchemeError: a part is not a number, or no width is given.

    Example:
        >>> parse_widths("0.05, 0.1")
        [0.05, 0.1]
    """
    widths = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            widths.append(float(part))
        except ValueError:
            raise SchemeError(
                f"widths (sigma_rel) are numbers separated by commas, e.g. 0.05,0.1; "
                f"received {text!r}."
            ) from None
    if not widths:
        raise SchemeError("give at least one width (sigma_rel), e.g. 0.05,0.1.")
    return widths
