"""Reports of a sweep: the classic lines, a table, a plot and a JSON file.

The classic lines are those of the tutorial polyak started from, one per n for each
scheme: ``> 3: single=0.811, ensemble=0.813``, where ``single`` is the n-th newest
member on its own and ``ensemble`` the average of the n newest.

Every report also says whether the selected candidate's gain is more than noise
(:func:`uncertainty_lines`, the table's caption, ``report.json``'s
``uncertainty``, the plot's error bar): selected - final model and selected - best
single member on test, each with a 95% paired bootstrap interval, McNemar's exact
p-value for accuracy, and one sentence (:mod:`polyak.significance`).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from polyak.errors import OutputError, require
from polyak.files import atomic_output
from polyak.significance import Comparison
from polyak.sweep import SweepResult

__all__ = [
    "classic_lines",
    "comparison_text",
    "is_posthoc",
    "sweep_table",
    "uncertainty_lines",
    "write_json",
    "write_plot",
]


def comparison_text(comparison: Comparison, name: str) -> str:
    """One line: the difference, its 95% interval, the p-value and the sentence.

    ``name`` names the difference, e.g. ``"selected - final"``.
    """
    head = f"{name}: {comparison.difference:+.4f}"
    if comparison.low is None:
        return f"{head}; {comparison.sentence}."
    details = f"95% interval {comparison.low:+.4f} to {comparison.high:+.4f}"
    if comparison.p_value is not None:
        details += f", McNemar p = {_p_text(comparison.p_value)}"
    details += f", {comparison.examples} test examples"
    return f"{head} ({details}): {comparison.sentence}."


def _p_text(p_value: float) -> str:
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}"


def uncertainty_lines(result: SweepResult) -> list[str]:
    """The selected candidate against the final model and the best single member, on test."""
    comparisons = result.comparisons()
    return [
        comparison_text(comparisons["final"], "selected − final"),
        comparison_text(comparisons["best_single"], "selected − best single"),
    ]


def classic_lines(result: SweepResult, scheme: str) -> list[str]:
    """The tutorial's lines for one scheme, on test data: ``> n: single=..., ensemble=...``.

    The greedy soup has no n-th newest to compare with: its one line names the
    members it kept (0 is the newest); a post-hoc EMA's names the EMA snapshots it
    combines. The selected candidate's scheme ends with the uncertainty lines
    (:func:`uncertainty_lines`), each starting ``> ``.
    """
    lines = _scheme_lines(result, scheme)
    if scheme == result.best.scheme:
        lines += [f"> {line}" for line in uncertainty_lines(result)]
    return lines


def _scheme_lines(result: SweepResult, scheme: str) -> list[str]:
    lines = []
    if is_posthoc(scheme):
        for candidate in result.candidates_of(scheme):
            lines.append(
                f"> post-hoc EMA from {candidate.n} EMA snapshots: ensemble={candidate.test:.3f}"
            )
        return lines
    if scheme == "greedy":
        for candidate in result.candidates_of(scheme):
            kept = ", ".join(str(index) for index in candidate.members)
            lines.append(f"> soup of {candidate.n} (members {kept}): ensemble={candidate.test:.3f}")
        return lines
    for candidate in result.candidates_of(scheme):
        single = result.single[candidate.n - 1].test
        lines.append(f"> {candidate.n}: single={single:.3f}, ensemble={candidate.test:.3f}")
    return lines


def is_posthoc(scheme: str) -> bool:
    """Whether a candidate's scheme is a post-hoc EMA (``posthoc:SIGMA_REL``)."""
    return scheme.startswith("posthoc:")


def sweep_table(result: SweepResult, *, uncertainty: bool = True) -> Table:
    """Every scheme side by side against n, beside each single member, on test data.

    Post-hoc EMA candidates do not average the n newest members: they share one last
    row, ``post-hoc``. The caption names the best and, with ``uncertainty``, ends
    with :func:`uncertainty_lines` (the CLI, which prints them with the classic
    lines, leaves them out).
    """
    schemes = result.schemes or list(dict.fromkeys(c.scheme for c in result.candidates))
    title = f"Test {result.metric} by number of newest members averaged"
    table = Table(title=title)
    table.add_column("n", justify="right")
    table.add_column("single", justify="right")
    for scheme in schemes:
        table.add_column(scheme, justify="right")
    by_key = {(c.scheme, c.n): c for c in result.candidates}
    for n, single in enumerate(result.single, start=1):
        cells = []
        for scheme in schemes:
            candidate = by_key.get((scheme, n))
            if candidate is None:
                cells.append("")
                continue
            text = _scores_text(candidate.test, candidate.recalibrated_test)
            if candidate == result.best:
                cells.append(f"[bold]{text}*[/bold]")
            else:
                cells.append(text)
        table.add_row(str(n), _scores_text(single.test, single.recalibrated_test), *cells)
    posthoc = {c.scheme: c for c in result.candidates if is_posthoc(c.scheme)}
    if posthoc:
        cells = []
        for scheme in schemes:
            candidate = posthoc.get(scheme)
            text = (
                ""
                if candidate is None
                else _scores_text(candidate.test, candidate.recalibrated_test)
            )
            cells.append(f"[bold]{text}*[/bold]" if candidate == result.best else text)
        table.add_row("post-hoc", "", *cells)
    best = result.best
    validation = (
        f", validation {result.best_validation:.4f}" if result.best_validation is not None else ""
    )
    variant = " after BatchNorm recalibration" if result.best_recalibrated else ""
    table.caption = (
        f"* best: {best.scheme}, n={best.n}{variant}: test {result.best_test:.4f}{validation} "
        f"(selected on {result.selected_on})"
    )
    if result.recalibrated:
        table.caption += "; cells: as averaged -> after BatchNorm recalibration"
    if uncertainty:
        table.caption += "\n" + "\n".join(uncertainty_lines(result))
    return table


def _scores_text(test: float, recalibrated: float | None) -> str:
    return f"{test:.4f}" if recalibrated is None else f"{test:.4f} -> {recalibrated:.4f}"


def write_json(result: SweepResult, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the report as JSON, atomically; an existing file only with ``overwrite``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"output {path}: the directory {path.parent} does not exist.")
    with atomic_output(path, overwrite=overwrite) as temporary:
        temporary.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def write_plot(result: SweepResult, path: str | Path, *, overwrite: bool = False) -> Path:
    """Plot test metric against n: single members as dots, one line per scheme (PNG).

    With BatchNorm recalibration each scheme also gets a dashed line of its
    recalibrated scores. The final model's test score is a horizontal reference
    line; the selected candidate carries the 95% interval of selected - final as an
    error bar, placed on the final model's score (final + low to final + high): a bar
    that crosses the reference line is a gain within noise.
    An existing file is replaced only with ``overwrite``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"output {path}: the directory {path.parent} does not exist.")
    matplotlib = require("matplotlib", "plot", "writing the sweep's plot")
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.2), dpi=110)
    n_values = list(range(1, len(result.single) + 1))
    axes.plot(
        n_values, [s.test for s in result.single], "o", color="0.35", label="single (n-th newest)"
    )
    for scheme in result.schemes or dict.fromkeys(c.scheme for c in result.candidates):
        candidates = result.candidates_of(scheme)
        if is_posthoc(scheme):
            for candidate in candidates:  # not a function of n: a level across the plot
                axes.axhline(
                    candidate.test, linestyle=":", linewidth=1.4, label=f"{scheme} (post-hoc EMA)"
                )
            continue
        marker = "s" if len(candidates) == 1 else None
        (line,) = axes.plot(
            [c.n for c in candidates],
            [c.test for c in candidates],
            marker=marker,
            linewidth=1.8,
            label=f"average, {scheme}",
        )
        if result.recalibrated:
            axes.plot(
                [c.n for c in candidates],
                [c.recalibrated_test for c in candidates],
                marker=marker,
                linestyle="--",
                linewidth=1.4,
                color=line.get_color(),
                label=f"average, {scheme}, BatchNorm recalibrated",
            )
    best = result.best
    final = result.single[0].test
    axes.axhline(final, color="0.2", linestyle="--", linewidth=1.0, label="final model (test)")
    against_final = result.comparisons()["final"]
    if against_final.low is not None:
        axes.errorbar(
            [min(best.n, len(result.single))],
            [result.best_test],
            yerr=[
                [max(0.0, result.best_test - (final + against_final.low))],
                [max(0.0, final + against_final.high - result.best_test)],
            ],
            fmt="none",
            ecolor="black",
            capsize=5,
            linewidth=1.4,
            label="95% interval of selected − final",
        )
    axes.plot(
        [min(best.n, len(result.single))],
        [result.best_test],
        "*",
        markersize=14,
        color="gold",
        markeredgecolor="black",
        label=f"selected on {result.selected_on}: {best.scheme}, n={best.n}"
        + (" (recalibrated)" if result.best_recalibrated else ""),
    )
    sentence = against_final.sentence
    axes.set_title(sentence[0].upper() + sentence[1:] + ".", fontsize=9)
    axes.set_xlabel("n newest members")
    axes.set_ylabel(f"test {result.metric}")
    axes.set_xticks(n_values if len(n_values) <= 20 else n_values[:: max(1, len(n_values) // 10)])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        with atomic_output(path, overwrite=overwrite) as temporary:
            figure.savefig(temporary, format="png")
    finally:  # also when the output was taken meanwhile: no figure left open
        pyplot.close(figure)
    return path
