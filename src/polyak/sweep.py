"""The sweep: every single member and every average of the n newest, evaluated.

For N members (newest first) and a set of schemes, the sweep evaluates

- every single member, and
- for every scheme and every n = 1..N, the average of the n newest members,

reading each checkpoint once. All candidates come from running sums kept in float64
while the members stream by, newest first (member i = 1..N):

- equal:        S_n = sum_{i<=n} x_i,                        mean = S_n / n
- linear:       weights n+1-i, so sum = (n+1) S_n - T_n with T_n = sum_{i<=n} i x_i,
                mean = ((n+1) S_n - T_n) / (n (n+1) / 2)
- exp(alpha):   E_n = sum_{i<=n} exp(-(i-1)/alpha) x_i,     mean = E_n / sum of the weights
- custom (k weights): C = sum_{i<=k} c_i x_i, a candidate at n = k only.

Integer and bool tensors come from the newest member, as in ``polyak.averaging``.
Memory: one float64 copy of the model per running sum (two for equal and linear
together, one per alpha, one per custom scheme) plus one candidate.

Selection is honest: with a validation evaluator the best candidate is chosen on
validation and its test score reported; with test data only, the report says the
choice was made on test. A tie goes to the candidate with fewer members, then to the
scheme listed first; a NaN score never wins.

The evaluator is one plain callable over numpy arrays keyed by tensor name:
``evaluate(tensors)`` returns a float (a test score only) or a mapping
``{"test": float, "validation": float}``; ``polyak.keras`` builds them for Keras
models. It is called once per candidate, so a framework adapter loads each
candidate's weights into its model once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polyak.averaging import check_compatible, open_members, write_output
from polyak.discovery import Checkpoint, find_checkpoints
from polyak.errors import SchemeError
from polyak.files import check_output_path
from polyak.formats import format_for_output, format_of, open_checkpoint
from polyak.formats.base import (
    CheckpointReader,
    PlannedTensors,
    TensorInfo,
    is_floating,
    numpy_dtype,
)
from polyak.schemes import Custom, Equal, Exponential, Linear, Scheme, parse_schemes

__all__ = ["Candidate", "SingleResult", "SweepResult", "run_sweep", "sweep", "write_best"]

Evaluate = Callable[[Mapping[str, np.ndarray]], "float | Mapping[str, float]"]


@dataclass(frozen=True)
class SingleResult:
    """One member evaluated on its own."""

    checkpoint: Checkpoint
    test: float
    validation: float | None = None


@dataclass(frozen=True)
class Candidate:
    """The average of the ``n`` newest members under ``scheme``, evaluated."""

    scheme: str
    n: int
    weights: tuple[float, ...]
    test: float
    validation: float | None = None


@dataclass
class SweepResult:
    """Everything a sweep measured, and the candidate it selected.

    Attributes:
        metric: the metric's name, e.g. ``"accuracy"``.
        higher_is_better: whether larger metric values are better.
        selected_on: ``"validation"`` or ``"test"``: the data the best was chosen on.
        members: the checkpoints, newest first.
        single: each member on its own, newest first.
        candidates: every (scheme, n) average, in scheme order then n.
        best: the selected candidate.
        best_tensors: the selected candidate's tensors (for writing it out).
    """

    metric: str
    higher_is_better: bool
    selected_on: str
    members: list[Checkpoint]
    single: list[SingleResult]
    candidates: list[Candidate]
    best: Candidate
    schemes: list[str] = field(default_factory=list)
    best_tensors: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def candidates_of(self, scheme: str) -> list[Candidate]:
        """The candidates of one scheme, by n."""
        return [candidate for candidate in self.candidates if candidate.scheme == scheme]

    def to_json(self) -> dict:
        """The report as JSON-ready data (the schema of ``polyak sweep --json``)."""

        def scores(item: SingleResult | Candidate) -> dict:
            data = {"metric": item.test}
            if item.validation is not None:
                data["validation"] = item.validation
            return data

        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "selected_on": self.selected_on,
            "schemes": self.schemes,
            "members": [
                {"path": str(member.path), "step": member.step, "epoch": member.epoch}
                for member in self.members
            ],
            "single": [{"path": str(s.checkpoint.path), **scores(s)} for s in self.single],
            "candidates": [
                {"scheme": c.scheme, "n": c.n, "weights": list(c.weights), **scores(c)}
                for c in self.candidates
            ],
            "best": {"scheme": self.best.scheme, "n": self.best.n, **scores(self.best)},
        }


class _RunningSums:
    """The float64 running sums one scheme needs, and its candidate for the current n."""

    def __init__(self, scheme: Scheme, plan: list[tuple[str, TensorInfo]]) -> None:
        self.scheme = scheme
        self.sums = [{name: np.zeros(info.shape) for name, info in plan}]
        if isinstance(scheme, Linear):
            self.sums.append({name: np.zeros(info.shape) for name, info in plan})
        self.norm = 0.0

    def coefficient(self, i: int) -> float:
        """Weight of member i in the running sum (before normalizing)."""
        scheme = self.scheme
        if isinstance(scheme, Exponential):
            return float(np.exp(-(i - 1) / scheme.alpha))
        if isinstance(scheme, Custom):
            return scheme.values[i - 1] if i <= len(scheme.values) else 0.0
        return 1.0

    def add(self, i: int, name: str, value: np.ndarray) -> None:
        coefficient = self.coefficient(i)
        if coefficient:
            self.sums[0][name] += coefficient * value
        if isinstance(self.scheme, Linear):
            self.sums[1][name] += i * value

    def has_candidate(self, n: int) -> bool:
        if isinstance(self.scheme, Custom):
            return n == len(self.scheme.values)
        return True

    def finish_member(self, i: int) -> None:
        self.norm += self.coefficient(i)

    def candidate(self, n: int, name: str, out: np.ndarray) -> None:
        """Write the candidate of the n newest members for tensor ``name`` into ``out``."""
        if isinstance(self.scheme, Linear):
            combined = (n + 1) * self.sums[0][name] - self.sums[1][name]
            np.multiply(combined, 2.0 / (n * (n + 1)), out=out, casting="unsafe")
        else:
            np.multiply(self.sums[0][name], 1.0 / self.norm, out=out, casting="unsafe")


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)


def _selection_key(candidate: Candidate) -> float:
    return candidate.validation if candidate.validation is not None else candidate.test


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    if np.isnan(b):
        return not np.isnan(a)
    return a > b if higher_is_better else a < b


def run_sweep(
    readers: Sequence[CheckpointReader],
    members: Sequence[Checkpoint],
    schemes: Sequence[Scheme],
    evaluate: Evaluate,
    *,
    metric: str = "metric",
    higher_is_better: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Sweep over open checkpoints; see :func:`sweep`."""
    if not schemes:
        raise SchemeError("the sweep needs at least one scheme, e.g. equal,linear,exp:2.")
    for scheme in schemes:
        if not isinstance(scheme, (Equal, Linear, Exponential, Custom)):
            raise SchemeError(f"scheme {scheme}: the sweep cannot compute it from running sums.")
        if isinstance(scheme, Custom) and len(scheme.values) > len(readers):
            raise SchemeError(
                f"scheme {scheme.spec}: {len(scheme.values)} weights but only "
                f"{len(readers)} checkpoints."
            )
    plan = check_compatible(readers)
    floating = [(name, info) for name, info in plan if is_floating(info.dtype)]
    integer_names = [name for name, info in plan if not is_floating(info.dtype)]
    carried = {name: np.array(readers[0].read(name)) for name in integer_names}
    sums = [_RunningSums(scheme, floating) for scheme in schemes]
    candidate_tensors = {
        name: np.empty(info.shape, numpy_dtype(info.dtype)) for name, info in floating
    }
    candidate_tensors.update(carried)

    selected_on: list[str] = []

    def score(tensors: Mapping[str, np.ndarray]) -> tuple[float, float | None]:
        value = evaluate(tensors)
        if isinstance(value, Mapping):
            if "test" not in value:
                raise SchemeError(
                    f"the evaluator returned {sorted(value)}; it must return a float or a "
                    "mapping with 'test' (and optionally 'validation')."
                )
            scores = (float(value["test"]), _optional_float(value.get("validation")))
        else:
            scores = (float(value), None)
        split = "test" if scores[1] is None else "validation"
        if selected_on and selected_on[0] != split:
            raise SchemeError("the evaluator returned a validation score for some candidates only.")
        selected_on[:1] = [split]
        return scores

    single: list[SingleResult] = []
    candidates: list[Candidate] = []
    best: Candidate | None = None
    best_tensors: dict[str, np.ndarray] | None = None
    for i, (reader, member) in enumerate(zip(readers, members, strict=True), start=1):
        if progress is not None:
            progress(f"member {i}/{len(readers)}: {member.path.name}")
        # A single member is evaluated as it was saved, integer tensors included.
        own = dict(carried) if i == 1 else {name: reader.read(name) for name in integer_names}
        for name, _ in floating:
            array = reader.read(name)
            own[name] = array
            value = np.asarray(array, dtype=np.float64)
            for running in sums:
                running.add(i, name, value)
        for running in sums:
            running.finish_member(i)
        test_value, validation_value = score(own)
        single.append(SingleResult(member, test_value, validation_value))
        del own
        for running in sums:
            if not running.has_candidate(i):
                continue
            for name, _ in floating:
                running.candidate(i, name, candidate_tensors[name])
            test_value, validation_value = score(candidate_tensors)
            weights = tuple(float(w) for w in running.scheme.weights(i))
            candidate = Candidate(running.scheme.spec, i, weights, test_value, validation_value)
            candidates.append(candidate)
            if best is None or _better(
                _selection_key(candidate), _selection_key(best), higher_is_better
            ):
                best = candidate
                best_tensors = {name: np.array(array) for name, array in candidate_tensors.items()}
    assert best is not None  # at least one member and one scheme give a candidate
    # Computed member by member; reported scheme by scheme, each by n.
    order = {scheme.spec: index for index, scheme in enumerate(schemes)}
    candidates.sort(key=lambda candidate: (order[candidate.scheme], candidate.n))
    return SweepResult(
        metric=metric,
        higher_is_better=higher_is_better,
        selected_on=selected_on[0],
        members=list(members),
        single=single,
        candidates=candidates,
        best=best,
        schemes=[scheme.spec for scheme in schemes],
        best_tensors=best_tensors,
    )


def sweep(
    paths: str | Path | Sequence[str | Path],
    evaluate: Evaluate,
    *,
    schemes: str | Sequence[str | Scheme] = "equal,linear,exp:2",
    last: int | None = None,
    metric: str = "metric",
    higher_is_better: bool = True,
    key: str | None = None,
) -> SweepResult:
    """Evaluate every member and every (scheme, n) average of checkpoints, in one pass.

    Args:
        paths: checkpoint files, directories or globs (ordered newest first by name).
        evaluate: ``evaluate(tensors)`` with ``tensors`` mapping tensor names to numpy
            arrays in their own dtypes; returns the test score, or
            ``{"test": ..., "validation": ...}`` so that the best candidate is chosen
            on validation and reported on test.
        schemes: a list or comma-separated spec, e.g. ``"equal,linear,exp:0.5,1,2"``.
        last: sweep only the ``last`` newest checkpoints.
        metric: the metric's name for the report.
        higher_is_better: False for losses.
        key: for PyTorch checkpoint dicts, the key holding the weights.

    Returns:
        A :class:`SweepResult`.

    Example:
        >>> result = polyak.sweep("run/", evaluate=accuracy_on_test)  # doctest: +SKIP
        >>> result.best.scheme, result.best.n, result.best.test  # doctest: +SKIP
    """
    members = find_checkpoints(paths, last=last)
    parsed = (
        parse_schemes(schemes)
        if isinstance(schemes, str)
        else [s if isinstance(s, Scheme) else parse_schemes(s)[0] for s in schemes]
    )
    readers = open_members(members, key)
    try:
        return run_sweep(
            readers,
            members,
            parsed,
            evaluate,
            metric=metric,
            higher_is_better=higher_is_better,
        )
    finally:
        for reader in readers:
            reader.close()


def write_best(result: SweepResult, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the sweep's selected candidate as a checkpoint file, atomically.

    The newest member is the template: by default the output has its format and
    container (an averaged ``.keras`` keeps the architecture); an explicit suffix
    (``.safetensors``, ``.npz``, ``.pt``) converts.

    Args:
        result: a sweep's result, holding ``best_tensors``.
        out: the file to write; never one of the members.
        overwrite: replace ``out`` if it exists.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    members = result.members
    if result.best_tensors is None:
        raise SchemeError("the sweep result holds no tensors of its best candidate to write.")
    check_output_path(out, [member.path for member in members], overwrite=overwrite)
    output_format = format_for_output(out, format_of(members[0].path))
    with open_checkpoint(members[0].path) as template:
        plan = [(name, template.info(name)) for name in template.names()]
        tensors = PlannedTensors(plan, [(name, result.best_tensors[name]) for name, _ in plan])
        write_output(out, tensors, template, output_format)
    return out
