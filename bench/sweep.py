"""Benchmark: the classic experiment's sweep, the tutorial's loop against ``polyak``'s sweep.

What it measures
    Wall-clock seconds (``time.perf_counter``) of the sweep of the classic experiment
    (SEED.md): 10 snapshots of the classic model, three schemes (equal, linear, exp:2),
    every n = 1..10 average evaluated for test accuracy on the 1000 test points, and
    every single member evaluated too. Contenders, timed side by side in one run:

    - ``classic loop``: the tutorial's code, written faithfully: load the 10 legacy
      ``model_49x.h5`` files with ``keras.models.load_model`` (inside the timing), then
      for each scheme and each n, the tutorial's weights, for each layer index
      ``numpy.average([m.get_weights()[i] for m in members[:n]], weights=...)``,
      ``clone_model``, ``set_weights``, ``compile``, ``evaluate``; each single member
      evaluated with ``evaluate``. To be conservative it loads the members and
      evaluates the singles once for all three schemes (the tutorial runs one script
      per scheme and evaluates the singles inside its n loop), so its time is a
      lower bound of the tutorial's.
    - ``polyak sweep (.h5)`` and ``polyak sweep (.keras)``:
      ``polyak.keras.evaluation.sweep(directory, (x_test, y_test), schemes=...)`` on
      the same 10 epochs, saved as legacy ``.h5`` and as ``.keras`` snapshots by
      ``SnapshotCheckpoint``; it loads the model from the newest checkpoint itself.

    Scaling: polyak's sweep over the newest N = 10, 20, 40 ``.weights.h5`` snapshots
    of the same run (4 N evaluations: N singles and 3 N averages), in seconds per
    member, with a least-squares line ``seconds = fixed + per_member * N``.

How
    One training run, exactly as ``polyak.demo`` trains (its data, model, seed 1,
    500 epochs), with three callbacks: ``SnapshotCheckpoint(keep=10, format="keras")``,
    ``SnapshotCheckpoint(keep=40)`` (``.weights.h5``) and a small callback that saves
    ``model_490.h5`` ... ``model_499.h5`` with ``model.save`` as the tutorial does;
    all into a temporary directory. Each contender runs once as a warm-up (excluded,
    and used for the checks), then ``--repeats`` times, interleaved and in a rotating
    order so that they share the machine's noise; ``keras.backend.clear_session()``
    and ``gc.collect()`` run before each timing, outside it. The table reports the
    min and the median, and the ratio of mins to ``polyak sweep (.h5)`` (same files
    as the classic loop).

Checks (exit status 1 on failure)
    - polyak gives bit-identical accuracies on the .h5 and the .keras snapshots.
    - The classic loop and polyak (on .h5 and on .keras) agree on the test accuracy of
      every (scheme, n) and every single member. Keras' ``evaluate`` reports accuracy
      as a float32 mean (0.813 comes back as 0.8130000233...), so accuracies are
      compared as counts of correct test points, which must be equal.
    - In an extra, untimed run with ``polyak.engine.open_checkpoint`` wrapped to
      count, each checkpoint is opened exactly once and each of its tensors read
      exactly once (10 .h5, 10 .keras, 40 .weights.h5 members).

Usage:
    .venv/bin/python bench/sweep.py [--repeats 5] [--out bench/out]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from polyak.keras_backend import choose_keras_backend

choose_keras_backend()  # torch without TensorFlow, before Keras is imported

import keras  # noqa: E402

import polyak.engine  # noqa: E402
from polyak.demo import classic_data, classic_model  # noqa: E402
from polyak.keras import SnapshotCheckpoint  # noqa: E402
from polyak.keras.evaluation import sweep as polyak_sweep  # noqa: E402

SCHEMES = ("equal", "linear", "exp:2")
SCHEME_SPEC = ",".join(SCHEMES)
EPOCHS = 500
SEED = 1  # polyak.demo's default
MEMBERS = 10
SCALING_SIZES = (10, 20, 40)
ALPHA = 2.0  # the tutorial's decay rate for exp


class LegacyH5Copies(keras.callbacks.Callback):
    """Save ``model_{epoch}.h5`` with ``model.save`` after each of the last ``keep`` epochs.

    The tutorial's snapshots: full-model legacy HDF5, epochs 490..499 of 500.
    """

    def __init__(self, directory: Path, epochs: int, keep: int) -> None:
        super().__init__()
        self.directory = directory
        self.epochs = epochs
        self.keep = keep

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch >= self.epochs - self.keep:
            self.model.save(str(self.directory / f"model_{epoch}.h5"))


def make_snapshots(root: Path) -> tuple[dict[str, Path], float]:
    """Train the classic model once, as ``polyak.demo`` does, saving all three snapshot sets.

    Returns:
        The directories (``h5``, ``keras``, ``weights``) and the final train accuracy.
    """
    directories = {
        "h5": root / "h5",
        "keras": root / "keras",
        "weights": root / "weights40",
    }
    for directory in directories.values():
        directory.mkdir(parents=True)
    data = classic_data()
    keras.utils.set_random_seed(SEED)
    model = classic_model()
    x_train, y_train = data["train"]
    history = model.fit(
        x_train,
        y_train,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[
            SnapshotCheckpoint(directories["keras"], keep=MEMBERS, format="keras"),
            SnapshotCheckpoint(directories["weights"], keep=max(SCALING_SIZES)),
            LegacyH5Copies(directories["h5"], EPOCHS, MEMBERS),
        ],
    )
    return directories, float(history.history["accuracy"][-1])


# -- the tutorial's code ------------------------------------------------------------------


def tutorial_weights(scheme: str, n: int) -> list[float]:
    """The tutorial's weights for n members, newest first (numpy.average normalizes them)."""
    if scheme == "equal":
        return [1.0 / n for _ in range(1, n + 1)]
    if scheme == "linear":
        return [i / n for i in range(n, 0, -1)]
    if scheme == "exp:2":
        return [np.exp(-i / ALPHA) for i in range(1, n + 1)]
    raise ValueError(f"unknown scheme {scheme!r}")


def model_weight_ensemble(members: list, weights: list[float]):
    """The tutorial's function: per layer index, get_weights() of every member, averaged."""
    n_layers = len(members[0].get_weights())
    avg_model_weights = []
    for layer in range(n_layers):
        layer_weights = np.array([model.get_weights()[layer] for model in members])
        avg_model_weights.append(np.average(layer_weights, axis=0, weights=weights))
    model = keras.models.clone_model(members[0])
    model.set_weights(avg_model_weights)
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def classic_sweep(h5_files: list[Path], x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """Load the members, evaluate each, and every (scheme, n) average, the tutorial's way."""
    members = [keras.models.load_model(str(path)) for path in h5_files]  # oldest first
    members = list(reversed(members))  # newest first, as the tutorial orders them
    single = []
    for member in members:
        _, accuracy = member.evaluate(x_test, y_test, verbose=0)
        single.append(float(accuracy))
    averages = {}
    for scheme in SCHEMES:
        for n in range(1, len(members) + 1):
            model = model_weight_ensemble(members[:n], tutorial_weights(scheme, n))
            _, accuracy = model.evaluate(x_test, y_test, verbose=0)
            averages[scheme, n] = float(accuracy)
    return {"single": single, "averages": averages}


def polyak_results(result) -> dict:
    """A polyak SweepResult in the shape of ``classic_sweep``'s."""
    return {
        "single": [s.test for s in result.single],
        "averages": {(c.scheme, c.n): c.test for c in result.candidates},
    }


# -- checks -------------------------------------------------------------------------------


def compare(name: str, reference: dict, other: dict, examples: int) -> list[str]:
    """Mismatches between two sweeps' accuracies, compared as counts of correct examples."""

    def count(accuracy: float) -> int:
        return round(accuracy * examples)

    problems = []
    if len(reference["single"]) != len(other["single"]):
        problems.append(f"{name}: {len(other['single'])} single members, expected {MEMBERS}")
    for i, (a, b) in enumerate(zip(reference["single"], other["single"], strict=False), 1):
        if count(a) != count(b):
            problems.append(f"{name}: single member {i} (newest first): {a!r} vs {b!r}")
    if set(reference["averages"]) != set(other["averages"]):
        problems.append(f"{name}: candidates differ: {sorted(other['averages'])}")
    for key in sorted(reference["averages"]):
        a, b = reference["averages"][key], other["averages"].get(key, float("nan"))
        if not np.isfinite(b) or count(a) != count(b):
            problems.append(f"{name}: {key[0]} n={key[1]}: classic {a!r} vs polyak {b!r}")
    return problems


def largest_difference(reference: dict, other: dict) -> float:
    values = [abs(a - b) for a, b in zip(reference["single"], other["single"], strict=True)]
    values += [abs(v - other["averages"][k]) for k, v in reference["averages"].items()]
    return max(values)


class ReadCounter:
    """Counts opens per checkpoint and reads per (checkpoint, tensor) inside polyak.

    Wraps ``polyak.engine.open_checkpoint``, through which ``open_members`` opens
    every member of a sweep, and the ``read`` method of each reader it returns.
    """

    def __init__(self) -> None:
        self.opens: Counter[str] = Counter()
        self.reads: Counter[tuple[str, str]] = Counter()
        self.names: dict[str, list[str]] = {}
        self._original = polyak.engine.open_checkpoint

    def __enter__(self) -> ReadCounter:
        original = self._original

        def counting_open(path, **options):
            reader = original(path, **options)
            key = str(path)
            self.opens[key] += 1
            self.names[key] = reader.names()
            read = reader.read

            def counting_read(name: str) -> np.ndarray:
                self.reads[key, name] += 1
                return read(name)

            reader.read = counting_read
            return reader

        polyak.engine.open_checkpoint = counting_open
        return self

    def __exit__(self, *exc_info: object) -> None:
        polyak.engine.open_checkpoint = self._original

    def problems(self, label: str, expected_files: int) -> list[str]:
        found = []
        if len(self.opens) != expected_files:
            found.append(
                f"{label}: {len(self.opens)} checkpoints opened; expected {expected_files}"
            )
        for path, opened in self.opens.items():
            if opened != 1:
                found.append(f"{label}: {path} opened {opened} times")
            for name in self.names[path]:
                if self.reads[path, name] != 1:
                    found.append(f"{label}: {path} tensor {name} read {self.reads[path, name]}x")
        unknown = [key for key in self.reads if key[0] not in self.opens]
        if unknown:
            found.append(f"{label}: reads of unopened checkpoints {unknown[:3]}")
        return found


# -- timing -------------------------------------------------------------------------------


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call, with Keras' global state cleared beforehand (untimed)."""
    keras.backend.clear_session()
    gc.collect()
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def time_side_by_side(
    contenders: dict[str, Callable[[], object]], repeats: int, log: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Warm up each contender once (its result kept), then time them interleaved."""
    names = list(contenders)
    results = {}
    for name in names:
        seconds, results[name] = timed(contenders[name])
        log(f"  warm-up  {name}: {seconds:.3f} s")
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, _ = timed(contenders[name])
            times[name].append(seconds)
            log(f"  repeat {repeat + 1}  {name}: {seconds:.3f} s")
    return times, results


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    import torch

    return (
        f"Python {platform.python_version()}, keras {keras.__version__} "
        f"({keras.backend.backend()} backend), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}"
    )


def quiet_keras() -> None:
    # model.save("x.h5") and load_model warn on every call; the benchmark knows.
    warnings.filterwarnings("ignore")
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="where sweep.md goes")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; received {args.repeats}.")
    quiet_keras()

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    log(environment())
    data = classic_data()
    x_test, y_test = data["test"]
    examples = len(x_test)
    problems: list[str] = []

    with tempfile.TemporaryDirectory(prefix="polyak-bench-sweep-") as temporary:
        root = Path(temporary)
        log(f"Training the classic model for {EPOCHS} epochs (seed {SEED}) into {root} ...")
        train_start = time.perf_counter()
        directories, train_accuracy = make_snapshots(root)
        log(
            f"  {time.perf_counter() - train_start:.1f} s, final train accuracy "
            f"{train_accuracy:.3f}"
        )
        h5_files = sorted(directories["h5"].glob("model_*.h5"))
        if [p.name for p in h5_files] != [f"model_{e}.h5" for e in range(490, 500)]:
            raise SystemExit(f"unexpected legacy snapshots: {[p.name for p in h5_files]}")

        # -- 1. the classic loop against polyak, side by side ------------------------------
        contenders = {
            "classic loop (.h5)": lambda: classic_sweep(h5_files, x_test, y_test),
            "polyak sweep (.h5)": lambda: polyak_sweep(
                directories["h5"], (x_test, y_test), schemes=SCHEME_SPEC
            ),
            "polyak sweep (.keras)": lambda: polyak_sweep(
                directories["keras"], (x_test, y_test), schemes=SCHEME_SPEC
            ),
        }
        log(f"Sweep of {MEMBERS} members x {len(SCHEMES)} schemes, {args.repeats} repeats:")
        times, results = time_side_by_side(contenders, args.repeats, log)
        classic = results["classic loop (.h5)"]
        differences = {}
        for name in ("polyak sweep (.h5)", "polyak sweep (.keras)"):
            converted = polyak_results(results[name])
            problems += compare(name, classic, converted, examples)
            differences[name] = largest_difference(classic, converted)
        # Both polyak runs compute in float64 from the same float32 weights: identical.
        if polyak_results(results["polyak sweep (.h5)"]) != polyak_results(
            results["polyak sweep (.keras)"]
        ):
            problems.append("polyak sweep: .h5 and .keras snapshots give different accuracies")

        # -- 2. scaling in N, and each checkpoint read once ---------------------------------
        contenders = {
            f"N={n}": (
                lambda n=n: polyak_sweep(
                    directories["weights"],
                    (x_test, y_test),
                    schemes=SCHEME_SPEC,
                    last=n,
                    model=classic_model,
                )
            )
            for n in SCALING_SIZES
        }
        log(f"Scaling: polyak's sweep over N = {SCALING_SIZES} .weights.h5 members:")
        scaling_times, scaling_results = time_side_by_side(contenders, args.repeats, log)
        for n in SCALING_SIZES:
            result = scaling_results[f"N={n}"]
            if len(result.single) != n or len(result.candidates) != len(SCHEMES) * n:
                problems.append(f"scaling N={n}: {len(result.candidates)} candidates")

        read_checks = [
            ("polyak sweep (.h5)", directories["h5"], {}, MEMBERS),
            ("polyak sweep (.keras)", directories["keras"], {}, MEMBERS),
            (
                f"N={max(SCALING_SIZES)} .weights.h5",
                directories["weights"],
                {"model": classic_model},
                max(SCALING_SIZES),
            ),
        ]
        read_lines = []
        for label, directory, options, expected in read_checks:
            with ReadCounter() as counter:
                polyak_sweep(directory, (x_test, y_test), schemes=SCHEME_SPEC, **options)
            found = counter.problems(label, expected)
            problems += found
            tensors = sum(counter.reads.values())
            read_lines.append(
                f"- {label}: {len(counter.opens)} checkpoints opened "
                f"{sorted(set(counter.opens.values()))} time(s) each, {tensors} tensor reads "
                f"for {sum(len(v) for v in counter.names.values())} tensors: "
                + ("each read once" if not found else "FAILED")
            )

    # -- tables -------------------------------------------------------------------------
    reference = min(times["polyak sweep (.h5)"])
    rows = [
        [
            name,
            f"{min(values):.3f}",
            f"{statistics.median(values):.3f}",
            f"{min(values) / reference:.1f}x",
        ]
        for name, values in times.items()
    ]
    sweep_table = markdown_table(["contender", "min s", "median s", "ratio to polyak .h5"], rows)

    sizes = np.array(SCALING_SIZES, dtype=float)
    mins = np.array([min(scaling_times[f"N={n}"]) for n in SCALING_SIZES])
    per_member, fixed = np.polyfit(sizes, mins, 1)
    fitted = fixed + per_member * sizes
    rows = [
        [
            str(n),
            str(4 * n),
            f"{min(scaling_times[f'N={n}']):.3f}",
            f"{statistics.median(scaling_times[f'N={n}']):.3f}",
            f"{min(scaling_times[f'N={n}']) / n:.4f}",
            f"{fit:.3f}",
        ]
        for n, fit in zip(SCALING_SIZES, fitted, strict=True)
    ]
    scaling_table = markdown_table(
        ["N", "evaluations", "min s", "median s", "min s per member", "line fit s"], rows
    )
    residual = float(np.max(np.abs(mins - fitted) / mins))

    single = polyak_results(results["polyak sweep (.keras)"])
    rows = [
        [str(n), f"{single['single'][n - 1]:.3f}"]
        + [f"{single['averages'][scheme, n]:.3f}" for scheme in SCHEMES]
        for n in range(1, MEMBERS + 1)
    ]
    accuracy_table = markdown_table(["n", "single", *SCHEMES], rows)

    report = "\n".join(
        [
            "# Sweep benchmark (bench/sweep.py)",
            "",
            f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
            f"Machine: {environment()}",
            "",
            f"## Sweep: {MEMBERS} members x {len(SCHEMES)} schemes ({SCHEME_SPEC}), "
            f"{examples} test points, {args.repeats} repeats after a warm-up",
            "",
            sweep_table,
            "",
            "Test accuracies agree (as counts of correct points) between the classic loop "
            "and polyak for every (scheme, n) and every single member: "
            + ("yes" if not problems else "NO, see below")
            + "; largest float difference: "
            + ", ".join(f"{k} {v:.2g}" for k, v in differences.items())
            + " (Keras' evaluate reports a float32 mean).",
            "",
            f"## Scaling: polyak's sweep over the newest N .weights.h5 members "
            f"({args.repeats} repeats)",
            "",
            scaling_table,
            "",
            f"Least-squares line: {fixed:.3f} s fixed + {per_member:.4f} s per member "
            f"(largest deviation of a min from the line: {residual:.1%}).",
            "",
            "Checkpoint reads (untimed run with polyak.engine.open_checkpoint wrapped):",
            "",
            *read_lines,
            "",
            "## Test accuracy (polyak, .keras snapshots, newest first)",
            "",
            accuracy_table,
            "",
            f"Total run time: {time.perf_counter() - started:.0f} s.",
        ]
    )
    if problems:
        report += "\n\n## Problems\n\n" + "\n".join(f"- {p}" for p in problems)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(report + "\n")
    print(f"\nWritten to {args.out / 'sweep.md'}.")
    if problems:
        print(f"{len(problems)} problem(s); see above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
