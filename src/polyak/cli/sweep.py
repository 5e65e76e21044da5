"""``polyak sweep``: evaluate every member and every (scheme, n) average; pick the best.

Keras checkpoints (``.keras``, legacy ``.h5``, ``.weights.h5``) are evaluated with
Keras; every other format with PyTorch, whose architecture ``--model`` gives.
"""

from __future__ import annotations

from pathlib import Path

import typer

from polyak.cli.output import console, error_console, print_json
from polyak.evaluation import SweepOptions, sweep_files
from polyak.posthoc import parse_widths
from polyak.report import classic_lines, sweep_table


def sweep_command(
    paths: list[str] = typer.Argument(..., help="Checkpoint files, directories or globs."),
    test_data: Path | None = typer.Option(
        None, "--data", help="Test data: .npz with arrays x and y (or use --eval)."
    ),
    validation_data: Path | None = typer.Option(
        None, "--val", help="Validation data (.npz x, y): choose the best on it, report on test."
    ),
    evaluate: str | None = typer.Option(
        None,
        "--eval",
        help="Instead of --data: module:function taking the model, returning a float "
        "(test) or a dict with test and validation.",
    ),
    schemes: str = typer.Option(
        "equal,linear,exp:2",
        "--schemes",
        help="Schemes, e.g. equal,linear,exp:0.5,1,2,4,8,greedy.",
    ),
    last: int | None = typer.Option(None, "--last", "-n", help="Sweep only the N newest."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="The architecture: module:function returning the model (PyTorch: an "
        "nn.Module); Keras also takes a .keras/.h5 file. Full Keras models need none.",
    ),
    metric: str = typer.Option(
        "accuracy", "--metric", help="accuracy, loss, or module:function(y_true, y_pred)."
    ),
    minimize: bool = typer.Option(
        False, "--minimize", help="Lower metric values are better (automatic for loss)."
    ),
    recalibrate: Path | None = typer.Option(
        None,
        "--recalibrate",
        help="Training data (.npz x): also score each candidate after recomputing its "
        "BatchNorm statistics on it; both numbers are reported.",
    ),
    posthoc: str | None = typer.Option(
        None,
        "--posthoc",
        help="Also evaluate post-hoc EMAs of these widths, e.g. 0.05,0.1, reconstructed "
        "from the EMA profiles the snapshot helper tracked (posthoc/sigma-*/).",
    ),
    posthoc_directory: Path | None = typer.Option(
        None, "--posthoc-dir", help="Where the EMA profiles are (default: beside the newest)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="PyTorch: cpu, cuda, cuda:1... (default: a GPU if there is one)."
    ),
    key: str | None = typer.Option(
        None, "--key", help="PyTorch checkpoint dicts: the key holding the weights."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Examples per forward pass."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the JSON report here."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write the PNG plot here."),
    out_model: str | None = typer.Option(
        None,
        "--out-model",
        help="Write the best candidate's model here: its suffix picks the format; a "
        "directory (DIR/) gets safetensors.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    print_json_report: bool = typer.Option(
        False, "--print-json", help="Print the JSON report instead of tables."
    ),
) -> None:
    """Evaluate each member and the average of the n newest for every n and scheme,
    reading each checkpoint once; print the classic lines, a table and the best, and
    whether its gain over the final model and the best single member is more than
    noise on the test set (95% bootstrap interval; McNemar's p for accuracy)."""

    def progress(message: str) -> None:
        if error_console.is_terminal:
            error_console.print(f"[dim]{message}[/dim]", end="\r")

    options = SweepOptions(
        paths,
        test_data=test_data,
        validation_data=validation_data,
        evaluate=evaluate,
        schemes=schemes,
        last=last,
        model=model,
        metric=metric,
        higher_is_better=False if minimize else None,
        recalibrate=recalibrate,
        posthoc=parse_widths(posthoc) if posthoc is not None else (),
        posthoc_directory=posthoc_directory,
        device=device,
        key=key,
        batch_size=batch_size,
        json_path=json_path,
        plot_path=plot_path,
        out_model=out_model,
        overwrite=overwrite,
    )
    result = sweep_files(options, progress)
    if print_json_report:
        print_json(result.to_json())
        return
    for scheme in result.schemes:
        console.print(f"[bold]{scheme}[/bold] (test {result.metric})")
        for line in classic_lines(result, scheme):
            console.print(line)
    console.print(sweep_table(result, uncertainty=False))  # in the classic lines above
    if result.selected_on == "test":
        console.print(
            "Note: the best candidate was chosen on the test data itself (no validation "
            "given), so its test score is optimistic."
        )
    for label, path in (("report", json_path), ("plot", plot_path), ("model", out_model)):
        if path is not None:
            console.print(f"Wrote {label}: {path}")
