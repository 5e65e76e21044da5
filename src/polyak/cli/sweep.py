"""``polyak sweep``: evaluate every member and every (scheme, n) average; pick the best."""

from __future__ import annotations

from pathlib import Path

import typer

from polyak.cli.main import app
from polyak.cli.output import console, error_console, print_json
from polyak.errors import OutputError


@app.command("sweep")
def sweep_command(
    paths: list[str] = typer.Argument(..., help="Checkpoint files, directories or globs."),
    data: Path = typer.Option(..., "--data", help="Test data: .npz with arrays x and y."),
    val: Path | None = typer.Option(
        None, "--val", help="Validation data (.npz x, y): choose the best on it, report on test."
    ),
    schemes: str = typer.Option(
        "equal,linear,exp:2", "--schemes", help="Schemes, e.g. equal,linear,exp:0.5,1,2,4,8."
    ),
    last: int | None = typer.Option(None, "--last", "-n", help="Sweep only the N newest."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Architecture for weights-only files: a .keras/.h5 file or module:function.",
    ),
    metric: str = typer.Option(
        "accuracy", "--metric", help="accuracy, loss, or module:function(y_true, y_pred)."
    ),
    minimize: bool = typer.Option(
        False, "--minimize", help="Lower metric values are better (automatic for loss)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the JSON report here."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write the PNG plot here."),
    out_model: Path | None = typer.Option(
        None, "--out-model", help="Write the best candidate's model here (its suffix: format)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    print_json_report: bool = typer.Option(
        False, "--print-json", help="Print the JSON report instead of tables."
    ),
) -> None:
    """Evaluate each member and the average of the n newest for every n and scheme,
    reading each checkpoint once; print the classic lines, a table and the best."""
    from polyak.keras.evaluation import load_dataset, sweep
    from polyak.report import classic_lines, sweep_table, write_json, write_plot
    from polyak.sweep import write_best

    outputs = [p for p in (json_path, plot_path, out_model) if p is not None]
    for output in outputs:
        if output.exists() and not overwrite:
            raise OutputError(f"output {output}: already exists. Pass --overwrite to replace it.")
    test = load_dataset(data)
    validation = load_dataset(val) if val is not None else None
    direction = False if minimize else None

    def progress(message: str) -> None:
        if error_console.is_terminal:
            error_console.print(f"[dim]{message}[/dim]", end="\r")

    result = sweep(
        paths,
        test,
        validation,
        schemes=schemes,
        last=last,
        model=model,
        metric=metric,
        higher_is_better=direction,
        progress=progress,
    )
    if out_model is not None:
        write_best(result, out_model, overwrite=True)
    if json_path is not None:
        write_json(result, json_path)
    if plot_path is not None:
        write_plot(result, plot_path)
    if print_json_report:
        print_json(result.to_json())
        return
    for scheme in result.schemes:
        console.print(f"[bold]{scheme}[/bold] (test {result.metric})")
        for line in classic_lines(result, scheme):
            console.print(line)
    console.print(sweep_table(result))
    if result.selected_on == "test":
        console.print(
            "Note: the best candidate was chosen on the test data itself (no --val given), "
            "so its test score is optimistic."
        )
    for label, path in (("report", json_path), ("plot", plot_path), ("model", out_model)):
        if path is not None:
            console.print(f"Wrote {label}: {path}")
