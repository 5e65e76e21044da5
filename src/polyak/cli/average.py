"""``polyak average``: average checkpoints into one file of the same (or a chosen) format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from polyak.averaging import INTEGER_POLICIES, average_to
from polyak.cli.main import app
from polyak.cli.output import DelayedProgress, console, human_bytes, print_json
from polyak.discovery import Checkpoint
from polyak.errors import SchemeError


@app.command("average")
def average_command(
    paths: list[str] = typer.Argument(..., help="Checkpoint files, directories or globs."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output file; its suffix chooses the format."
    ),
    scheme: str = typer.Option(
        "equal",
        "--scheme",
        "-s",
        help="Weights, newest first: equal, linear, exp:ALPHA or custom:W1,W2,...",
    ),
    last: int | None = typer.Option(None, "--last", "-n", help="Average only the N newest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    integers: str = typer.Option(
        "newest",
        "--integers",
        help="Integer/bool tensors: 'newest' takes the newest member's; "
        "'require-equal' also refuses any difference.",
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Average NaN/Inf values instead of refusing them."
    ),
    key: str | None = typer.Option(
        None, "--key", help="PyTorch checkpoint dicts: the key holding the weights."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Average checkpoints into OUT, streaming tensor by tensor, written atomically."""
    if integers not in INTEGER_POLICIES:
        raise SchemeError(
            f"--integers must be one of {', '.join(INTEGER_POLICIES)}; received {integers!r}."
        )
    progress = DelayedProgress("averaging")

    def on_start(members: list[Checkpoint], weights: np.ndarray, total: int) -> None:
        if not as_json:
            table = Table(title=f"Averaging {len(members)} checkpoint(s), scheme {scheme}")
            for column in ("#", "checkpoint", "step", "weight"):
                table.add_column(column, justify="left" if column == "checkpoint" else "right")
            for number, (member, weight) in enumerate(zip(members, weights, strict=True), 1):
                step = "-" if member.step is None else str(member.step)
                table.add_row(str(number), str(member.path), step, f"{weight:.4f}")
            console.print(table)
        progress.start(total)

    with progress:
        result = average_to(
            paths,
            out,
            scheme=scheme,
            last=last,
            overwrite=overwrite,
            integers=integers,
            allow_nonfinite=allow_nonfinite,
            key=key,
            progress=progress.advance,
            on_start=on_start,
        )
    if as_json:
        print_json(
            {
                "output": str(result.output),
                "format": result.format,
                "scheme": result.scheme,
                "members": [
                    {"path": str(m.path), "step": m.step, "weight": float(w)}
                    for m, w in zip(result.members, result.weights, strict=True)
                ],
                "tensors": result.tensors,
                "averaged": result.averaged,
                "parameters": result.parameters,
            }
        )
        return
    size = human_bytes(result.output.stat().st_size) if result.output else "-"
    console.print(
        f"Wrote {result.output} ({result.format}, {size}): {result.averaged} of "
        f"{result.tensors} tensors averaged, {result.tensors - result.averaged} carried over "
        "from the newest member."
    )
