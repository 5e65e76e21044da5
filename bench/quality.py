"""The evidence study: over many runs and two tasks, does averaging beat the final model?

What it measures
    For each task and each training seed (default 10): train, keep snapshots of the
    last ``K`` epochs with polyak's ``SnapshotCheckpoint``, then run polyak's sweep
    (``polyak.keras.sweep``) over them with the schemes ``equal, linear,
    exp:0.5,1,2,4,8, greedy`` (every n = 1..K of each, and the greedy soup). The
    average is chosen on validation data (``result.best``); the test data only
    reports. Compared on test accuracy:

    - the final model: the newest snapshot, i.e. the weights training ended with;
    - the selected average (scheme and n chosen on validation; n = 1 is the final
      model itself, so the selection may decline to average);
    - for context, the best single snapshot by validation accuracy.

    Reported per task: every seed's numbers, the mean and sample standard deviation
    (ddof 1) of final and selected, the mean difference with its standard error,
    wins/ties/losses (a tie is an equal number of correct test examples) with an
    exact two-sided sign test over the non-tied seeds, how often each scheme and n
    was chosen, the steadiness within a run (the standard deviation of the test
    accuracy over the K single snapshots, and over n = 1..K for each scheme's
    averages), and each scheme at n = K without any selection.

Tasks
    - ``blobs``: SEED.md's classic experiment, exactly: ``make_blobs(n_samples=1100,
      centers=3, n_features=2, cluster_std=2, random_state=2)``, the first 100
      points train and the other 1000 test; validation: 1000 points from the same
      centers with another random state (``polyak.demo.classic_data``); Dense(25,
      relu) -> Dense(3, softmax), SGD(0.01, momentum 0.9), categorical
      cross-entropy, batch 32, 500 epochs (``polyak.demo.classic_model``). K = 20.
    - ``digits``: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits,
      shipped with scikit-learn), pixels scaled to [0, 1], one fixed stratified
      split (``random_state=0``): 60% train (1078), 20% validation (359), 20% test
      (360). Dense(64, relu) -> Dense(10, softmax) with an L2 penalty of 1e-3 on
      both kernels, SGD(0.1, momentum 0.9), sparse categorical cross-entropy,
      batch 32, 100 epochs. K = 20. Without the penalty, every learning rate that
      does not diverge (0.1 to 0.3) fits the training set exactly within a few
      dozen epochs and the weights then stop moving (the last epochs' test accuracies
      are identical); with it, at 0.1, the last epochs bounce by about a point.

    The data are fixed; a seed (``keras.utils.set_random_seed``) sets the initial
    weights and the shuffling. Torch runs on one thread per process
    (``OMP_NUM_THREADS=1`` unless set), so a seed's result does not depend on
    ``--workers``. Snapshot directories live in a temporary directory, deleted at
    the end.

Checks (exit status 1 on failure)
    - The sweep selected on validation and evaluated K singles and 7 K + 1 candidates.
    - The newest snapshot's test and validation accuracy equal those of the trained
      model, computed directly after ``fit`` (before the sweep reuses the model).
    - The selected average, recomputed independently (each member loaded with
      Keras' ``model.load_weights``, weighted with the candidate's weights in float64
      numpy, ``set_weights``), has the test accuracy the sweep reported (as counts of
      correct examples).
    - The last K epochs bounce: in every run, the single snapshots' test accuracies
      are not all equal (a warning, not a failure, since it is a fact about training).

Output
    The per-seed results as JSON (``bench/out/quality.json``; every seed's numbers, the
    sweep's own selected - final interval and McNemar p, the machine: CPU model,
    thread counts, library versions), the report as Markdown
    (``bench/out/quality.md``), and the plot of the per-seed differences. A full run
    (not ``--quick``, not ``--no-readme``) also writes the JSON to
    ``bench/results/quality.json`` (committed: a rerun can be diffed against it), the
    plot to ``docs/quality.png`` and
    replaces the block between ``<!-- quality:begin ... -->`` and
    ``<!-- quality:end -->`` in README.md with the report, in one step at the end;
    otherwise the plot goes to ``bench/out/quality.png`` and README.md is untouched.
    ``--from-json bench/out/quality.json`` rebuilds report, plot and README block from a
    run's raw results without training again (for working on the report); the numbers,
    run time and command are that run's.

Usage:
    .venv/bin/python bench/quality.py [--seeds 10] [--tasks blobs,digits] [--workers 1]
        [--quick] [--no-readme]
    .venv/bin/python bench/quality.py --from-json bench/out/quality.json [--no-readme]
"""

# ruff: noqa: E402 (the clock starts, and torch's thread count is set, before the imports)
from __future__ import annotations

import os
import time

STARTED = time.perf_counter()  # the run time reported includes importing torch and Keras

# One torch thread: these models are tiny, and more threads only add overhead (and
# make results depend on scheduling). Must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One Keras backend for the study, whatever else is installed: the numbers depend on it
# (another backend runs other kernels, which round differently). KERAS_BACKEND overrides.
os.environ.setdefault("KERAS_BACKEND", "torch")

import argparse
import concurrent.futures
import json
import logging
import math
import multiprocessing
import platform
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.keras_backend import choose_keras_backend

choose_keras_backend()  # torch without TensorFlow, before Keras is imported

import keras

from machine import cpu_model, machine_description
from polyak.demo import classic_data, classic_model
from polyak.keras import SnapshotCheckpoint
from polyak.keras.evaluation import sweep as polyak_sweep
from readme_block import README, has_readme_block, replace_readme_block

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "quality.png"
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results" / "quality.json"  # the full run behind the README block
SCHEMES = "equal,linear,exp:0.5,1,2,4,8,greedy"
SCHEME_NAMES = ("equal", "linear", "exp:0.5", "exp:1", "exp:2", "exp:4", "exp:8", "greedy")


# -- tasks --------------------------------------------------------------------------------


def digits_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits in [0, 1], split 60/20/20 (stratified, random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=0
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0
    )
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


def digits_model():
    """64 -> Dense(64, relu) -> Dense(10, softmax), L2 1e-3 on the kernels, SGD(0.1, 0.9)."""
    penalty = keras.regularizers.L2(1e-3)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", kernel_regularizer=penalty),
            keras.layers.Dense(10, activation="softmax", kernel_regularizer=penalty),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@dataclass(frozen=True)
class Task:
    """One task of the study: data, model, and how long to train."""

    name: str
    title: str
    description: str
    data: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]
    model: Callable[[], object]
    epochs: int
    keep: int
    quick_epochs: int
    quick_keep: int
    batch_size: int = 32


TASKS = {
    "blobs": Task(
        name="blobs",
        title="Blobs (SEED.md's classic task)",
        description=(
            "`make_blobs(1100, centers=3, cluster_std=2, random_state=2)`: 100 points train, "
            "1000 test, 1000 validation from the same centers (`polyak.demo.classic_data`); "
            "Dense(25, relu) -> Dense(3, softmax), SGD(0.01, momentum 0.9), batch 32, "
            "{epochs} epochs, snapshots of the last {keep}"
        ),
        data=classic_data,
        model=classic_model,
        epochs=500,
        keep=20,
        quick_epochs=100,
        quick_keep=5,
    ),
    "digits": Task(
        name="digits",
        title="Digits (scikit-learn's 8x8 handwritten digits)",
        description=(
            "`load_digits` scaled to [0, 1], stratified split (random_state=0): 1078 train, "
            "359 validation, 360 test; Dense(64, relu) -> Dense(10, softmax) with L2 1e-3 "
            "on the kernels, SGD(0.1, momentum 0.9), batch 32, {epochs} epochs, snapshots "
            "of the last {keep}"
        ),
        data=digits_data,
        model=digits_model,
        epochs=100,
        keep=20,
        quick_epochs=20,
        quick_keep=5,
    ),
}


# -- one run ------------------------------------------------------------------------------


def labels_of(y: np.ndarray) -> np.ndarray:
    return y.argmax(-1) if y.ndim > 1 else y


def correct(model, x: np.ndarray, y: np.ndarray) -> int:
    """Correct predictions of ``model`` as it is now, computed here, not by polyak."""
    predictions = keras.ops.convert_to_numpy(model(x, training=False))
    return int(np.sum(np.asarray(predictions).argmax(-1) == labels_of(y)))


def recompute_average(model, paths: list[Path], weights: tuple[float, ...]) -> None:
    """Put the weighted average of the snapshots ``paths`` (newest first) into ``model``.

    Independent of polyak's averaging: each member is loaded by Keras itself.
    """
    total = None
    for path, weight in zip(paths, weights, strict=True):
        if weight == 0:
            continue
        model.load_weights(str(path))
        arrays = [np.asarray(array, dtype=np.float64) for array in model.get_weights()]
        if total is None:
            total = [weight * array for array in arrays]
        else:
            total = [t + weight * array for t, array in zip(total, arrays, strict=True)]
    norm = float(sum(weights))
    model.set_weights([(t / norm).astype(np.float32) for t in total])


def run_seed(task_name: str, seed: int, quick: bool, root: str) -> dict:
    """Train one seed of one task, sweep its snapshots, and check the numbers."""
    quiet_keras()
    task = TASKS[task_name]
    epochs, keep = (task.quick_epochs, task.quick_keep) if quick else (task.epochs, task.keep)
    data = task.data()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        data["train"],
        data["validation"],
        data["test"],
    )
    directory = Path(root) / f"{task_name}-seed{seed}"
    problems: list[str] = []
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = task.model()
    checkpoint = SnapshotCheckpoint(directory, keep=keep)
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=task.batch_size,
        verbose=0,
        callbacks=[checkpoint],
    )
    train_seconds = time.perf_counter() - started
    final_correct = (correct(model, x_test, y_test), correct(model, x_val, y_val))

    started = time.perf_counter()
    result = polyak_sweep(directory, (x_test, y_test), (x_val, y_val), schemes=SCHEMES, model=model)
    sweep_seconds = time.perf_counter() - started
    n_test, n_val = len(y_test), len(y_val)
    label = f"{task_name} seed {seed}"

    if result.selected_on != "validation":
        problems.append(f"{label}: selected on {result.selected_on}, not validation")
    if len(result.single) != keep or len(result.candidates) != 7 * keep + 1:
        problems.append(
            f"{label}: {len(result.single)} singles and {len(result.candidates)} candidates; "
            f"expected {keep} and {7 * keep + 1}"
        )
    # Checkpoint.epoch comes from an "epoch" in the file name; the manifest knows it.
    epochs_of = {snapshot.path.name: snapshot.epoch for snapshot in checkpoint.saved}
    member_names = [member.path.name for member in result.members]
    if member_names != [snapshot.path.name for snapshot in reversed(checkpoint.saved)]:
        problems.append(f"{label}: the sweep's members {member_names} are not the snapshots saved")
    final = result.single[0]
    if (round(final.test * n_test), round(final.validation * n_val)) != final_correct:
        problems.append(
            f"{label}: newest snapshot scores {final.test}/{final.validation}, the trained "
            f"model {final_correct[0]}/{n_test} and {final_correct[1]}/{n_val}"
        )
    best = result.best
    paths = [member.path for member in result.members]
    recompute_average(model, paths[: len(best.weights)], best.weights)
    recomputed = correct(model, x_test, y_test)
    if recomputed != round(result.best_test * n_test):
        problems.append(
            f"{label}: selected {best.scheme} n={best.n} tests {result.best_test} in the "
            f"sweep, {recomputed}/{n_test} recomputed with Keras' load_weights"
        )

    single_test = [s.test for s in result.single]
    single_val = [s.validation for s in result.single]
    best_single = max(range(keep), key=lambda i: (single_val[i], -i))  # ties: newest
    warnings_found = []
    if len(set(single_test)) == 1:
        warnings_found.append(f"{label}: all {keep} snapshots score {single_test[0]} on test")
    against_final = result.comparisons()["final"]
    candidates = {scheme: [] for scheme in SCHEME_NAMES}
    for candidate in result.candidates:
        candidates[candidate.scheme].append(
            {"n": candidate.n, "test": candidate.test, "validation": candidate.validation}
        )
    return {
        "task": task_name,
        "seed": seed,
        "epochs": epochs,
        "keep": keep,
        "test_examples": n_test,
        "validation_examples": n_val,
        "train_accuracy": float(history.history["accuracy"][-1]),
        "train_seconds": train_seconds,
        "sweep_seconds": sweep_seconds,
        "final": {"test": final.test, "validation": final.validation},
        "selected": {
            "scheme": best.scheme,
            "n": best.n,
            "members": list(best.members),
            "test": result.best_test,
            "validation": result.best_validation,
        },
        "best_single": {
            "index": best_single,
            "epoch": epochs_of.get(result.members[best_single].path.name),
            "test": single_test[best_single],
            "validation": single_val[best_single],
        },
        "single": {"test": single_test, "validation": single_val},
        "candidates": candidates,
        # The sweep's own report: selected - final on this seed's test set.
        "uncertainty": against_final.to_json(),
        "problems": problems,
        "warnings": warnings_found,
    }


# -- statistics ---------------------------------------------------------------------------


def sample_std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value over the non-tied pairs."""
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1)) / 2**m
    return min(1.0, 2 * tail)


def summarize(runs: list[dict]) -> dict:
    """The per-task numbers the report states."""
    n_test = runs[0]["test_examples"]
    final = [r["final"]["test"] for r in runs]
    selected = [r["selected"]["test"] for r in runs]
    best_single = [r["best_single"]["test"] for r in runs]
    counts = [
        round(r["selected"]["test"] * n_test) - round(r["final"]["test"] * n_test) for r in runs
    ]
    differences = [s - f for s, f in zip(selected, final, strict=True)]
    wins, ties, losses = (
        sum(c > 0 for c in counts),
        sum(c == 0 for c in counts),
        sum(c < 0 for c in counts),
    )
    # The selected average against the best single snapshot chosen on the same validation
    # data: what averaging adds beyond choosing an epoch.
    over_single = [
        round(r["selected"]["test"] * n_test) - round(r["best_single"]["test"] * n_test)
        for r in runs
    ]
    spread = {"single": statistics.mean(sample_std(r["single"]["test"]) for r in runs)}
    fixed = {}
    for scheme in SCHEME_NAMES:
        if scheme != "greedy":
            spread[scheme] = statistics.mean(
                sample_std([c["test"] for c in r["candidates"][scheme]]) for r in runs
            )
        # Without selection: every scheme over all K snapshots (greedy: its one soup).
        values = [r["candidates"][scheme][-1]["test"] for r in runs]
        value_counts = [
            round(v * n_test) - round(f * n_test) for v, f in zip(values, final, strict=True)
        ]
        fixed[scheme] = {
            "mean": statistics.mean(values),
            "std": sample_std(values),
            "mean_difference": statistics.mean(v - f for v, f in zip(values, final, strict=True)),
            "wins": sum(c > 0 for c in value_counts),
            "ties": sum(c == 0 for c in value_counts),
            "losses": sum(c < 0 for c in value_counts),
        }
    return {
        "seeds": len(runs),
        "final_mean": statistics.mean(final),
        "final_std": sample_std(final),
        "selected_mean": statistics.mean(selected),
        "selected_std": sample_std(selected),
        "best_single_mean": statistics.mean(best_single),
        "best_single_std": sample_std(best_single),
        "mean_difference": statistics.mean(differences),
        "difference_se": sample_std(differences) / math.sqrt(len(runs)),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "sign_test_p": sign_test(wins, losses),
        "over_best_single_mean": statistics.mean(
            s - b for s, b in zip(selected, best_single, strict=True)
        ),
        "over_best_single_se": sample_std(
            [s - b for s, b in zip(selected, best_single, strict=True)]
        )
        / math.sqrt(len(runs)),
        "over_best_single": [
            sum(c > 0 for c in over_single),
            sum(c == 0 for c in over_single),
            sum(c < 0 for c in over_single),
        ],
        "single_member": sum(len(r["selected"]["members"]) == 1 for r in runs),
        "schemes_selected": dict(Counter(r["selected"]["scheme"] for r in runs).most_common()),
        "n_selected": [r["selected"]["n"] for r in runs],
        "declined": sum(r["selected"]["members"] == [0] for r in runs),
        "within_run_std": spread,
        "fixed_rules": fixed,
    }


# -- report -------------------------------------------------------------------------------


def points(value: float) -> str:
    """An accuracy difference in percentage points, signed."""
    return f"{100 * value:+.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def selected_label(selected: dict, keep: int) -> str:
    if selected["scheme"] == "greedy":
        return f"greedy ({selected['n']} of {keep})"
    return f"{selected['scheme']}, n={selected['n']}"


def short_label(selected: dict, keep: int) -> str:
    if selected["scheme"] == "greedy":
        return f"greedy\n{selected['n']}/{keep}"
    return f"{selected['scheme']}\nn={selected['n']}"


def p_value_text(run: dict) -> str:
    """The sweep's McNemar p-value of selected - final on this seed's test set."""
    uncertainty = run.get("uncertainty")
    if uncertainty is None or uncertainty["p_value"] is None:
        return "–"
    return f"{uncertainty['p_value']:.3f}"


def seed_table(runs: list[dict]) -> str:
    n_test = runs[0]["test_examples"]
    rows = []
    for r in runs:
        count = round(r["selected"]["test"] * n_test) - round(r["final"]["test"] * n_test)
        rows.append(
            [
                str(r["seed"]),
                f"{r['final']['validation']:.4f}",
                f"{r['final']['test']:.4f}",
                selected_label(r["selected"], r["keep"]),
                f"{r['selected']['validation']:.4f}",
                f"{r['selected']['test']:.4f}",
                f"{points(r['selected']['test'] - r['final']['test'])} ({count:+d})",
                p_value_text(r),
                f"{r['best_single']['test']:.4f} (epoch {r['best_single']['epoch']})",
            ]
        )
    return markdown_table(
        [
            "seed",
            "final: val",
            "final: test",
            "selected on val",
            "selected: val",
            "selected: test",
            "selected − final, points (examples)",
            "McNemar p",
            "best single by val: test",
        ],
        rows,
    )


def beyond_noise_line(runs: list[dict]) -> list[str]:
    """How many seeds' own sweep reports called selected - final larger than noise."""
    known = [r["uncertainty"] for r in runs if r.get("uncertainty", {}).get("p_value") is not None]
    if not known:
        return []
    beyond = sum(1 for u in known if not u["within_noise"])
    return [
        f"- Each seed's own sweep report (McNemar's exact test on that seed's "
        f"{runs[0]['test_examples']} test examples, p < 0.05) called selected − final larger "
        f"than noise in {beyond} of {len(known)} seeds."
    ]


def summary_lines(summary: dict, runs: list[dict]) -> list[str]:
    schemes = ", ".join(f"{name} ×{count}" for name, count in summary["schemes_selected"].items())
    ns = summary["n_selected"]
    return [
        f"- Test accuracy over {summary['seeds']} seeds, mean ± standard deviation: final "
        f"model {summary['final_mean']:.4f} ± {summary['final_std']:.4f}; selected average "
        f"{summary['selected_mean']:.4f} ± {summary['selected_std']:.4f}; best single "
        f"snapshot by validation {summary['best_single_mean']:.4f} ± "
        f"{summary['best_single_std']:.4f}.",
        f"- Selected − final: {points(summary['mean_difference'])} ± "
        f"{100 * summary['difference_se']:.2f} points (mean ± standard error); "
        f"wins/ties/losses {summary['wins']}/{summary['ties']}/{summary['losses']} "
        f"(sign test over the {summary['wins'] + summary['losses']} non-tied seeds: "
        f"p = {summary['sign_test_p']:.2f}).",
        *beyond_noise_line(runs),
        f"- Chosen on validation: {schemes}; n from {min(ns)} to {max(ns)} (median "
        f"{statistics.median(ns):g}). In {summary['single_member']} of {summary['seeds']} "
        "seeds the choice was one snapshot, not an average (n = 1, or a greedy soup that "
        f"kept one member); in {summary['declined']} of them the final model itself.",
        f"- Selected average − best single snapshot by validation: "
        f"{points(summary['over_best_single_mean'])} points; wins/ties/losses "
        + "/".join(str(v) for v in summary["over_best_single"])
        + ".",
    ]


def steadiness_table(summaries: dict[str, dict], keeps: dict[str, int]) -> str:
    columns = ["single", *[s for s in SCHEME_NAMES if s != "greedy"]]
    rows = [
        [f"{name} (K={keeps[name]})"]
        + [f"{100 * summary['within_run_std'][c]:.2f}" for c in columns]
        for name, summary in summaries.items()
    ]
    return markdown_table(["task", "single snapshots", *columns[1:]], rows)


def fixed_table(summaries: dict[str, dict]) -> str:
    rows = []
    for name, summary in summaries.items():
        for scheme in SCHEME_NAMES:
            item = summary["fixed_rules"][scheme]
            rows.append(
                [
                    name,
                    scheme,
                    f"{item['mean']:.4f} ± {item['std']:.4f}",
                    points(item["mean_difference"]),
                    f"{item['wins']}/{item['ties']}/{item['losses']}",
                ]
            )
    return markdown_table(
        ["task", "scheme (all K)", "test, mean ± sd", "− final, points", "wins/ties/losses"],
        rows,
    )


def reading(name: str, summary: dict, keep: int) -> str:
    """A factual sentence or two about one task, derived from its numbers."""
    mean, se = summary["mean_difference"], summary["difference_se"]
    w, t, lo = summary["wins"], summary["ties"], summary["losses"]
    seeds = summary["seeds"]
    text = (
        f"**{name}**: the average chosen on validation beat the final model on test in {w} of "
        f"{seeds} seeds, tied in {t} and lost in {lo}, by {points(mean)} points on average "
        f"(standard error {100 * se:.2f}). "
    )
    p = summary["sign_test_p"]
    ratio = abs(mean) / se if se > 0 else math.inf if mean else 0.0
    if mean == 0 and se == 0:
        text += "No difference at all. "
    elif ratio < 2 or p > 0.05:
        direction = "gain" if mean > 0 else "loss" if mean < 0 else "difference"
        text += (
            f"The mean {direction} is {ratio:.1f} standard errors and the sign test gives "
            f"p = {p:.2f}: not conclusive at {seeds} seeds. "
        )
    elif mean > 0:
        text += (
            f"The gain is {ratio:.1f} standard errors and the sign test gives p = {p:.2f}: "
            "a consistent improvement on this task. "
        )
    else:
        text += (
            f"The loss is {ratio:.1f} standard errors and the sign test gives p = {p:.2f}: "
            "the selected average is consistently worse on this task. "
        )
    over, over_se = summary["over_best_single_mean"], summary["over_best_single_se"]
    over_ratio = over / over_se if over_se > 0 else 0.0
    text += (
        f"The best single snapshot chosen on the same validation data scores "
        f"{summary['best_single_mean']:.4f} on average; the selected average adds "
        f"{points(over)} points to that ({over_ratio:.1f} standard errors"
    )
    if summary["single_member"]:
        text += f"; in {summary['single_member']} seeds the choice was itself one snapshot"
    text += "). "
    if over_ratio < 2:
        text += (
            "So the gain over the final model is largely that of choosing a snapshot on "
            "validation, not of averaging. "
        )
    equal = summary["fixed_rules"]["equal"]
    text += (
        f"Without any selection, the equal average of all {keep} snapshots gives "
        f"{points(equal['mean_difference'])} points over the final model (wins/ties/losses "
        f"{equal['wins']}/{equal['ties']}/{equal['losses']}). "
    )
    selected_std, final_std = summary["selected_std"], summary["final_std"]
    compared = (
        "less" if selected_std < final_std else "more" if selected_std > final_std else "as much"
    )
    text += (
        f"Across seeds the selected average's test accuracy varies {compared} than the final "
        f"model's (standard deviation {selected_std:.4f} vs {final_std:.4f}). "
    )
    spread = summary["within_run_std"]
    averaged = min(value for key, value in spread.items() if key != "single")
    text += (
        f"Within a run, the single snapshots of the last epochs differ by "
        f"{100 * spread['single']:.2f} points (standard deviation), the averages over n by "
        f"{100 * averaged:.2f} to {100 * max(v for k, v in spread.items() if k != 'single'):.2f}."
    )
    return text


def write_plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(results), 1, figsize=(8, 3.2 * len(results)), squeeze=False, constrained_layout=True
    )
    for axis, (name, runs) in zip(axes[:, 0], results.items(), strict=True):
        seeds = [r["seed"] for r in runs]
        selected = [100 * (r["selected"]["test"] - r["final"]["test"]) for r in runs]
        single = [100 * (r["best_single"]["test"] - r["final"]["test"]) for r in runs]
        colors = ["tab:green" if d > 1e-9 else "tab:red" if d < -1e-9 else "grey" for d in selected]
        axis.bar(seeds, selected, color=colors, width=0.6, label="selected average − final")
        axis.scatter(
            seeds,
            single,
            facecolors="none",
            edgecolors="black",
            zorder=3,
            label="best single by validation − final",
        )
        ties = [seed for seed, value in zip(seeds, selected, strict=True) if abs(value) < 1e-9]
        if ties:
            axis.scatter(
                ties, [0] * len(ties), marker="D", s=30, color="grey", zorder=4, label="tie"
            )
        axis.axhline(0, color="black", linewidth=0.8)
        mean = float(np.mean(selected))
        axis.axhline(mean, color="tab:blue", linestyle="--", linewidth=1, label="mean difference")
        summary = summarize(runs)
        axis.set_title(
            f"{name}: test accuracy, selected on validation, minus final model "
            f"(W/T/L {summary['wins']}/{summary['ties']}/{summary['losses']})",
            fontsize=9,
        )
        axis.set_xticks(
            seeds,
            [f"{r['seed']}\n{short_label(r['selected'], r['keep'])}" for r in runs],
            fontsize=7,
        )
        axis.set_xlabel("training seed, and the scheme and n chosen on validation")
        axis.set_ylabel("percentage points")
        low = min(0.0, *selected, *single)
        high = max(0.0, *selected, *single)
        margin = 0.25 * (high - low) + 0.1
        axis.set_ylim(low - margin, high + margin)
        axis.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def environment(workers: int) -> str:
    import torch

    return (
        f"{cpu_model()}, Python {platform.python_version()}, keras {keras.__version__} "
        f"({keras.backend.backend()} backend), torch {torch.__version__} "
        f"({torch.get_num_threads()} thread per process, {workers} worker process"
        f"{'es' if workers > 1 else ''}), numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}"
    )


def build_report(
    results: dict[str, list[dict]],
    command: str,
    machine: str,
    seconds: float,
    plot: str,
) -> str:
    summaries = {name: summarize(runs) for name, runs in results.items()}
    keeps = {name: runs[0]["keep"] for name, runs in results.items()}
    seeds = len(next(iter(results.values())))
    lines = [
        f"Command: `{command}` (bench/quality.py). Machine: {machine}. "
        f"Total run time: {seconds:.0f} s.",
        "",
        f"For each task and each of {seeds} training seeds: train, keep the last K epochs "
        "with `SnapshotCheckpoint`, sweep them with `polyak.keras.sweep` (schemes "
        f"`{SCHEMES}`, every n = 1..K), choose scheme and n on validation data "
        "(`result.best`), and report test accuracy against the final model (the newest "
        "snapshot). n = 1 is the final model itself, so the choice may decline to average, and "
        "a greedy soup may keep one, earlier, snapshot. "
        "A tie is an equal number of correct test examples. Seeds change the initial "
        "weights and the shuffling; the data and splits are fixed. All seeds are shown.",
        "",
    ]
    for name, runs in results.items():
        task = TASKS[name]
        lines += [
            f"### {task.title}",
            "",
            task.description.format(epochs=runs[0]["epochs"], keep=runs[0]["keep"]) + ".",
            "",
            seed_table(runs),
            "",
            *summary_lines(summaries[name], runs),
            "",
        ]
    lines += [
        "### Steadiness within a run",
        "",
        "Standard deviation of test accuracy, in points, over the K single snapshots of the "
        "last epochs and over each scheme's averages for n = 1..K; mean over seeds. A scheme "
        "that puts almost all weight on the newest snapshots (exp:0.5) hardly changes with n, "
        "so its small spread says little about quality:",
        "",
        steadiness_table(summaries, keeps),
        "",
        "### Without selection: each scheme over all K snapshots",
        "",
        "For comparison, fixed rules that need no validation data: every scheme averaging "
        "all K snapshots (greedy: its soup, which does use validation), against the final "
        "model:",
        "",
        fixed_table(summaries),
        "",
        f"![Per-seed test accuracy difference, selected average minus final model]({plot})",
        "",
        "### Reading",
        "",
        *[reading(name, summary, keeps[name]) + "\n" for name, summary in summaries.items()],
        f"These are small models on small datasets; with {seeds} seeds, a mean difference "
        "smaller than about two standard errors cannot be told apart from chance.",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def quiet_keras() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default 10)")
    parser.add_argument("--tasks", default="blobs,digits", help="comma-separated: blobs,digits")
    parser.add_argument("--workers", type=int, default=1, help="processes running seeds")
    parser.add_argument(
        "--quick", action="store_true", help="a small run for development (implies --no-readme)"
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite README.md or docs/quality.png"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="no training: rebuild the report, plot (and README block) from a run's JSON",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        write_readme = not (payload["quick"] or args.no_readme)
        if write_readme and not has_readme_block("quality"):
            parser.error("README.md has no quality block to rewrite; use --no-readme.")
        print(f"Report of the run in {args.from_json} ({payload['command']}); no training.")
        # The raw runs as they were; the summary recomputed by this version of the script.
        payload["summary"] = {name: summarize(runs) for name, runs in payload["runs"].items()}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "quality.json").write_text(json.dumps(payload, indent=1) + "\n")
        return publish(payload, write_readme, [OUT / "quality.json"])
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in tasks if name not in TASKS]
    if unknown or not tasks:
        parser.error(f"--tasks: known tasks are {', '.join(TASKS)}; received {args.tasks!r}.")
    if seeds < 2:
        parser.error(f"--seeds must be >= 2 (standard deviations); received {seeds}.")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; received {args.workers}.")
    write_readme = not (args.quick or args.no_readme)
    if write_readme and not has_readme_block("quality"):
        parser.error("README.md has no quality block to rewrite; use --no-readme.")
    quiet_keras()

    def log(message: str) -> None:
        print(message, flush=True)

    machine = environment(args.workers)
    log(machine)
    jobs = [(name, seed) for name in tasks for seed in range(1, seeds + 1)]
    log(f"{len(jobs)} runs ({', '.join(tasks)} x seeds 1..{seeds}), {args.workers} worker(s)")
    runs: dict[tuple[str, int], dict] = {}

    def report_run(run: dict) -> None:
        runs[run["task"], run["seed"]] = run
        difference = points(run["selected"]["test"] - run["final"]["test"])
        log(
            f"  {run['task']:6} seed {run['seed']:2}: train {run['train_seconds']:5.1f} s, "
            f"sweep {run['sweep_seconds']:4.1f} s; final test {run['final']['test']:.4f}, "
            f"selected {selected_label(run['selected'], run['keep'])} test "
            f"{run['selected']['test']:.4f} ({difference})"
            f"; singles' test spread {min(run['single']['test']):.4f}.."
            f"{max(run['single']['test']):.4f}"
        )

    with tempfile.TemporaryDirectory(prefix="polyak-quality-") as root:
        if args.workers == 1:
            for name, seed in jobs:
                report_run(run_seed(name, seed, args.quick, root))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
                futures = [pool.submit(run_seed, n, s, args.quick, root) for n, s in jobs]
                for future in concurrent.futures.as_completed(futures):
                    report_run(future.result())

    results = {name: [runs[name, seed] for seed in range(1, seeds + 1)] for name in tasks}
    seconds = time.perf_counter() - STARTED
    default = (
        not args.quick and args.seeds in (None, 10) and tasks == list(TASKS) and args.workers == 1
    )
    command = "make quality" if default else " ".join(["python", "bench/quality.py", *sys.argv[1:]])
    payload = {
        "command": command,
        "machine": machine,
        "machine_details": machine_description(),
        "seconds": seconds,
        "schemes": SCHEMES,
        "quick": args.quick,
        "summary": {name: summarize(task_runs) for name, task_runs in results.items()},
        "runs": results,
        "problems": [p for task_runs in results.values() for r in task_runs for p in r["problems"]],
        "warnings": [w for task_runs in results.values() for r in task_runs for w in r["warnings"]],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    written = [OUT / "quality.json"]
    if write_readme:  # the README block's raw results, committed beside it
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(payload, indent=1) + "\n")
        written.append(RESULTS)
    return publish(payload, write_readme, written)


def publish(payload: dict, write_readme: bool, written: list[Path]) -> int:
    """Write the report and the plot of a run's results, and the README block if asked."""
    results, problems = payload["runs"], payload["problems"]
    plot = PLOT if write_readme else OUT / "quality.png"
    write_plot(results, plot)
    report = build_report(
        results,
        payload["command"],
        payload["machine"],
        payload["seconds"],
        plot.relative_to(ROOT).as_posix(),
    )
    if problems:
        report += "\n\n**Problems found by the checks:**\n\n" + "\n".join(
            f"- {p}" for p in problems
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.md").write_text(report + "\n")
    print()
    print(report)
    print()
    for warning in payload["warnings"]:
        print(f"warning: {warning}")
    written = [*written, OUT / "quality.md", plot]
    if write_readme:
        replace_readme_block("quality", report, "## Does it help?")
        written.append(README)
    print(f"Wrote {', '.join(str(p.relative_to(ROOT)) for p in written)}.")
    print(f"Total run time: {payload['seconds']:.0f} s ({payload['seconds'] / 60:.1f} min).")
    if problems:
        print(f"{len(problems)} problem(s); see above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
