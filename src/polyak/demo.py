"""The classic experiment, end to end: ``polyak demo``.

As in the tutorial polyak started from (see SEED.md): scikit-learn's
``make_blobs(n_samples=1100, centers=3, n_features=2, cluster_std=2, random_state=2)``,
the first 100 points to train on and the other 1000 to test on; a Dense(25, relu) ->
Dense(3, softmax) network trained with SGD (learning rate 0.01, momentum 0.9) on
categorical cross-entropy for 500 epochs at Keras' default batch size (32).
Snapshots of the last 10 epochs are taken by :class:`polyak.keras.SnapshotCheckpoint`.

Unlike the tutorial, the number of members and the scheme are chosen on a separate
validation set of 1000 points drawn from the same three blobs (same centers, another
random state) that the model never trains on; the test set only reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.errors import require
from polyak.keras_backend import choose_keras_backend
from polyak.report import write_json, write_plot
from polyak.sweep import write_best

__all__ = ["DemoResult", "classic_data", "run_demo"]

SCHEMES = "equal,linear,exp:2"


@dataclass
class DemoResult:
    """What the demo produced."""

    sweep: object
    snapshots: Path
    report: Path
    plot: Path
    model: Path
    train_accuracy: float
    seconds: float


def classic_data(validation_seed: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The classic blobs: train (100), test (1000), and validation (1000, same centers)."""
    datasets = require("sklearn.datasets", "demo", "the demo's data (scikit-learn)")
    x, y, centers = datasets.make_blobs(
        n_samples=1100,
        centers=3,
        n_features=2,
        cluster_std=2,
        random_state=2,
        return_centers=True,
    )
    x_val, y_val = datasets.make_blobs(
        n_samples=1000, centers=centers, n_features=2, cluster_std=2, random_state=validation_seed
    )
    one_hot = np.eye(3, dtype=np.float32)
    return {
        "train": (x[:100].astype(np.float32), one_hot[y[:100]]),
        "test": (x[100:].astype(np.float32), one_hot[y[100:]]),
        "validation": (x_val.astype(np.float32), one_hot[y_val]),
    }


def classic_model():
    """Input 2 -> Dense(25, relu) -> Dense(3, softmax), SGD(0.01, momentum 0.9)."""
    choose_keras_backend()
    import keras

    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def run_demo(
    out: str | Path = "polyak-demo",
    *,
    epochs: int = 500,
    keep: int = 10,
    seed: int = 1,
    overwrite: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train the classic model, snapshot its last epochs, sweep, and write the results.

    Args:
        out: directory for snapshots, report, plot and the best model.
        epochs: training epochs (500 in the classic experiment).
        keep: snapshots of the last ``keep`` epochs (10 in the classic experiment).
        seed: Keras' random seed for the initial weights and shuffling.
        overwrite: replace the results of an earlier run in ``out``.
        log: where progress messages go.
    """
    choose_keras_backend()
    import keras

    from polyak.keras import SnapshotCheckpoint
    from polyak.keras.evaluation import sweep

    started = time.perf_counter()
    out = Path(out)
    snapshots = out / "snapshots"
    if snapshots.exists() and overwrite:
        for old in snapshots.iterdir():
            if old.is_file():
                old.unlink()
    snapshots.mkdir(parents=True, exist_ok=True)
    data = classic_data()
    keras.utils.set_random_seed(seed)
    model = classic_model()
    log(
        f"Training the classic model for {epochs} epochs on 100 points (Keras, "
        f"{keras.backend.backend()} backend); snapshots of the last {keep} epochs..."
    )
    x_train, y_train = data["train"]
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        verbose=0,
        callbacks=[SnapshotCheckpoint(snapshots, keep=keep, format="keras")],
    )
    train_accuracy = float(history.history["accuracy"][-1])
    log(f"Final train accuracy {train_accuracy:.3f}. Sweeping n = 1..{keep} for {SCHEMES}...")
    result = sweep(snapshots, data["test"], data["validation"], schemes=SCHEMES, model=model)
    report = write_json(result, out / "report.json", overwrite=overwrite)
    plot = write_plot(result, out / "sweep.png", overwrite=overwrite)
    best_model = out / "best.keras"
    write_best(result, best_model, overwrite=overwrite)
    return DemoResult(
        sweep=result,
        snapshots=snapshots,
        report=report,
        plot=plot,
        model=best_model,
        train_accuracy=train_accuracy,
        seconds=time.perf_counter() - started,
    )
