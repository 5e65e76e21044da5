"""Reports of a sweep: classic lines, the table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from polyak.discovery import order_key
from polyak.errors import OutputError
from polyak.report import classic_lines, sweep_table, write_json, write_plot
from polyak.sweep import Candidate, SingleResult, SweepResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tutorial's table (SEED.md), n = 1..4: single, equal, linear.
SINGLE = [0.814, 0.814, 0.811, 0.805]
EQUAL = [0.814, 0.814, 0.813, 0.813]
LINEAR = [0.814, 0.815, 0.814, 0.813]


def weights(raw: list[float]) -> tuple[float, ...]:
    return tuple(float(w) for w in np.asarray(raw) / np.sum(raw))


def make_result(*, validation: bool = True) -> SweepResult:
    members = [order_key(Path(f"run/model_{step}.h5")) for step in (499, 498, 497, 496)]
    single = [
        SingleResult(member, test, 0.79 if validation else None)
        for member, test in zip(members, SINGLE, strict=True)
    ]
    candidates = []
    for n in range(1, 5):
        candidates.append(
            Candidate("equal", n, weights([1.0] * n), EQUAL[n - 1], 0.80 if validation else None)
        )
        candidates.append(
            Candidate(
                "linear",
                n,
                weights([n - i + 1 for i in range(1, n + 1)]),
                LINEAR[n - 1],
                (0.82 if n == 3 else 0.80) if validation else None,
            )
        )
    candidates.append(Candidate("custom:3,2,1", 3, weights([3, 2, 1]), 0.8125, None))
    best = next(c for c in candidates if (c.scheme, c.n) == ("linear", 3))
    return SweepResult(
        metric="accuracy",
        higher_is_better=True,
        selected_on="validation" if validation else "test",
        members=members,
        single=single,
        candidates=candidates,
        best=best,
        schemes=["equal", "linear", "custom:3,2,1"],
    )


def test_classic_lines_match_the_tutorial_format():
    result = make_result()
    assert classic_lines(result, "equal") == [
        "> 1: single=0.814, ensemble=0.814",
        "> 2: single=0.814, ensemble=0.814",
        "> 3: single=0.811, ensemble=0.813",
        "> 4: single=0.805, ensemble=0.813",
    ]
    assert classic_lines(result, "linear")[1] == "> 2: single=0.814, ensemble=0.815"


def test_classic_lines_round_to_three_decimals_and_pair_n_with_the_nth_single():
    # custom:3,2,1 has one candidate, n=3: beside the third newest member.
    assert classic_lines(make_result(), "custom:3,2,1") == ["> 3: single=0.811, ensemble=0.812"]
    assert classic_lines(make_result(), "exp:2") == []


def render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_sweep_table_has_a_column_per_scheme_and_marks_the_best():
    text = render(sweep_table(make_result()))
    flat = " ".join(text.split())  # the caption wraps at the table's width
    header = next(line for line in text.splitlines() if "single" in line)
    for column in ("n", "single", "equal", "linear", "custom:3,2,1"):
        assert column in header
    assert "Test accuracy by number of newest members averaged" in flat
    assert "0.8140*" in text  # linear n=3, the best
    assert text.count("*") == 2  # the marked cell and the caption's legend
    assert "* best: linear, n=3: test 0.8140, validation 0.8200 (selected on validation)" in flat
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    row_three = rows["3"]
    for cell in ("0.8110", "0.8130", "0.8140*", "0.8125"):
        assert cell in row_three


def test_sweep_table_says_when_the_choice_was_made_on_test():
    text = " ".join(render(sweep_table(make_result(validation=False))).split())
    assert "* best: linear, n=3: test 0.8140 (selected on test)" in text
    assert "validation" not in text


def test_write_json_round_trips_and_leaves_no_temporary(tmp_path):
    result = make_result()
    out = write_json(result, tmp_path / "report.json")
    assert out == tmp_path / "report.json"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with open(out, encoding="utf-8") as file:
        data = json.load(file)
    assert data == json.loads(json.dumps(result.to_json()))
    assert data["best"] == {
        "scheme": "linear",
        "n": 3,
        "metric": 0.814,
        "validation": 0.82,
        "recalibrated": False,
    }
    assert data["selected_on"] == "validation"
    assert [m["step"] for m in data["members"]] == [499, 498, 497, 496]


def test_write_json_failure_leaves_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    out.write_text("previous", encoding="utf-8")
    result = make_result()

    def broken():
        raise RuntimeError("disk full")

    monkeypatch.setattr(result, "to_json", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_json(result, out)
    assert out.read_text(encoding="utf-8") == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_plot_writes_a_real_png(tmp_path):
    from matplotlib import image

    out = write_plot(make_result(), tmp_path / "sweep.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    pixels = image.imread(out)
    assert pixels.ndim >= 2 and pixels.size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


@pytest.mark.parametrize("writer", [write_json, write_plot])
def test_missing_output_directory_is_refused(tmp_path, writer):
    out = tmp_path / "missing" / "out.file"
    with pytest.raises(OutputError, match=r"the directory .*missing does not exist"):
        writer(make_result(), out)
    assert not (tmp_path / "missing").exists()


def with_outcomes(result: SweepResult, examples: int = 1000) -> SweepResult:
    """The result with per-example outcomes whose means are the scores: selected 0.814
    (linear n=3), final 0.814 (first member), best single the first member too."""
    selected = np.zeros(examples, dtype=bool)
    selected[:814] = True
    final = np.zeros(examples, dtype=bool)
    final[:800] = True
    final[900:914] = True  # 814 right, 28 disagreements: 14 each way
    result.outcomes = {"selected": selected, "final": final, "best_single": final.copy()}
    return result


def test_every_report_carries_the_uncertainty_sentence():
    from polyak.report import uncertainty_lines

    result = with_outcomes(make_result())
    lines = uncertainty_lines(result)
    assert lines[0].startswith("selected − final: +0.0000 (95% interval ")
    assert "McNemar p = 1.000, 1000 test examples" in lines[0]
    assert lines[0].endswith(
        ": the difference from the final model is within noise on this test set."
    )
    assert lines[1].startswith("selected − best single: ")
    assert "the best single member (model_499.h5)" in lines[1]
    # The classic lines of the selected scheme end with them; others do not.
    assert classic_lines(result, "linear")[-2:] == [f"> {line}" for line in lines]
    assert all("selected" not in line for line in classic_lines(result, "equal"))
    flat = " ".join(render(sweep_table(result)).split())
    assert " ".join(lines[0].split()) in flat


def test_reports_without_outcomes_say_the_uncertainty_is_unknown(tmp_path):
    result = make_result()
    text = " ".join(render(sweep_table(result)).split())
    assert "the uncertainty of the difference from the final model is unknown" in text
    data = json.loads(write_json(result, tmp_path / "r.json").read_text())
    assert data["uncertainty"]["selected_minus_final"]["interval"] is None
    assert data["uncertainty"]["selected_minus_final"]["difference"] == pytest.approx(0.0)


def test_json_and_plot_carry_the_interval(tmp_path):
    result = with_outcomes(make_result())
    data = json.loads(write_json(result, tmp_path / "r.json").read_text())
    final = data["uncertainty"]["selected_minus_final"]
    assert final["p_value"] == 1.0 and final["examples"] == 1000 and final["resamples"] >= 2000
    assert final["interval"][0] < 0 < final["interval"][1]
    path = write_plot(result, tmp_path / "plot.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_has_the_final_models_line_and_the_interval_as_an_error_bar(tmp_path, monkeypatch):
    from matplotlib import pyplot

    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)  # keep the figure to look at
    result = with_outcomes(make_result())
    write_plot(result, tmp_path / "plot.png")
    (axes,) = figures[0].axes
    (reference,) = [line for line in axes.lines if line.get_label() == "final model (test)"]
    assert set(reference.get_ydata()) == {result.single[0].test}
    (bar,) = axes.containers
    comparison = result.comparisons()["final"]
    (segment,) = bar.lines[2][0].get_segments()
    low, high = sorted(point[1] for point in segment)
    final = result.single[0].test
    assert low == pytest.approx(final + comparison.low)
    assert high == pytest.approx(final + comparison.high)
    assert (
        axes.get_title() == "The difference from the final model is within noise on this test set."
    )
    pyplot.close(figures[0])
