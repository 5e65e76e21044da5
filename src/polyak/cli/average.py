"""``polyak average``: average checkpoints into one file of the same (or a chosen) format.

Or into a safetensors checkpoint directory (``-o averaged/``), sharded like the inputs or
at ``--max-shard-size``.
"""

from __future__ import annotations

import numpy as np
import typer
from rich.table import Table

from polyak.averaging import INTEGER_POLICIES, average_to
from polyak.cli.output import (
    DelayedProgress,
    console,
    flags_of,
    human_bytes,
    in_flags,
    path_size,
    print_json,
    print_note,
)
from polyak.discovery import Checkpoint
from polyak.errors import SchemeError

# What to do with an averaged Lightning checkpoint (the README says it too).
LIGHTNING_ADVICE = (
    "The averaged .ckpt holds the weights, hyper-parameters and Lightning's entries but no "
    "optimizer or scheduler state: load it with YourModule.load_from_checkpoint(path) (or "
    "trainer.validate/test(model, ckpt_path=path)) and start a new fit from that model; "
    "Trainer.fit(ckpt_path=path) cannot resume from it."
)


def average_command(
    paths: list[str] = typer.Argument(..., help="Checkpoint files, directories or globs."),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output file; its suffix chooses the format. A directory (DIR/ or a name "
        "without a suffix) gets a safetensors checkpoint: shards and "
        "model.safetensors.index.json, or one model.safetensors.",
    ),
    scheme: str = typer.Option(
        "equal",
        "--scheme",
        "-s",
        help="Weights, newest first: equal, linear, exp:ALPHA, power:SIGMA_REL, "
        "wsm:linear|1-sqrt|cosine or custom:W1,W2,...",
    ),
    last: int | None = typer.Option(None, "--last", "-n", help="Average only the N newest."),
    window_steps: float | None = typer.Option(
        None,
        "--window-steps",
        metavar="STEPS",
        help="Average only the checkpoints at most STEPS steps older than the newest.",
    ),
    window_tokens: float | None = typer.Option(
        None,
        "--window-tokens",
        metavar="TOKENS",
        help="The same window in tokens (needs --tokens-per-step), e.g. 2e9.",
    ),
    tokens_per_step: float | None = typer.Option(
        None,
        "--tokens-per-step",
        metavar="TOKENS",
        help="Tokens one training step consumes (global batch size x sequence length).",
    ),
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
        None,
        "--key",
        help="PyTorch checkpoint dicts: the key holding the weights. DCP directories: the "
        "subtree to average (default: model, or the top-level model entries), e.g. optimizer.",
    ),
    format: str | None = typer.Option(  # the library's name, so errors say --format
        None,
        "--format",
        help="dcp: write OUT as a torch.distributed.checkpoint directory (DCP inputs only), "
        "which torch.distributed.checkpoint.load reads into the same model.",
    ),
    drop_optimizer: bool = typer.Option(
        False,
        "--drop-optimizer",
        help="With --format dcp: write the averaged subtree alone, without the newest "
        "member's optimizer state and other entries (kept by default).",
    ),
    max_shard_size: str | None = typer.Option(
        None,
        "--max-shard-size",
        metavar="SIZE",
        help="Directory output: at most SIZE bytes of tensor data per shard (500MB, 2GB, "
        "1.5GiB or bytes). Default: the newest input's shards, 5GB from DCP inputs, or one file.",
    ),
    min_members: int = typer.Option(
        1,
        "--min-members",
        metavar="K",
        help="Refuse to run with fewer than K checkpoints (one member is always said on stderr).",
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
            for column in ("#", "checkpoint", "step / epoch", "weight"):
                table.add_column(column, justify="left" if column == "checkpoint" else "right")
            for number, (member, weight) in enumerate(zip(members, weights, strict=True), 1):
                table.add_row(str(number), str(member.path), member.position(), f"{weight:.4f}")
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
            max_shard_size=max_shard_size,
            min_members=min_members,
            progress=progress.advance,
            on_start=on_start,
            format=format,
            keep_other=not drop_optimizer,
            window_steps=window_steps,
            window_tokens=window_tokens,
            tokens_per_step=tokens_per_step,
        )
    flags = flags_of(average_command)
    for note in result.notes:
        print_note(in_flags(note, flags))
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
                "files": [str(path) for path in result.files],
                "copied": [str(path) for path in result.copied],
                "notes": list(result.notes),
                "selection": result.selection,
                "other_entries": result.other_entries,
            }
        )
        return
    output = result.output
    size = human_bytes(path_size(output)) if output else "-"
    if result.format == "dcp":
        where = f"{output}/ (dcp, {size})"
    elif output is not None and output.is_dir():
        shards = sum(path.name.endswith(".safetensors") for path in result.files)
        layout = "1 file" if shards == 1 else f"{shards} shards and an index"
        where = f"{output}/ ({result.format}: {layout}, {size})"
    else:
        where = f"{output} ({result.format}, {size})"
    console.print(
        f"Wrote {where}: {result.averaged} of {result.tensors} tensors averaged, "
        f"{result.tensors - result.averaged} carried over from the newest member."
    )
    if result.copied:
        names = ", ".join(path.name for path in result.copied)
        console.print(
            f"Copied {names} from {result.copied[0].parent} (the newest member); its training "
            "state (optimizer, scheduler, trainer state) was not copied."
        )
    if result.format == "torch" and output is not None and output.name.lower().endswith(".ckpt"):
        console.print(LIGHTNING_ADVICE)
    if result.selection is not None:
        console.print(f"Averaged {result.selection}.")
    if result.other_entries == "kept":
        console.print(
            "Kept the newest member's other entries (optimizer state, step...) in the DCP "
            "output; --drop-optimizer leaves them out."
        )
    elif result.other_entries == "dropped":
        console.print("Dropped the optimizer state and other entries (--drop-optimizer).")
