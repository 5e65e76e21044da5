"""``polyak posthoc``: reconstruct power-function EMAs of any width after training.

Reads the EMA profiles a snapshot helper tracked (``DIR/posthoc/sigma-*/``) and writes
one file per requested width, ``OUT/posthoc-SIGMA_REL.SUFFIX``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from polyak.cli.output import console, print_json
from polyak.errors import OutputError
from polyak.files import check_outputs, is_directory_output
from polyak.formats import suffix_of
from polyak.posthoc import find_profile_snapshots, parse_widths, reconstruct_to
from polyak.weights.schemes import format_number


def posthoc_command(
    directory: Path = typer.Argument(
        ..., help="A snapshot directory whose helper tracked EMA profiles (posthoc/sigma-*/)."
    ),
    sigma_rel: str = typer.Option(
        ..., "--sigma-rel", help="Widths to reconstruct, e.g. 0.05,0.08,0.1,0.15."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output directory for posthoc-SIGMA_REL files (created)."
    ),
    suffix: str | None = typer.Option(
        None, "--suffix", help="Output format, e.g. .safetensors or .pt (default: the inputs')."
    ),
    time: float | None = typer.Option(
        None, "--time", help="Reconstruct at this step (default: the latest EMA snapshot's)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Reconstruct the EMA of each width from the tracked profiles, by least squares."""
    widths = parse_widths(sigma_rel)
    snapshots = find_profile_snapshots(directory)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out}: exists and is not a directory.")
    extension = suffix_of(snapshots[0].path.name) if suffix is None else "." + suffix.lstrip(".")
    targets = [out / f"posthoc-{format_number(width)}{extension}" for width in widths]
    if out.is_dir():  # every output checked before the first is written
        check_outputs(
            [(target, is_directory_output(target)) for target in targets],
            [snapshot.path for snapshot in snapshots],
            overwrite=overwrite,
        )
    out.mkdir(parents=True, exist_ok=True)
    results = [
        reconstruct_to(directory, width, target, time=time, overwrite=overwrite)
        for width, target in zip(widths, targets, strict=True)
    ]
    if as_json:
        print_json(
            [
                {
                    "sigma_rel": result.sigma_rel,
                    "time": result.time,
                    "output": str(result.output),
                    "snapshots": [
                        {"path": str(s.path), "step": s.step, "sigma_rel": s.sigma_rel}
                        for s in result.snapshots
                    ],
                    "coefficients": result.coefficients.tolist(),
                }
                for result in results
            ]
        )
        return
    profiles = sorted({s.sigma_rel for s in snapshots})
    table = Table(
        title=f"Post-hoc EMA from {len(snapshots)} snapshots of profiles "
        + ", ".join(format_number(p) for p in profiles)
    )
    for column in ("sigma_rel", "at step", "largest coefficient", "negative", "output"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for result in results:
        table.add_row(
            format_number(result.sigma_rel),
            format_number(result.time),
            f"{result.coefficients.max():.3f}",
            str(int((result.coefficients < 0).sum())),
            str(result.output),
        )
    console.print(table)
