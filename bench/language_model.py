"""The language-model study: does averaging the last checkpoints of a small causal LM help?

What it measures
    For each training seed (default 5): train a byte-level causal transformer from
    scratch on Python's own standard library sources, keep snapshots of the last
    part of training with polyak's ``SnapshotSaver``, then sweep them with
    ``polyak.torch.sweep`` (schemes ``equal, linear, exp:2,4, power:0.05,0.1``,
    every n = 1..K). The candidate is chosen on validation loss (``result.best``);
    the test set only reports, in bits per byte (loss in nats / ln 2), against the
    final model (the newest snapshot), with the sweep's own 95% paired bootstrap
    interval over test sequences (:mod:`polyak.significance`).

Data (no download)
    The ``.py`` files at the top of the running Python's standard library
    (``sysconfig.get_paths()["stdlib"]``), sorted by name, as bytes. File number i
    goes to test when i mod 10 = 0, to validation when i mod 10 = 1, else to
    training, so the three sets share no file. Test: 256 windows of 129 bytes at
    evenly spaced offsets of the test text (128 predictions each); validation: 64
    such windows. Training draws random 129-byte windows (the seed's generator).
    Another Python version ships other sources: the JSON records the version and
    the SHA-256 of each split.

Model and training
    Bytes (256 symbols) -> embedding 64 + learned positions -> 3 pre-norm
    transformer layers (4 heads, feed-forward 256, no dropout, causal mask) ->
    layer norm -> linear to 256 logits: about 0.18 M parameters. AdamW (learning
    rate 2e-3, weight decay 0.01, betas 0.9/0.99), batch 16, 20 warm-up steps then
    a constant learning rate (the setting where averaging the latest weights stands
    in for a learning-rate decay), gradient norm clipped at 1. Snapshots every
    ``every`` steps over the last ``keep * every`` steps. One torch thread.

Output
    ``bench/results/quality-lm.json`` (every seed's numbers and the machine), and
    the README block between ``<!-- quality-lm:begin ... -->`` and
    ``<!-- quality-lm:end -->``, rebuilt from that JSON (``--from-json`` rebuilds
    it without training). ``--quick`` trains a few steps and writes neither.

Usage:
    .venv/bin/python bench/language_model.py [--seeds 5] [--steps 1500] [--quick]
    .venv/bin/python bench/language_model.py --from-json bench/results/quality-lm.json
"""

# ruff: noqa: E402 (torch's thread count is set before torch is imported)
from __future__ import annotations

import os
import time

STARTED = time.perf_counter()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import json
import math
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

from machine import machine_description
from polyak.torch.evaluation import sweep as polyak_sweep
from polyak.torch.snapshots import SnapshotSaver
from readme_block import has_readme_block, replace_readme_block

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "quality-lm.json"
SCHEMES = "equal,linear,exp:2,4,power:0.05,0.1"
CONTEXT = 128
TEST_WINDOWS = 256
VALIDATION_WINDOWS = 64
BATCH = 16
LOG2 = math.log(2)


# -- data ---------------------------------------------------------------------------------


def corpus() -> dict[str, bytes]:
    """The standard library's top-level sources, split by file into train/validation/test."""
    directory = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[bytes]] = {"train": [], "validation": [], "test": []}
    for index, path in enumerate(sorted(directory.glob("*.py"))):
        split = {0: "test", 1: "validation"}.get(index % 10, "train")
        splits[split].append(path.read_bytes())
    return {name: b"\n".join(parts) for name, parts in splits.items()}


def windows(text: bytes, count: int) -> np.ndarray:
    """``count`` windows of CONTEXT + 1 bytes at evenly spaced offsets, as int64."""
    data = np.frombuffer(text, dtype=np.uint8)
    starts = np.linspace(0, len(data) - CONTEXT - 1, count).astype(np.int64)
    return np.stack([data[s : s + CONTEXT + 1] for s in starts]).astype(np.int64)


# -- model --------------------------------------------------------------------------------


class ByteTransformer(torch.nn.Module):
    """A byte-level causal transformer: embedding, 3 pre-norm layers, a linear head."""

    def __init__(self, width: int = 64, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(256, width)
        self.position = torch.nn.Parameter(torch.zeros(CONTEXT, width))
        layer = torch.nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 256)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(CONTEXT)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.embedding(tokens) + self.position[:length]
        hidden = self.layers(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


def sequence_losses(model: ByteTransformer, batch: np.ndarray) -> np.ndarray:
    """Mean next-byte cross-entropy (nats) of each window, in float64."""
    losses = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(batch), 64):
            tokens = torch.from_numpy(batch[start : start + 64])
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, 256).double(), tokens[:, 1:].reshape(-1), reduction="none"
            )
            losses.append(loss.reshape(len(tokens), -1).mean(dim=1).numpy())
    return np.concatenate(losses)


# -- one seed -----------------------------------------------------------------------------


def run_seed(seed: int, steps: int, keep: int, every: int, root: Path) -> dict:
    """Train one seed, snapshot its last ``keep * every`` steps, sweep, report."""
    torch.set_num_threads(1)
    texts = corpus()
    train = np.frombuffer(texts["train"], dtype=np.uint8).astype(np.int64)
    test = windows(texts["test"], TEST_WINDOWS)
    validation = windows(texts["validation"], VALIDATION_WINDOWS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ByteTransformer()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    directory = root / f"seed{seed}"
    saver = SnapshotSaver(directory, keep=keep)
    started = time.perf_counter()
    offsets = np.arange(CONTEXT + 1)
    for step in range(1, steps + 1):
        model.train()
        starts = rng.integers(0, len(train) - CONTEXT - 1, size=BATCH)
        tokens = torch.from_numpy(train[starts[:, None] + offsets])
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step > steps - keep * every and step % every == 0:
            saver.save(model, step=step, logs={"loss": loss.item()})
    train_seconds = time.perf_counter() - started
    final_test = float(np.mean(sequence_losses(model, test)))

    def evaluate(module: ByteTransformer) -> dict:
        outcomes = sequence_losses(module, test)
        return {
            "test": float(np.mean(outcomes)),
            "validation": float(np.mean(sequence_losses(module, validation))),
            "outcomes": outcomes,
        }

    started = time.perf_counter()
    result = polyak_sweep(
        directory,
        model=ByteTransformer(),
        evaluate=evaluate,
        schemes=SCHEMES,
        metric="loss",
        higher_is_better=False,
    )
    sweep_seconds = time.perf_counter() - started
    problems = []
    if not math.isclose(result.single[0].test, final_test, rel_tol=1e-12):
        problems.append(f"seed {seed}: newest snapshot {result.single[0].test}, model {final_test}")
    if result.selected_on != "validation":
        problems.append(f"seed {seed}: selected on {result.selected_on}")
    comparisons = result.comparisons()
    best, final = result.best, result.single[0]
    candidates: dict[str, list[dict]] = {}
    for candidate in result.candidates:
        candidates.setdefault(candidate.scheme, []).append(
            {"n": candidate.n, "test": candidate.test, "validation": candidate.validation}
        )
    return {
        "seed": seed,
        "steps": steps,
        "keep": keep,
        "every": every,
        "parameters": parameters,
        "train_loss_last": loss.item(),
        "train_seconds": train_seconds,
        "sweep_seconds": sweep_seconds,
        "final": {"test": final.test, "validation": final.validation},
        "selected": {
            "scheme": best.scheme,
            "n": best.n,
            "test": result.best_test,
            "validation": result.best_validation,
        },
        "best_single": {
            "index": result.best_single,
            "test": result.best_single_test,
            "validation": result.single[result.best_single].validation,
        },
        "single": [{"test": s.test, "validation": s.validation} for s in result.single],
        "candidates": candidates,
        "uncertainty": {
            "selected_minus_final": comparisons["final"].to_json(),
            "selected_minus_best_single": comparisons["best_single"].to_json(),
        },
        "problems": problems,
    }


# -- report -------------------------------------------------------------------------------


def bpb(nats: float) -> float:
    return nats / LOG2


def report(payload: dict) -> str:
    """The README block, from the JSON alone."""
    runs = payload["runs"]
    first = runs[0]
    lines = [
        f"Command: `{payload['command']}` (bench/language_model.py). Machine: "
        f"{payload['machine']['summary']}. Total run time: {payload['seconds']:.0f} s.",
        "",
        f"A byte-level causal transformer ({first['parameters']:,} parameters: 3 layers, width "
        f"64, 4 heads, context {CONTEXT}) trained from scratch on the top-level `.py` files "
        f"of Python {payload['python']}'s standard library (files split 80/10/10 by index: "
        f"train {payload['bytes']['train']:,} bytes, validation and test "
        f"{VALIDATION_WINDOWS} and {TEST_WINDOWS} windows of {CONTEXT} predictions), AdamW "
        f"at a constant learning rate 2e-3 after 20 warm-up steps, batch {BATCH}, "
        f"{first['steps']} steps; snapshots every {first['every']} steps over the last "
        f"{first['keep'] * first['every']} (K = {first['keep']}). `polyak.torch.sweep` over "
        f"`{SCHEMES}`, every n = 1..K, chosen on validation loss; test in bits per byte "
        "(lower is better). The interval is the sweep's 95% paired bootstrap over the "
        f"{TEST_WINDOWS} test windows (2,000 resamples, seed 0).",
        "",
        "| seed | final: test bpb | selected on val | selected: test bpb | selected − final, "
        "bpb [95% interval] | within noise? | best single by val: test bpb |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        final = run["uncertainty"]["selected_minus_final"]
        low, high = final["interval"]
        lines.append(
            f"| {run['seed']} | {bpb(run['final']['test']):.4f} | "
            f"{run['selected']['scheme']}, n={run['selected']['n']} | "
            f"{bpb(run['selected']['test']):.4f} | {bpb(final['difference']):+.4f} "
            f"[{bpb(low):+.4f}, {bpb(high):+.4f}] | "
            f"{'yes' if final['within_noise'] else 'no'} | "
            f"{bpb(run['best_single']['test']):.4f} |"
        )
    differences = [bpb(run["uncertainty"]["selected_minus_final"]["difference"]) for run in runs]
    versus_single = [
        bpb(run["uncertainty"]["selected_minus_best_single"]["difference"]) for run in runs
    ]
    beyond = sum(
        1 for run in runs if not run["uncertainty"]["selected_minus_final"]["within_noise"]
    )
    better = sum(1 for d in differences if d < 0)
    mean = statistics.fmean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(runs) > 1 else 0.0
    chosen = {}
    for run in runs:
        chosen[run["selected"]["scheme"]] = chosen.get(run["selected"]["scheme"], 0) + 1
    finals = [bpb(run["final"]["test"]) for run in runs]
    selected = [bpb(run["selected"]["test"]) for run in runs]
    lines += [
        "",
        f"- Test bits per byte over {len(runs)} seeds, mean ± standard deviation: final model "
        f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}; selected "
        f"{statistics.fmean(selected):.4f} ± {statistics.stdev(selected):.4f}.",
        f"- Selected − final: {mean:+.4f} bpb (mean ± standard error {error:.4f}); lower "
        f"in {better} of {len(runs)} seeds, and beyond the 95% bootstrap interval's noise "
        f"in {beyond} of {len(runs)}.",
        f"- Selected − best single snapshot by validation: {statistics.fmean(versus_single):+.4f} "
        "bpb on average; the best single snapshot by validation was the final model itself "
        f"in {sum(r['best_single']['index'] == 0 for r in runs)} of {len(runs)} seeds.",
        "- Chosen on validation: "
        + ", ".join(f"{scheme} ×{count}" for scheme, count in sorted(chosen.items()))
        + f"; n from {min(r['selected']['n'] for r in runs)} to "
        f"{max(r['selected']['n'] for r in runs)}.",
        "",
        f"Without selection, each scheme over all K = {first['keep']} snapshots, against the "
        "final model (test bits per byte; lower is better):",
        "",
        "| scheme (all K) | test bpb, mean ± sd | − final, mean bpb | lower in |",
        "|---|---|---|---|",
    ]
    fixed = {}
    for scheme in runs[0]["candidates"]:
        values = [bpb(r["candidates"][scheme][-1]["test"]) for r in runs]
        deltas = [v - f for v, f in zip(values, finals, strict=True)]
        fixed[scheme] = statistics.fmean(deltas)
        lines.append(
            f"| {scheme} | {statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} | "
            f"{statistics.fmean(deltas):+.4f} | {sum(d < 0 for d in deltas)} of {len(runs)} |"
        )
    lines += ["", "Reading: " + reading(runs, differences, versus_single, beyond, fixed)]
    return "\n".join(lines) + "\n"


def reading(
    runs: list[dict],
    differences: list[float],
    versus_single: list[float],
    beyond: int,
    fixed: dict[str, float],
) -> str:
    """What the numbers say, in words chosen by the numbers."""
    count = len(runs)
    better = sum(d < 0 for d in differences)
    mean = statistics.fmean(differences)
    error = statistics.stdev(differences) / math.sqrt(count)
    finals = statistics.fmean(bpb(r["final"]["test"]) for r in runs)
    relative = -mean / finals
    if better == count and beyond == count:
        verdict = (
            f"the average chosen on validation had a lower test loss than the final model "
            f"in every seed ({count} of {count}), and in every seed the sweep's own 95% "
            "interval excluded 0: a consistent gain on this task"
        )
    elif better > count / 2:
        verdict = (
            f"the average chosen on validation had a lower test loss in {better} of {count} "
            f"seeds, beyond its own noise in {beyond}"
        )
    else:
        verdict = (
            f"the average chosen on validation did not beat the final model consistently "
            f"(lower in {better} of {count} seeds, beyond its own noise in {beyond})"
        )
    best_fixed = min(fixed, key=fixed.get)
    single = statistics.fmean(versus_single)
    single_text = (
        "below the best single snapshot chosen on the same validation data too "
        f"({single:+.4f} bpb on average), so the gain is the averaging's, not the choice "
        "of a lucky snapshot's"
        if single < 0
        else f"no better than the best single snapshot by validation ({single:+.4f} bpb)"
    )
    return (
        f"{verdict}. The mean change is {mean:+.4f} bpb (standard error {error:.4f}), "
        f"{100 * relative:.1f}% of the final model's {finals:.3f} bpb, and {single_text}. "
        f"Without any selection the best fixed rule here, {best_fixed} over all "
        f"snapshots, changes the test loss by {fixed[best_fixed]:+.4f} bpb on average. "
        "The learning rate here is constant, the setting where averaging the latest "
        "weights stands in for a learning-rate decay; whether the gain survives a decay "
        f"to near zero is not measured here. {count} seeds of a "
        f"{runs[0]['parameters'] / 1e6:.2f} M-parameter model trained for "
        f"{runs[0]['steps']} steps on one CPU thread: a small model on a small budget. "
        f"Per seed: {min(r['train_seconds'] for r in runs):.0f} to "
        f"{max(r['train_seconds'] for r in runs):.0f} s of training and "
        f"{min(r['sweep_seconds'] for r in runs):.0f} to "
        f"{max(r['sweep_seconds'] for r in runs):.0f} s of sweeping on this machine, shared "
        "with other jobs while it ran."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a few steps; writes nothing")
    parser.add_argument("--from-json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        replace_readme_block("quality-lm", report(payload), "Does it help?")
        return 0
    if not args.quick and not has_readme_block("quality-lm"):
        raise SystemExit("README.md: no quality-lm block; restore its markers first.")
    steps, keep, every = (40, 4, 5) if args.quick else (args.steps, args.keep, args.every)
    texts = corpus()
    runs = []
    with tempfile.TemporaryDirectory(prefix="polyak-lm-") as root:
        for seed in range(1, args.seeds + 1):
            run = run_seed(seed, steps, keep, every, Path(root))
            final = run["uncertainty"]["selected_minus_final"]
            print(
                f"seed {seed}: final {bpb(run['final']['test']):.4f} bpb, selected "
                f"{run['selected']['scheme']} n={run['selected']['n']} "
                f"{bpb(run['selected']['test']):.4f} ({final['sentence']}); train "
                f"{run['train_seconds']:.0f} s, sweep {run['sweep_seconds']:.0f} s",
                flush=True,
            )
            runs.append(run)
    problems = [problem for run in runs for problem in run["problems"]]
    payload = {
        "command": " ".join(
            ["python bench/language_model.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "python": sys.version.split()[0],
        "machine": machine_description(),
        "bytes": {name: len(text) for name, text in texts.items()},
        "sha256": {name: hashlib.sha256(text).hexdigest() for name, text in texts.items()},
        "seconds": time.perf_counter() - STARTED,
        "runs": runs,
        "problems": problems,
    }
    for problem in problems:
        print("PROBLEM:", problem)
    if args.quick:
        print(report(payload))
        return 1 if problems else 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=1) + "\n")
    replace_readme_block("quality-lm", report(payload), "Does it help?")
    print(f"Wrote {RESULTS} and README.md's quality-lm block.")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
