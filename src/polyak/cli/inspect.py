"""``polyak inspect``: the checkpoints found, in the order used, and whether they average."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.table import Table

from polyak.cli.output import console, human_bytes, path_size, print_json
from polyak.discovery import find_checkpoints
from polyak.engine import check_compatible
from polyak.errors import IncompatibleCheckpointsError
from polyak.formats import open_checkpoint
from polyak.formats.base import is_floating


def inspect_command(
    paths: list[str] = typer.Argument(..., help="Checkpoint files, directories or globs."),
    last: int | None = typer.Option(None, "--last", "-n", help="Keep only the N newest."),
    key: str | None = typer.Option(
        None,
        "--key",
        help="PyTorch checkpoint dicts: the key holding the weights. DCP directories: the "
        "subtree to read.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List checkpoints newest first with format (and shard count), step or epoch, tensors,
    parameters, the bytes of their weights and of their files on disk, and say whether
    they can be averaged together (and which other weights a checkpoint dict holds)."""
    members = find_checkpoints(paths, last=last)
    readers = []
    rows = []
    with contextlib.ExitStack() as stack:  # every reader closed, whatever happens
        for member in members:
            reader = stack.enter_context(open_checkpoint(member.path, key=key))
            readers.append(reader)
            infos = [reader.info(name) for name in reader.names()]
            shard_files = getattr(reader, "shard_files", None)
            weight_entries = getattr(reader, "weight_entries", None)
            rows.append(
                {
                    "path": str(member.path),
                    "format": reader.format,
                    "step": member.step,
                    "epoch": member.epoch,
                    "step_is_known": member.step_is_known,
                    "position": member.position(),
                    "tensors": len(infos),
                    "floating_tensors": sum(is_floating(info.dtype) for info in infos),
                    "parameters": sum(info.size for info in infos),
                    "weight_bytes": sum(info.nbytes for info in infos),
                    "bytes": path_size(Path(member.path)),
                    "shards": None if shard_files is None else len(shard_files),
                    "key": getattr(reader, "key", None),
                    "weight_keys": weight_entries() if callable(weight_entries) else [],
                }
            )
            if reader.format == "dcp":
                rows[-1]["dcp"] = {
                    "selection": reader.selection,
                    "world_size": reader.world_size(),
                    "subtrees": reader.subtrees(),
                }
        try:
            check_compatible(readers)
            compatible, reason = True, None
        except IncompatibleCheckpointsError as error:
            compatible, reason = False, str(error)
    if as_json:
        print_json({"checkpoints": rows, "compatible": compatible, "reason": reason})
        return
    table = Table(title="Checkpoints, newest first")
    columns = ("#", "checkpoint", "format", "step / epoch", "tensors", "parameters", "weights")
    for column in (*columns, "on disk"):
        table.add_column(column, justify="left" if column in {"checkpoint", "format"} else "right")
    for number, row in enumerate(rows, start=1):
        table.add_row(
            str(number),
            row["path"],
            row["format"] if row["shards"] is None else f"{row['format']} ({row['shards']})",
            row["position"],
            f"{row['tensors']} ({row['floating_tensors']} float)",
            f"{row['parameters']:,}",
            human_bytes(row["weight_bytes"]),
            human_bytes(row["bytes"]),
        )
    console.print(table)
    others = sorted({entry for row in rows for entry in row["weight_keys"]} - {rows[0]["key"]})
    if rows[0]["key"] is not None:
        also = ""
        if others:
            listed = ", ".join(f"'{entry}'" for entry in others)
            also = f"; they also hold {listed} (read one with --key {others[0]})"
        console.print(f"Weights read from the entry '{rows[0]['key']}'{also}.")
    if any(row["bytes"] > row["weight_bytes"] * 1.5 for row in rows):
        console.print(
            "On disk counts every file of a checkpoint (optimizer state, training state); "
            "weights counts the tensors averaged."
        )
    for number, row in enumerate(rows, start=1):
        if "dcp" in row:
            dcp = row["dcp"]
            subtrees = ", ".join(
                f"{name} ({counts['tensors']} tensors, {human_bytes(counts['bytes'])}"
                + (f", {counts['byte_entries']} other entries)" if counts["byte_entries"] else ")")
                for name, counts in dcp["subtrees"].items()
            )
            console.print(
                f"#{number}: DCP saved by {dcp['world_size']} rank(s); holds {subtrees}; "
                f"reads {dcp['selection']}."
            )
    if compatible:
        console.print(f"These {len(rows)} checkpoint(s) can be averaged together.")
    else:
        console.print(f"Cannot be averaged together: {reason}")
