"""``polyak demo``: the classic experiment end to end, with an honest choice."""

from __future__ import annotations

from pathlib import Path

import typer

from polyak.cli.output import console
from polyak.demo import SCHEMES, run_demo
from polyak.errors import DataError
from polyak.report import classic_lines, sweep_table


def demo_command(
    out: Path = typer.Option(
        Path("polyak-demo"), "--out", help="Directory for snapshots, report, plot and model."
    ),
    epochs: int = typer.Option(500, "--epochs", help="Training epochs (classic: 500)."),
    seed: int = typer.Option(1, "--seed", help="Keras random seed."),
) -> None:
    """Train the classic blobs model with Keras, snapshot its last 10 epochs, sweep
    equal, linear and exp:2 averages, choose on validation data, report on test."""
    if epochs < 10:
        raise DataError(f"--epochs must be at least 10 (the demo keeps the last 10); got {epochs}.")
    result = run_demo(out, epochs=epochs, seed=seed, log=lambda line: console.print(line))
    sweep = result.sweep
    for scheme in SCHEMES.split(","):
        console.print(
            f"\n[bold]{scheme}[/bold]: test accuracy, n-th newest single vs average of n newest"
        )
        for line in classic_lines(sweep, scheme):
            console.print(line)
    console.print()
    console.print(sweep_table(sweep, uncertainty=False))  # in the classic lines above
    best, final = sweep.best, sweep.single[0]
    console.print(
        f"Recommended (chosen on validation): {best.scheme} over the {best.n} newest snapshots, "
        f"validation {sweep.best_validation:.3f}, test {sweep.best_test:.3f}; "
        f"the final model alone: validation {final.validation:.3f}, test {final.test:.3f}."
    )
    console.print(
        f"Wrote {result.report}, {result.plot} and {result.model} "
        f"(snapshots in {result.snapshots}) in {result.seconds:.0f} s."
    )
