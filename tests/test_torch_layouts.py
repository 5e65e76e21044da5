"""End to end: `polyak average` on the PyTorch layouts people have, loaded back strictly.

Each test trains a small real model with BatchNorm a few steps between saves (so the
members differ and the running statistics and ``num_batches_tracked`` move), writes
the layout with the real library where one exists (``torch.save``, a real Lightning
``Trainer`` with ``ModelCheckpoint``, ``huggingface_hub.save_torch_state_dict``,
``torch.nn.DataParallel``, ``torch.compile``) or a faithful replica of its files
(Hugging Face Trainer's ``checkpoint-N/``, timm and fairseq checkpoint dicts), runs
the command line on it, and loads the result with ``load_state_dict(strict=True)``.
Floating tensors must match an independent float64 average; integer buffers must be
the newest member's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from polyak.cli.main import main  # noqa: E402

INPUTS, HIDDEN, CLASSES = 4, 8, 3


def make_net() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, HIDDEN),
        torch.nn.BatchNorm1d(HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def training_run(save: Callable[[int, torch.nn.Module, torch.optim.Optimizer], None]) -> None:
    """Train a fresh net for 3 x 2 SGD steps, calling ``save(step, net, optimizer)`` after each
    pair of steps."""
    torch.manual_seed(0)
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, INPUTS), torch.randint(0, CLASSES, (32,))
    step = 0
    for _ in range(3):
        for _ in range(2):
            step += 1
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save(step, net, optimizer)


def state_of(net: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A copy of the state dict, names with ``prefix``."""
    return {prefix + name: value.detach().clone() for name, value in net.state_dict().items()}


def run(arguments: list[str], capsys) -> dict:
    """Run `polyak average ... --json`; return its JSON report."""
    with pytest.raises(SystemExit) as exited:
        main(["average", *arguments, "--json"])
    captured = capsys.readouterr()
    assert exited.value.code == 0, captured.err
    return json.loads(captured.out)


def reference_average(members: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    """float64 weighted mean of floating tensors; the first member's integer tensors."""
    expected = {}
    for name, newest in members[0].items():
        if newest.is_floating_point():
            expected[name] = sum(
                w * m[name].double().numpy() for w, m in zip(weights, members, strict=True)
            )
        else:
            expected[name] = newest.numpy()
    return expected


def assert_matches(state: dict[str, torch.Tensor], expected: dict, prefix: str = "") -> None:
    """Same names (after ``prefix``), floats within float32 rounding, integers exactly."""
    assert sorted(state) == sorted(prefix + name for name in expected)
    for name, value in expected.items():
        actual = state[prefix + name]
        if actual.is_floating_point():
            assert actual.dtype == torch.float32
            np.testing.assert_allclose(actual.numpy(), value, rtol=1e-6, atol=1e-6)
        else:
            assert actual.dtype == torch.int64
            np.testing.assert_array_equal(actual.numpy(), value, strict=True)


def load_strictly(state: dict[str, torch.Tensor], module: torch.nn.Module | None = None):
    module = make_net() if module is None else module
    module.load_state_dict(state, strict=True)
    return module


def members_differ(members: list[dict[str, torch.Tensor]]) -> None:
    """The members are a real run's: weights, running stats and counters all moved."""
    first, last = members[0], members[-1]
    for name in ("0.weight", "1.running_mean", "1.num_batches_tracked"):
        key = next(k for k in first if k.endswith(name))
        assert not torch.equal(first[key], last[key]), name


EQUAL3 = [1 / 3] * 3
LINEAR3 = [3 / 6, 2 / 6, 1 / 6]


# ---------------------------------------------------------------- (a) plain state dicts


def test_plain_state_dict_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    members = []

    def save(step, net, optimizer):
        torch.save(net.state_dict(), run_dir / f"checkpoint_{step}.pt")
        members.insert(0, state_of(net))

    training_run(save)
    members_differ(members)
    out = tmp_path / "averaged.pt"
    report = run([str(run_dir), "-s", "linear", "-o", str(out)], capsys)
    assert [Path(m["path"]).name for m in report["members"]] == [
        "checkpoint_6.pt",
        "checkpoint_4.pt",
        "checkpoint_2.pt",
    ]
    state = torch.load(out, weights_only=True)
    load_strictly(state)
    assert_matches(state, reference_average(members, LINEAR3))


# ---------------------------------------------------------------- (b) Lightning


def test_lightning_checkpoints_from_a_real_trainer(tmp_path, capsys):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self, hidden: int = HIDDEN, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = make_net()

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, INPUTS), torch.randint(0, CLASSES, (48,)))
    checkpoints = tmp_path / "checkpoints"
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, save_last=True)
        ],
    )
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=16))
    names = ["epoch=2-step=9.ckpt", "epoch=1-step=6.ckpt", "epoch=0-step=3.ckpt"]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([*names, "last.ckpt"])
    files = [torch.load(checkpoints / name, weights_only=True) for name in names]
    members = [file["state_dict"] for file in files]
    members_differ(members)

    out = tmp_path / "averaged.ckpt"
    report = run([str(checkpoints), "-o", str(out)], capsys)
    # last.ckpt is a copy of the newest snapshot, not a step of its own: skipped.
    assert [Path(m["path"]).name for m in report["members"]] == names
    assert [m["step"] for m in report["members"]] == [9, 6, 3]

    written = torch.load(out, weights_only=True)
    assert_matches(written["state_dict"], reference_average(members, EQUAL3))
    # Optimizer and scheduler state are dropped (averaged weights match neither); the
    # rest is the newest checkpoint's.
    assert "optimizer_states" not in written and "lr_schedulers" not in written
    for key in ("epoch", "global_step", "hyper_parameters", "pytorch-lightning_version"):
        assert written[key] == files[0][key]
    restored = Classifier.load_from_checkpoint(out, weights_only=True)
    assert restored.hparams.lr == 0.1
    for name, value in restored.state_dict().items():
        assert torch.equal(value, written["state_dict"][name])
    Classifier().load_state_dict(written["state_dict"], strict=True)


# ---------------------------------------------------------------- (c) Hugging Face Trainer


def hugging_face_run(
    directory: Path, write_model: Callable[[dict[str, torch.Tensor], Path], None]
) -> list[dict[str, torch.Tensor]]:
    """checkpoint-N/ directories as transformers' Trainer leaves them: the model, written
    by ``write_model``, beside the optimizer, scheduler, RNG and trainer state."""
    members = []

    def save(step, net, optimizer):
        checkpoint = directory / f"checkpoint-{step * 100}"
        checkpoint.mkdir(parents=True)
        state = state_of(net)
        write_model(state, checkpoint)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
        torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
        torch.save(scheduler.state_dict(), checkpoint / "scheduler.pt")
        torch.save(
            {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "cpu": torch.random.get_rng_state(),
            },
            checkpoint / "rng_state.pth",
        )
        torch.save(
            {"output_dir": str(directory), "learning_rate": 0.1}, checkpoint / "training_args.bin"
        )
        trainer_state = {"global_step": step * 100, "epoch": step / 2, "log_history": []}
        (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
        (checkpoint / "config.json").write_text(json.dumps({"hidden_size": HIDDEN}))
        members.insert(0, state)

    training_run(save)
    members_differ(members)
    return members


def write_model_safetensors(state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_hugging_face_trainer_output_single_file(tmp_path, capsys):
    members = hugging_face_run(tmp_path / "output", write_model_safetensors)
    expected = reference_average(members, LINEAR3)

    report = run(
        [str(tmp_path / "output"), "-s", "linear", "-o", str(tmp_path / "avg.safetensors")], capsys
    )
    assert [Path(m["path"]).name for m in report["members"]] == [
        "checkpoint-600",
        "checkpoint-400",
        "checkpoint-200",
    ]
    state = load_file(tmp_path / "avg.safetensors")
    load_strictly(state)
    assert_matches(state, expected)

    # A directory output is a checkpoint directory like the inputs' (model.safetensors),
    # with the newest member's config.json beside it (its optimizer.pt is not copied).
    report = run(
        [str(tmp_path / "output"), "-s", "linear", "-o", str(tmp_path / "averaged")], capsys
    )
    assert [Path(f).name for f in report["files"]] == ["model.safetensors", "config.json"]
    assert report["copied"] == [str(tmp_path / "output" / "checkpoint-600" / "config.json")]
    state = load_file(tmp_path / "averaged" / "model.safetensors")
    load_strictly(state)
    assert_matches(state, expected)


def test_hugging_face_trainer_output_sharded(tmp_path, capsys):
    hub = pytest.importorskip("huggingface_hub")

    def write_shards(state, checkpoint):
        hub.save_torch_state_dict(state, checkpoint, max_shard_size=150)

    members = hugging_face_run(tmp_path / "output", write_shards)
    newest = tmp_path / "output" / "checkpoint-600"
    newest_index = json.loads((newest / "model.safetensors.index.json").read_text())
    assert len(set(newest_index["weight_map"].values())) >= 3

    out = tmp_path / "averaged"
    report = run([str(tmp_path / "output"), "-o", f"{out}/"], capsys)
    assert report["format"] == "sharded-safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # The newest member's shards, tensor for tensor, the same total size, and polyak's mark.
    assert index == {
        "metadata": {**newest_index["metadata"], "polyak": "average"},
        "weight_map": newest_index["weight_map"],
    }
    expected = reference_average(members, EQUAL3)
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged |= load_file(out / shard)
        with safe_open(out / shard, framework="pt") as opened:
            assert opened.metadata() == {"format": "pt", "polyak": "average"}  # hub's, and the mark
    load_strictly(merged)
    assert_matches(merged, expected)
    # huggingface_hub's own loader reads the directory, strictly.
    net = make_net()
    hub.load_torch_model(net, out, strict=True)
    assert_matches(state_of(net), expected)

    # --max-shard-size re-cuts the shards; the tensors stay the same, bit for bit.
    recut = tmp_path / "recut"
    report = run([str(tmp_path / "output"), "-o", str(recut), "--max-shard-size", "100B"], capsys)
    assert len(report["files"]) > len(set(index["weight_map"].values())) + 1
    net = make_net()
    hub.load_torch_model(net, recut, strict=True)
    for name, value in state_of(net).items():
        assert torch.equal(value, merged[name])


# ---------------------------------------------------------------- (d) timm and fairseq dicts


def test_timm_checkpoints_and_their_ema(tmp_path, capsys):
    run_dir = tmp_path / "timm"
    run_dir.mkdir()
    models, emas = [], []
    ema = None

    def save(step, net, optimizer):
        nonlocal ema
        current = state_of(net)
        if ema is None:
            ema = {name: value.clone() for name, value in current.items()}
        else:
            for name, value in current.items():
                if value.is_floating_point():
                    ema[name].mul_(0.5).add_(value, alpha=0.5)
                else:
                    ema[name].copy_(value)
        checkpoint = {
            "epoch": step,
            "arch": "mlp_bn",
            "state_dict": current,
            "state_dict_ema": {name: value.clone() for name, value in ema.items()},
            "optimizer": optimizer.state_dict(),
            "version": 2,
        }
        torch.save(checkpoint, run_dir / f"checkpoint-{step}.pth.tar")
        models.insert(0, current)
        emas.insert(0, checkpoint["state_dict_ema"])

    training_run(save)
    members_differ(emas)
    out = tmp_path / "averaged_ema.pth.tar"
    report = run(
        [str(run_dir / "checkpoint-*.pth.tar"), "--key", "state_dict_ema", "-o", str(out)], capsys
    )
    assert [m["step"] for m in report["members"]] == [6, 4, 2]
    written = torch.load(out, weights_only=True)
    assert set(written) == {"epoch", "arch", "state_dict", "state_dict_ema", "version"}
    load_strictly(written["state_dict_ema"])
    assert_matches(written["state_dict_ema"], reference_average(emas, EQUAL3))
    # The entry not averaged is the newest checkpoint's, as it was.
    load_strictly(written["state_dict"])
    for name, value in written["state_dict"].items():
        assert torch.equal(value, models[0][name])

    # Without --key, the model weights are averaged.
    written = torch.load(
        run([str(run_dir / "checkpoint-*.pth.tar"), "-o", str(tmp_path / "avg.pth")], capsys)[
            "output"
        ],
        weights_only=True,
    )
    assert_matches(written["state_dict"], reference_average(models, EQUAL3))


def test_fairseq_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "fairseq"
    run_dir.mkdir()
    members = []

    def save(step, net, optimizer):
        checkpoint = {
            "args": None,
            "cfg": {"model": {"_name": "mlp_bn"}, "optimization": {"lr": [0.1]}},
            "model": state_of(net),
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "num_updates": step}],
            "last_optimizer_state": optimizer.state_dict(),
            "extra_state": {"epoch": step, "train_iterator": {"epoch": step}},
        }
        torch.save(checkpoint, run_dir / f"checkpoint{step}.pt")
        members.insert(0, checkpoint["model"])

    training_run(save)
    out = tmp_path / "averaged.pt"
    run([str(run_dir), "-s", "exp:2", "-o", str(out)], capsys)
    written = torch.load(out, weights_only=True)
    assert "last_optimizer_state" not in written
    assert written["extra_state"] == {"epoch": 6, "train_iterator": {"epoch": 6}}
    assert written["cfg"]["model"] == {"_name": "mlp_bn"}
    load_strictly(written["model"])
    weights = np.exp(-np.arange(1, 4) / 2)
    assert_matches(written["model"], reference_average(members, list(weights / weights.sum())))


# ---------------------------------------------------------------- (e) wrapper prefixes


def wrapped_run(directory: Path, wrap: Callable[[torch.nn.Module], torch.nn.Module], prefix: str):
    directory.mkdir()
    members = []

    def save(step, net, optimizer):
        torch.save(wrap(net).state_dict(), directory / f"model_{step}.pt")
        members.insert(0, state_of(net))

    training_run(save)
    saved = torch.load(directory / "model_6.pt", weights_only=True)
    assert all(name.startswith(prefix) for name in saved)
    return members


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [(torch.nn.DataParallel, "module."), (torch.compile, "_orig_mod.")],
    ids=["DataParallel", "compile"],
)
def test_wrapper_prefixes(tmp_path, capsys, wrap, prefix):
    members = wrapped_run(tmp_path / "run", wrap, prefix)
    expected = reference_average(members, EQUAL3)

    # A .pt output keeps the prefix: it loads into the wrapped model, as the inputs do.
    run([str(tmp_path / "run"), "-o", str(tmp_path / "avg.pt")], capsys)
    state = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert_matches(state, expected, prefix=prefix)
    wrapped = wrap(make_net())
    wrapped.load_state_dict(state, strict=True)

    # Converted to safetensors, the names carry no prefix: it loads into the bare model.
    run([str(tmp_path / "run"), "-o", str(tmp_path / "avg.safetensors")], capsys)
    state = load_file(tmp_path / "avg.safetensors")
    assert_matches(state, expected)
    load_strictly(state)


def test_prefixed_and_plain_members_average_together(tmp_path, capsys):
    members = wrapped_run(tmp_path / "run", torch.nn.DataParallel, "module.")
    # The newest member was saved unwrapped: names match once the prefix is stripped,
    # and the output takes the newest member's names.
    torch.save(members[0], tmp_path / "run" / "model_6.pt")
    run([str(tmp_path / "run"), "-o", str(tmp_path / "avg.pt")], capsys)
    state = torch.load(tmp_path / "avg.pt", weights_only=True)
    load_strictly(state)
    assert_matches(state, reference_average(members, EQUAL3))
