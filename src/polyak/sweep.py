"""The sweep: every single member and every average of the n newest, evaluated.

Reading each checkpoint once, from running sums; the candidates' formulas, the memory
they take, the selection rule and the evaluator's protocol are in :func:`run_sweep`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyak.discovery import Checkpoint, find_checkpoints, order_key
from polyak.distributed import ProcessGroup
from polyak.distributed import current as current_group
from polyak.engine import average_readers, check_compatible, closing_all, open_members
from polyak.errors import IncompatibleCheckpointsError, SchemeError
from polyak.files import check_output_path, is_directory_output
from polyak.formats import format_for_output, format_of, open_checkpoint
from polyak.formats.base import (
    CheckpointReader,
    PlannedTensors,
    TensorInfo,
    is_floating,
    numpy_dtype,
)
from polyak.output import companions_to_copy, write_output
from polyak.posthoc import find_profile_snapshots
from polyak.significance import Comparison, compare, unknown
from polyak.weights.profiles import posthoc_coefficients
from polyak.weights.schemes import (
    Custom,
    Equal,
    Exponential,
    Greedy,
    Linear,
    Power,
    Scheme,
    format_number,
    parse_schemes,
)

__all__ = ["Candidate", "SingleResult", "SweepResult", "run_sweep", "sweep", "write_best"]

Evaluate = Callable[[Mapping[str, np.ndarray]], "float | Mapping[str, float]"]


@dataclass(frozen=True)
class SingleResult:
    """One member evaluated on its own.

    ``recalibrated_*`` are the scores after BatchNorm recalibration, when the
    evaluator recalibrates; None otherwise.
    """

    checkpoint: Checkpoint
    test: float
    validation: float | None = None
    recalibrated_test: float | None = None
    recalibrated_validation: float | None = None


@dataclass(frozen=True)
class Candidate:
    """An average of members under ``scheme``, evaluated.

    Attributes:
        scheme: the scheme's spec, e.g. ``"exp:2"`` or ``"greedy"``.
        n: the number of members averaged: the ``n`` newest, or for ``greedy`` the
            members the soup kept.
        weights: the normalized weights, newest first: of the ``n`` newest members,
            or for ``greedy`` of all members (0 for those it left out).
        test, validation: the scores of the average as computed.
        recalibrated_test, recalibrated_validation: after BatchNorm recalibration,
            when the evaluator recalibrates; None otherwise.
    """

    scheme: str
    n: int
    weights: tuple[float, ...]
    test: float
    validation: float | None = None
    recalibrated_test: float | None = None
    recalibrated_validation: float | None = None

    @property
    def members(self) -> tuple[int, ...]:
        """0-based indices of the members it averages (0 is the newest)."""
        return tuple(index for index, weight in enumerate(self.weights) if weight > 0)


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
        best_recalibrated: whether the selected variant is the best candidate after
            BatchNorm recalibration (its scores then are ``best.recalibrated_*``).
        schemes: the schemes' specs, in the order given.
        best_tensors: the selected candidate's tensors (for writing it out), with
            the recalibrated statistics when ``best_recalibrated``.
        best_single: index (0 is the newest) of the best single member, chosen the
            way the best candidate is (on validation if there is one).
        best_single_recalibrated: whether that member's recalibrated variant won.
        outcomes: per-example test outcomes of ``"selected"``, ``"final"`` (the
            newest member as saved) and ``"best_single"``; None each when the
            evaluator gives none.
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
    best_recalibrated: bool = False
    best_single: int = 0
    best_single_recalibrated: bool = False
    outcomes: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def best_single_test(self) -> float:
        """The best single member's test score (of its winning variant)."""
        member = self.single[self.best_single]
        if self.best_single_recalibrated:
            return member.recalibrated_test
        return member.test

    def comparisons(self) -> dict[str, Comparison]:
        """The selected candidate against the final model and the best single member.

        ``{"final": ..., "best_single": ...}``: each difference on test with its 95%
        paired bootstrap interval, McNemar's p for correct-or-not outcomes, and a
        sentence (:func:`polyak.significance.compare`); the uncertainty is unknown
        when the evaluator gave no per-example outcomes. Computed once, then kept.
        """
        if self._comparisons is None:
            member = self.members[self.best_single].path.name
            others = {
                "final": ("the final model", self.single[0].test),
                "best_single": (f"the best single member ({member})", self.best_single_test),
            }
            found = {}
            selected = self.outcomes.get("selected")
            for key, (against, score) in others.items():
                other = self.outcomes.get(key)
                if selected is None or other is None:
                    found[key] = unknown(self.best_test - score, against)
                else:
                    found[key] = compare(
                        selected, other, higher_is_better=self.higher_is_better, against=against
                    )
            self._comparisons = found
        return self._comparisons

    _comparisons: dict[str, Comparison] | None = field(
        default=None, repr=False, init=False, compare=False
    )

    @property
    def recalibrated(self) -> bool:
        """Whether the candidates were also evaluated after BatchNorm recalibration."""
        return self.best.recalibrated_test is not None

    @property
    def best_test(self) -> float:
        """The selected variant's test score."""
        return self.best.recalibrated_test if self.best_recalibrated else self.best.test

    @property
    def best_validation(self) -> float | None:
        """The selected variant's validation score, if there is validation data."""
        if self.best_recalibrated:
            return self.best.recalibrated_validation
        return self.best.validation

    def candidates_of(self, scheme: str) -> list[Candidate]:
        """The candidates of one scheme, by n."""
        return [candidate for candidate in self.candidates if candidate.scheme == scheme]

    def to_json(self) -> dict:
        """The report as JSON-ready data (the schema of ``polyak sweep --json``)."""

        def scores(item: SingleResult | Candidate) -> dict:
            data: dict[str, Any] = {"metric": item.test}
            if item.validation is not None:
                data["validation"] = item.validation
            if item.recalibrated_test is not None:
                data["recalibrated"] = {"metric": item.recalibrated_test}
                if item.recalibrated_validation is not None:
                    data["recalibrated"]["validation"] = item.recalibrated_validation
            return data

        best: dict[str, Any] = {"scheme": self.best.scheme, "n": self.best.n}
        best["metric"] = self.best_test
        if self.best_validation is not None:
            best["validation"] = self.best_validation
        best["recalibrated"] = self.best_recalibrated
        if self.best.scheme == "greedy":
            best["members"] = list(self.best.members)
        comparisons = self.comparisons()
        best_single: dict[str, Any] = {
            "index": self.best_single,
            "path": str(self.members[self.best_single].path),
            "metric": self.best_single_test,
            "recalibrated": self.best_single_recalibrated,
        }
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
            "best": best,
            "best_single": best_single,
            "uncertainty": {
                "selected_minus_final": comparisons["final"].to_json(),
                "selected_minus_best_single": comparisons["best_single"].to_json(),
            },
        }


class _RunningSums:
    """The float64 running sums one scheme needs, and its candidate for the current n."""

    def __init__(
        self, scheme: Scheme, plan: list[tuple[str, TensorInfo]], positions: list[int | None]
    ) -> None:
        self.scheme = scheme
        self.positions = positions
        # A power profile's mass at member i depends on i and its newer neighbour only,
        # so its coefficients are fixed once all steps are known, like exp's.
        self.masses = scheme.weights(len(positions), positions) if scheme.uses_positions else None
        self.sums = [{name: np.zeros(info.shape) for name, info in plan}]
        if isinstance(scheme, Linear):
            self.sums.append({name: np.zeros(info.shape) for name, info in plan})
        self.norm = 0.0

    def coefficient(self, i: int) -> float:
        """Weight of member i in the running sum (before normalizing)."""
        scheme = self.scheme
        if isinstance(scheme, Exponential):
            return float(np.exp(-(i - 1) / scheme.alpha))
        if self.masses is not None:
            return float(self.masses[i - 1])
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


@dataclass(frozen=True)
class _Scores:
    test: float
    validation: float | None
    recalibrated_test: float | None
    recalibrated_validation: float | None
    # Per-example test outcomes (plain and recalibrated), when the evaluator gives them.
    outcomes: np.ndarray | None = field(default=None, repr=False, compare=False)
    recalibrated_outcomes: np.ndarray | None = field(default=None, repr=False, compare=False)

    def without_outcomes(self) -> _Scores:
        return _Scores(*_fields(self))

    def outcomes_of(self, recalibrated: bool) -> np.ndarray | None:
        return self.recalibrated_outcomes if recalibrated else self.outcomes

    def variants(self) -> list[tuple[float, bool]]:
        """``(selection value, recalibrated?)`` of each variant, plain first."""
        plain = self.validation if self.validation is not None else self.test
        found = [(plain, False)]
        if self.recalibrated_test is not None:
            recalibrated = (
                self.recalibrated_validation
                if self.recalibrated_validation is not None
                else self.recalibrated_test
            )
            found.append((recalibrated, True))
        return found

    @property
    def plain(self) -> float:
        return self.variants()[0][0]


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether score ``a`` is strictly better than ``b``; NaN is worse than anything."""
    if np.isnan(a):
        return False
    if np.isnan(b):
        return True
    return a > b if higher_is_better else a < b


class _ScoreReader:
    """Turns the evaluator's answers into scores, checking they are alike for every call."""

    def __init__(self, evaluate: Evaluate) -> None:
        self.evaluate = evaluate
        self.shape: tuple[bool, ...] | None = None  # (validation?, recalibrated?, outcomes?)
        self.examples: int | None = None  # test examples in the outcomes

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> _Scores:
        value = self.evaluate(tensors)
        if isinstance(value, Mapping):
            if "test" not in value:
                raise SchemeError(
                    f"the evaluator returned {sorted(value)}; it must return a float or a "
                    "mapping with 'test' (and optionally 'validation' and 'recalibrated')."
                )
            recalibrated = value.get("recalibrated")
            if recalibrated is not None and (
                not isinstance(recalibrated, Mapping) or "test" not in recalibrated
            ):
                raise SchemeError(
                    "the evaluator's 'recalibrated' entry must be a mapping with 'test' "
                    f"(and optionally 'validation'); received {recalibrated!r}."
                )
            recalibrated = recalibrated or {}
            scores = _Scores(
                float(value["test"]),
                _optional_float(value.get("validation")),
                _optional_float(recalibrated.get("test")),
                _optional_float(recalibrated.get("validation")),
                self._outcomes(value.get("outcomes")),
                self._outcomes(recalibrated.get("outcomes")),
            )
        else:
            scores = _Scores(float(value), None, None, None)
        shape = (
            scores.validation is not None,
            scores.recalibrated_test is not None,
            scores.outcomes is not None,
        )
        if self.shape is not None and shape != self.shape:
            raise SchemeError(
                "the evaluator returned validation or recalibrated scores for some "
                "candidates only (or per-example outcomes for some only); it must return "
                "the same kinds of score every time."
            )
        self.shape = shape
        return scores

    def _outcomes(self, value: object) -> np.ndarray | None:
        """Per-example test outcomes as a 1-D array, the same length every time."""
        if value is None:
            return None
        outcomes = np.asarray(value)
        if outcomes.dtype == object or outcomes.ndim != 1 or len(outcomes) == 0:
            raise SchemeError(
                "the evaluator's 'outcomes' must be a 1-D array with one value per test "
                f"example (correct or not, or a loss); received shape {outcomes.shape}."
            )
        if self.examples is not None and len(outcomes) != self.examples:
            raise SchemeError(
                f"the evaluator returned outcomes of {len(outcomes)} test examples for one "
                f"candidate and {self.examples} for another; they must be the same examples."
            )
        self.examples = len(outcomes)
        return outcomes


def _check_schemes(schemes: Sequence[Scheme], count: int) -> None:
    if not schemes:
        raise SchemeError("the sweep needs at least one scheme, e.g. equal,linear,exp:2.")
    for scheme in schemes:
        if not isinstance(scheme, (Equal, Linear, Exponential, Power, Custom, Greedy)):
            raise SchemeError(f"scheme {scheme}: the sweep cannot compute it from running sums.")
        if isinstance(scheme, Custom) and len(scheme.values) > count:
            raise SchemeError(
                f"scheme {scheme.spec}: {len(scheme.values)} weights but only {count} checkpoints."
            )


class _Ledger:
    """Every evaluation of a sweep, numbered in the order the sweep asks for them.

    Alone, each is scored at once. Among a group's processes (torchrun), evaluation
    ``i`` is scored by process ``i mod P`` and :meth:`settle` gathers everyone's
    results, so the candidates are shared out; the numbering is the same in every
    process, since every process runs the same sweep.
    """

    def __init__(self, score: _ScoreReader, group: ProcessGroup | None) -> None:
        self.score = score
        self.group = group
        self.results: dict[int, _Scores] = {}
        self.count = 0

    def submit(self, tensors: Mapping[str, np.ndarray]) -> int:
        """Score ``tensors`` here if it falls to this process; return its number."""
        index, self.count = self.count, self.count + 1
        if self.group is None or self.group.owned(index):
            self.results[index] = self.score(tensors)
        return index

    def now(self, tensors: Mapping[str, np.ndarray]) -> _Scores:
        """Score ``tensors`` and give every process the result at once."""
        index, self.count = self.count, self.count + 1
        if self.group is None:
            result = self.score(tensors)
        else:
            local = self.score(tensors) if self.group.owned(index) else None
            result = self.group.broadcast(local, source=index % self.group.size)
        self.results[index] = result.without_outcomes()
        return result

    def forget_outcomes(self, index: int) -> None:
        """Drop a result's per-example outcomes once they are no longer needed."""
        if index in self.results:
            self.results[index] = self.results[index].without_outcomes()

    def reserve(self) -> int:
        """A number for a candidate scored another way (the greedy soup's)."""
        index, self.count = self.count, self.count + 1
        return index

    def settle(self) -> None:
        """Gather every process's results (a no-op alone)."""
        if self.group is not None:
            for part in self.group.gather(self.results):
                self.results.update(part)

    def known(self, index: int) -> bool:
        return index in self.results

    def __getitem__(self, index: int) -> _Scores:
        return self.results[index]


def run_sweep(
    readers: Sequence[CheckpointReader],
    members: Sequence[Checkpoint],
    schemes: Sequence[Scheme],
    evaluate: Evaluate,
    *,
    metric: str = "metric",
    higher_is_better: bool = True,
    progress: Callable[[str], None] | None = None,
    posthoc: Sequence[float] = (),
    posthoc_directory: str | Path | None = None,
    group: ProcessGroup | None = None,
) -> SweepResult:
    """Sweep over open checkpoints; see :func:`sweep`.

    For N members (newest first) and a set of schemes, the sweep evaluates

    - every single member, and
    - for every scheme and every n = 1..N, the average of the n newest members,

    reading each checkpoint once. All candidates come from running sums kept in float64
    while the members stream by, newest first (member i = 1..N):

    - equal:        S_n = sum_{i<=n} x_i,                        mean = S_n / n
    - linear:       weights n+1-i, so sum = (n+1) S_n - T_n with T_n = sum_{i<=n} i x_i,
                    mean = ((n+1) S_n - T_n) / (n (n+1) / 2)
    - exp(alpha):   E_n = sum_{i<=n} exp(-(i-1)/alpha) x_i,     mean = E_n / sum of the weights
    - power(sigma_rel): the same with each member's power-profile mass (``polyak.posthoc``)
    - custom (k weights): C = sum_{i<=k} c_i x_i, a candidate at n = k only.
    - greedy soup (``greedy``, Wortsman et al., 2022): after the pass, members sorted by
      their own score (validation if there is one), best first; each joins the soup, a
      uniform average, if the soup's score with it is at least as good as without
      (Algorithm 1 of "Model soups"). One candidate; it reads each member once more.

    Integer and bool tensors come from the newest member averaged, as in
    ``polyak.engine``. Memory: one float64 copy of the model per running sum (one for
    equal, two for linear, one per alpha, one per custom scheme, one for the greedy soup)
    plus one candidate. With per-example outcomes, the sweep also holds those of every member
    and of the best candidate so far (one value per test example each).

    Selection is honest: with a validation evaluator the best candidate is chosen on
    validation and its test score reported; with test data only, the report says the
    choice was made on test. A tie goes to the candidate with fewer members, then to the
    scheme listed first; a NaN score never wins.

    The evaluator is one plain callable over numpy arrays keyed by tensor name:
    ``evaluate(tensors)`` returns a float (a test score only) or a mapping
    ``{"test": float, "validation": float}``, optionally with ``"recalibrated":
    {"test": ..., "validation": ...}``, the scores after BatchNorm recalibration; then
    both variants of every candidate compete and the report shows both numbers.
    Beside the scores it may give ``"outcomes"`` (also inside ``"recalibrated"``): a
    1-D array with each test example's outcome, the same examples in the same order
    every call: bool for correct or not, or numbers such as each example's loss (their
    mean the test score). The sweep keeps them for the selected candidate, the final
    model (the newest member) and the best single member, and
    :meth:`SweepResult.comparisons` reports the differences with their uncertainty
    (:mod:`polyak.significance`); without outcomes the uncertainty is unknown.
    ``polyak.keras`` and ``polyak.torch`` build evaluators for their models. It is called
    once per candidate, so a framework adapter loads each candidate's weights into its
    model once.

    ``posthoc`` widths add post-hoc EMA candidates (``posthoc:SIGMA_REL``) reconstructed
    from the EMA profiles tracked in ``posthoc_directory`` (by default the newest
    member's directory; see :mod:`polyak.posthoc`).

    ``evaluate`` may also offer ``recalibrated_tensors(tensors) -> {name: array}``:
    the candidate's tensors with its BatchNorm statistics recalibrated, used to
    write out a best candidate whose recalibrated variant won.

    Under torchrun (``group``, by default torch's initialized default group when there
    are several processes), every process reads the members and runs the same sweep.
    An evaluator with ``shards_data`` (polyak's own, on data) takes the group with
    ``use_group(group)`` and scores every candidate on its share of the data,
    gathering the predictions; any other evaluator is called for the candidates that
    fall to its process (``i mod P``), the scores gathered afterwards. The result is
    the same in every process and the same as one process's.
    """
    _check_schemes(schemes, len(readers))
    group = current_group() if group is None else group
    if group is not None and getattr(evaluate, "shards_data", False):
        evaluate.use_group(group)
        group = None  # every process scores every candidate, each on its data share
    positions = [member.step for member in members]
    plan = check_compatible(readers)
    floating = [(name, info) for name, info in plan if is_floating(info.dtype)]
    integer_names = [name for name, info in plan if not is_floating(info.dtype)]
    carried = {name: np.array(readers[0].read(name)) for name in integer_names}
    running = [
        _RunningSums(scheme, floating, positions)
        for scheme in schemes
        if not isinstance(scheme, Greedy)
    ]
    candidate_tensors = {
        name: np.empty(info.shape, numpy_dtype(info.dtype)) for name, info in floating
    }
    candidate_tensors.update(carried)
    score = _ScoreReader(evaluate)
    ledger = _Ledger(score, group)
    chooser = _Chooser(higher_is_better)

    pending_single: list[tuple[Checkpoint, int]] = []
    pending: list[tuple[str, int, tuple[float, ...], int]] = []  # scheme, n, weights, number
    for i, (reader, member) in enumerate(zip(readers, members, strict=True), start=1):
        if progress is not None:
            progress(f"member {i}/{len(readers)}: {member.path.name}")
        # A single member is evaluated as it was saved, integer tensors included.
        own = dict(carried) if i == 1 else {name: reader.read(name) for name in integer_names}
        for name, _ in floating:
            array = reader.read(name)
            own[name] = array
            value = np.asarray(array, dtype=np.float64)
            for sums in running:
                sums.add(i, name, value)
        for sums in running:
            sums.finish_member(i)
        pending_single.append((member, ledger.submit(own)))
        del own
        for sums in running:
            if not sums.has_candidate(i):
                continue
            for name, _ in floating:
                sums.candidate(i, name, candidate_tensors[name])
            number = ledger.submit(candidate_tensors)
            weights = tuple(float(w) for w in sums.scheme.weights(i, positions[:i]))
            pending.append((sums.scheme.spec, i, weights, number))
            if ledger.known(number):
                chooser.offer(number, ledger[number], candidate_tensors)
                # Per-example outcomes are kept for the chooser's best and the members only.
                ledger.forget_outcomes(number)
    ledger.settle()
    single_numbers = [number for _, number in pending_single]
    single = [SingleResult(member, *_fields(ledger[number])) for member, number in pending_single]
    candidates = [
        Candidate(spec, n, weights, *_fields(ledger[number]))
        for spec, n, weights, number in pending
    ]
    by_number = {number: c for (_, _, _, number), c in zip(pending, candidates, strict=True)}
    if any(isinstance(scheme, Greedy) for scheme in schemes):
        soup, soup_tensors, soup_scores = _greedy_soup(
            readers,
            floating,
            integer_names,
            [ledger[number] for number in single_numbers],
            ledger,
            higher_is_better,
            progress,
        )
        candidates.append(soup)
        number = ledger.reserve()
        by_number[number] = soup
        chooser.offer(number, soup_scores, soup_tensors)
    specs = [scheme.spec for scheme in schemes]
    if posthoc:
        directory = members[0].path.parent if posthoc_directory is None else posthoc_directory
        posthoc_pending = []
        for head, tensors, number in _posthoc_candidates(
            directory, posthoc, plan, ledger, progress
        ):
            posthoc_pending.append((head, number))
            specs.append(head[0])
            if ledger.known(number):
                chooser.offer(number, ledger[number], tensors)
                ledger.forget_outcomes(number)
        ledger.settle()
        for (spec, n, weights), number in posthoc_pending:
            candidate = Candidate(spec, n, weights, *_fields(ledger[number]))
            candidates.append(candidate)
            by_number[number] = candidate
    # Computed member by member; reported scheme by scheme, each by n.
    order = {spec: index for index, spec in enumerate(specs)}
    candidates.sort(key=lambda candidate: (order[candidate.scheme], candidate.n))
    number, recalibrated, best_tensors, selected_outcomes = chooser.result(group)
    best = by_number[number]
    # The best single member, chosen like the best candidate (ties to the newest).
    single_chooser = _Chooser(higher_is_better)
    for number in single_numbers:
        single_chooser.offer(number, ledger[number])
    single_number, single_recalibrated, _, single_outcomes = single_chooser.result()
    best_single = single_numbers.index(single_number)
    if recalibrated and hasattr(evaluate, "recalibrated_tensors"):
        best_tensors = {
            name: np.array(array)
            for name, array in evaluate.recalibrated_tensors(best_tensors).items()
        }
    any_result = next(iter(ledger.results.values()))
    return SweepResult(
        metric=metric,
        higher_is_better=higher_is_better,
        selected_on="validation" if any_result.validation is not None else "test",
        members=list(members),
        single=single,
        candidates=candidates,
        best=best,
        schemes=specs,
        best_tensors=best_tensors,
        best_recalibrated=recalibrated,
        best_single=best_single,
        best_single_recalibrated=single_recalibrated,
        outcomes={
            "selected": selected_outcomes,
            "final": ledger[single_numbers[0]].outcomes,
            "best_single": single_outcomes,
        },
    )


def _fields(scores: _Scores) -> tuple[float, float | None, float | None, float | None]:
    return (
        scores.test,
        scores.validation,
        scores.recalibrated_test,
        scores.recalibrated_validation,
    )


class _Chooser:
    """Keeps the best (candidate, variant) offered: strictly better wins, so ties go to
    the one offered first (fewer members, then the scheme listed first).

    Candidates are known by their evaluation number, the order they were offered in.
    """

    def __init__(self, higher_is_better: bool) -> None:
        self.higher_is_better = higher_is_better
        self.best: tuple[int, bool, float] | None = None  # number, recalibrated?, value
        self.tensors: dict[str, np.ndarray] | None = None
        self.outcomes: np.ndarray | None = None

    def offer(
        self,
        number: int,
        scores: _Scores,
        tensors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        for value, recalibrated in scores.variants():
            if self.best is None or _better(value, self.best[2], self.higher_is_better):
                self.best = (number, recalibrated, value)
                self.outcomes = scores.outcomes_of(recalibrated)
                if tensors is not None:
                    self.tensors = {name: np.array(array) for name, array in tensors.items()}

    def result(
        self, group: ProcessGroup | None = None
    ) -> tuple[int, bool, dict[str, np.ndarray] | None, np.ndarray | None]:
        """``(number, recalibrated?, tensors, outcomes)`` of the best; among a group, of all.

        Each process offered the candidates it scored; the best of the bests wins by
        the same rule (its tensors and per-example outcomes then come from the process
        that has them).
        """
        if group is None:
            assert self.best is not None  # one at least
            return self.best[0], self.best[1], self.tensors, self.outcomes
        bests = group.gather(self.best)
        winner: tuple[int, int] | None = None  # (rank, number)
        for rank, best in enumerate(bests):
            if best is None:
                continue
            if winner is None:
                winner = (rank, best[0])
                continue
            current = bests[winner[0]]
            if _better(best[2], current[2], self.higher_is_better) or (
                not _better(current[2], best[2], self.higher_is_better) and best[0] < current[0]
            ):
                winner = (rank, best[0])
        assert winner is not None  # some process scored a candidate
        rank = winner[0]
        tensors, outcomes = group.broadcast(
            (self.tensors, self.outcomes) if group.rank == rank else None, source=rank
        )
        return bests[rank][0], bests[rank][1], tensors, outcomes


def _posthoc_candidates(
    directory: str | Path,
    widths: Sequence[float],
    plan: list[tuple[str, TensorInfo]],
    ledger: _Ledger,
    progress: Callable[[str], None] | None,
) -> Iterator[tuple[tuple[str, int, tuple[float, ...]], dict[str, np.ndarray], int]]:
    """The post-hoc EMA of each width, reconstructed and submitted for scoring.

    Yields ``((scheme, n, weights), tensors, number)``: ``n`` is the number of EMA
    snapshots combined and ``weights`` their coefficients, newest first (they sum to
    1; some may be negative).
    """
    snapshots = find_profile_snapshots(directory)
    snapshots.sort(key=lambda snapshot: (-snapshot.step, snapshot.sigma_rel))
    with closing_all(open_members([order_key(s.path) for s in snapshots], None)) as readers:
        profile_plan = check_compatible(readers)
        if dict(profile_plan) != dict(plan):
            raise IncompatibleCheckpointsError(
                f"the EMA snapshots in {directory} hold other tensors than the checkpoints "
                "swept (names, shapes or dtypes differ); they come from another model."
            )
        for width in widths:
            if progress is not None:
                progress(f"post-hoc EMA sigma_rel {format_number(width)}")
            coefficients = posthoc_coefficients(
                [s.step for s in snapshots], [s.sigma_rel for s in snapshots], width
            )
            tensors = {
                name: np.array(array)
                for name, array in average_readers(readers, coefficients, signed=True)
            }
            number = ledger.submit(tensors)
            head = (
                f"posthoc:{format_number(width)}",
                len(snapshots),
                tuple(float(c) for c in coefficients),
            )
            yield head, tensors, number


def _greedy_soup(
    readers: Sequence[CheckpointReader],
    floating: list[tuple[str, TensorInfo]],
    integer_names: list[str],
    single: list[_Scores],
    ledger: _Ledger,
    higher_is_better: bool,
    progress: Callable[[str], None] | None,
) -> tuple[Candidate, dict[str, np.ndarray], _Scores]:
    """The greedy soup (Wortsman et al., 2022, Algorithm 1) over the members.

    Members are sorted by their own score (validation if there is one, else test),
    best first, ties to the newer; the soup starts with the best and takes each next
    member if the soup's score with it is at least as good as without. The soup is a
    uniform average; integer tensors come from its newest member. Each member is read
    once more; memory: one float64 sum of the soup and one trial.
    """
    count = len(readers)

    def rank(index: int) -> tuple[float, int]:
        value = single[index].validation
        value = single[index].test if value is None else value
        if np.isnan(value):
            return (np.inf, index)
        return (-value if higher_is_better else value, index)

    order = sorted(range(count), key=rank)
    soup = [order[0]]
    totals = {
        name: np.asarray(readers[order[0]].read(name), dtype=np.float64).copy()
        for name, _ in floating
    }
    soup_scores = single[order[0]]
    trial = {name: np.empty(info.shape, numpy_dtype(info.dtype)) for name, info in floating}

    def fill(indices: list[int], extra: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        newest = min(indices)
        for name, _ in floating:
            total = totals[name] if extra is None else totals[name] + extra[name]
            np.multiply(total, 1.0 / len(indices), out=trial[name], casting="unsafe")
        tensors: dict[str, np.ndarray] = dict(trial)
        tensors.update({name: readers[newest].read(name) for name in integer_names})
        return tensors

    for step, index in enumerate(order[1:], start=2):
        if progress is not None:
            progress(f"greedy soup: trying member {step}/{count}")
        member = {
            name: np.asarray(readers[index].read(name), dtype=np.float64) for name, _ in floating
        }
        scores = ledger.now(fill([*soup, index], member))
        if not _better(soup_scores.plain, scores.plain, higher_is_better) and not np.isnan(
            scores.plain
        ):
            soup.append(index)
            soup_scores = scores
            for name, _ in floating:
                totals[name] += member[name]
    weights = tuple(1.0 / len(soup) if index in soup else 0.0 for index in range(count))
    candidate = Candidate("greedy", len(soup), weights, *_fields(soup_scores))
    tensors = {name: np.array(array) for name, array in fill(sorted(soup), None).items()}
    return candidate, tensors, soup_scores


def sweep(
    paths: str | Path | Sequence[str | Path],
    evaluate: Evaluate,
    *,
    schemes: str | Sequence[str | Scheme] = "equal,linear,exp:2",
    last: int | None = None,
    metric: str = "metric",
    higher_is_better: bool = True,
    key: str | None = None,
    posthoc: Sequence[float] = (),
    posthoc_directory: str | Path | None = None,
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
        posthoc: widths (``sigma_rel``) of post-hoc EMA candidates, reconstructed from
            the EMA profiles tracked in ``posthoc_directory`` (by default the newest
            checkpoint's directory).

    Returns:
        A :class:`SweepResult`.

    Example:
        >>> from polyak.sweep import sweep
        >>> result = sweep("run/", evaluate=accuracy_on_test)  # doctest: +SKIP
        >>> result.best.scheme, result.best.n, result.best.test  # doctest: +SKIP
    """
    members = find_checkpoints(paths, last=last)
    parsed = (
        parse_schemes(schemes)
        if isinstance(schemes, str)
        else [s if isinstance(s, Scheme) else parse_schemes(s)[0] for s in schemes]
    )
    with closing_all(open_members(members, key)) as readers:
        return run_sweep(
            readers,
            members,
            parsed,
            evaluate,
            metric=metric,
            higher_is_better=higher_is_better,
            posthoc=posthoc,
            posthoc_directory=posthoc_directory,
        )


def write_best(
    result: SweepResult,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write the sweep's selected candidate as a checkpoint, atomically.

    The newest member is the template: by default the output has its format and
    container (an averaged ``.keras`` keeps the architecture); an explicit suffix
    (``.safetensors``, ``.npz``, ``.pt``) converts, and a directory (``best/``, or a
    name without a suffix) is written as (sharded) safetensors, as with
    :func:`polyak.average_to` (with the newest member's ``config.json`` and tokenizer
    files when it is a model directory).

    Args:
        result: a sweep's result, holding ``best_tensors``.
        out: the file or directory to write; never one of the members.
        overwrite: replace ``out`` if it exists.
        max_shard_size: for a directory, the most bytes per shard, e.g. ``"2GB"``.

    Returns:
        The files written.
    """
    if result.best_tensors is None:
        raise SchemeError("the sweep result holds no tensors of its best candidate to write.")
    members = result.members
    directory = is_directory_output(out)
    output_format = format_for_output(out, format_of(members[0].path))
    out = Path(out)
    # A model directory output gets the newest member's config and tokenizer files.
    companions = companions_to_copy(members[0], output_format)
    check_output_path(
        out,
        [member.path for member in members],
        overwrite=overwrite,
        directory=directory,
        companions=companions,
    )
    with open_checkpoint(members[0].path) as template:
        plan = [(name, template.info(name)) for name in template.names()]
        tensors = PlannedTensors(plan, [(name, result.best_tensors[name]) for name, _ in plan])
        return write_output(
            out,
            tensors,
            template,
            output_format,
            max_shard_size=max_shard_size,
            companions=companions,
            overwrite=overwrite,
        )
