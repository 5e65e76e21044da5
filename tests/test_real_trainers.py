"""End to end on what real trainers leave on disk: discover, average, load in the
framework's own loader, and go on.

- transformers' ``Trainer`` (a GPT-2 with tied embeddings and a tokenizer; a BERT whose
  ``save_pretrained`` shards): ``polyak average out/checkpoint-* -o avg/`` and
  ``from_pretrained(avg)``, one forward pass equal to a float64 average loaded by hand,
  then a training step.
- Lightning's ``ModelCheckpoint`` ``.ckpt`` -> ``load_from_checkpoint`` -> ``validate``.
- timm's ``train.py`` checkpoints. timm needs torchvision, which exists for this torch
  (2.13, CPU wheel) only as a CUDA build that does not import here, so the files are
  written with ``torch.save`` in the structure timm's ``CheckpointSaver`` gives them:
  ``epoch, arch, state_dict, optimizer, version, args (argparse.Namespace), metric,
  state_dict_ema``, and its ``last.pth.tar``/``model_best.pth.tar`` copies.
- Keras' ``ModelCheckpoint`` ``.keras`` of a model with BatchNorm ->
  ``keras.saving.load_model`` -> ``fit`` goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polyak.cli.main import main  # noqa: E402
from polyak.formats.marks import MARK_KEY, MARK_VALUE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def polyak(arguments: list[str], capsys) -> tuple[int, str, str]:
    """Run the command line in this process; its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def average_json(arguments: list[str], capsys) -> tuple[dict, str]:
    code, out, err = polyak(["average", *arguments, "--json"], capsys)
    assert code == 0, err
    return json.loads(out), err


def float64_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The equal-weight mean of floating tensors in float64; integer tensors of the first."""
    return {
        name: (
            sum(state[name].double() for state in states) / len(states)
            if value.is_floating_point()
            else value
        )
        for name, value in states[0].items()
    }


# ------------------------------------------------------------------ transformers' Trainer

transformers = pytest.importorskip("transformers")


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences: a language-modelling task with labels = inputs."""

    def __init__(self, vocabulary: int, count: int = 32, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocabulary, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_tokenizer(directory: Path):
    """A word-level tokenizer built here (no download), as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(95)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]"
    )


def train_with_trainer(model, out: Path, tokenizer=None, steps: int = 6) -> None:
    arguments = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=2,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=RandomTokens(model.config.vocab_size),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def loaded_by_hand(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint-N/ directory, read with safetensors itself."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(directory / shard))
    return state


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    """A GPT-2 (tied input and output embeddings) trained by the Trainer: checkpoint-2/4/6,
    each with config, generation config, tokenizer files and the training state."""
    out = tmp_path_factory.mktemp("gpt2") / "out"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    assert config.tie_word_embeddings
    trainer = train_with_trainer(model, out, tokenizer=tiny_tokenizer(out))
    trainer.save_model(str(out))  # the final model at the root, beside checkpoint-N/
    return out


def test_trainer_checkpoints_average_into_a_directory_from_pretrained_loads(
    gpt2_run, tmp_path, capsys
):
    members = [gpt2_run / f"checkpoint-{step}" for step in (6, 4, 2)]
    assert {"optimizer.pt", "trainer_state.json", "tokenizer.json"} <= {
        path.name for path in members[0].iterdir()
    }
    out = tmp_path / "avg"
    report, _ = average_json([str(gpt2_run / "checkpoint-*"), "-o", f"{out}/"], capsys)
    assert [Path(member["path"]) for member in report["members"]] == members

    # The newest member's model files come along, its training state does not.
    copied = sorted(Path(path).name for path in report["copied"])
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(copied)
    assert "trainer_state.json" not in copied
    assert sorted(path.name for path in out.iterdir()) == sorted([*copied, "model.safetensors"])
    for name in copied:
        assert (out / name).read_bytes() == (members[0] / name).read_bytes()

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2")["input_ids"] == [3, 4]

    # One forward pass equals the float64 average of the members, loaded by hand.
    expected = float64_average([loaded_by_hand(member) for member in members])
    reference = transformers.GPT2LMHeadModel(model.config)
    reference.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
    reference.tie_weights()
    inputs = RandomTokens(97).ids[:4]
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(inputs).logits, reference(inputs).logits, rtol=1e-5, atol=1e-5
        )

    # Training goes on from the average.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_trainer_output_root_beside_checkpoints_is_refused_not_averaged_alone(
    gpt2_run, tmp_path, capsys
):
    # trainer.save_model(out) put model.safetensors at out/, beside out/checkpoint-N/.
    assert (gpt2_run / "model.safetensors").exists()
    out = tmp_path / "avg.safetensors"
    code, _, err = polyak(["average", str(gpt2_run), "-o", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert f"directory {gpt2_run}: is a checkpoint itself (model.safetensors)" in err
    assert f"pass '{gpt2_run / 'checkpoint-*'}'" in err
    assert f"pass {gpt2_run / 'model.safetensors'}" in err
    assert not out.exists()


def test_one_member_is_said_and_min_members_refuses_it(gpt2_run, tmp_path, capsys):
    out = tmp_path / "one.safetensors"
    report, err = average_json([str(gpt2_run / "checkpoint-6"), "-o", str(out)], capsys)
    assert "polyak: note: only one checkpoint was found" in err
    assert any("only one checkpoint was found" in note for note in report["notes"])
    # A single file cannot carry the config: said too.
    assert any("config.json" in note and "directory output" in note for note in report["notes"])

    code, _, err = polyak(
        ["average", str(gpt2_run / "checkpoint-6"), "-o", str(out), "--min-members", "2"],
        capsys,
    )
    assert code == 2
    assert "fewer than --min-members 2; pass more checkpoints, or lower it." in err

    report, err = average_json(
        [str(gpt2_run / "checkpoint-*"), "-o", str(tmp_path / "three.safetensors")], capsys
    )
    assert report["notes"] == [report["notes"][0]] and "single-file" in report["notes"][0]


def test_directory_output_replaced_with_overwrite_keeps_companions(gpt2_run, tmp_path, capsys):
    out = tmp_path / "avg"
    average_json([str(gpt2_run / "checkpoint-*"), "-o", f"{out}/"], capsys)
    # Again with --overwrite: its own copies of the companions may be replaced...
    report, _ = average_json(
        [str(gpt2_run / "checkpoint-*"), "-o", f"{out}/", "-s", "linear", "--overwrite"], capsys
    )
    assert report["scheme"] == "linear"
    assert (out / "config.json").exists()
    # ...but not a config.json the user edited.
    (out / "config.json").write_text("{}")
    code, _, err = polyak(
        ["average", str(gpt2_run / "checkpoint-*"), "-o", f"{out}/", "--overwrite"], capsys
    )
    assert code == 2 and "holds config.json, which polyak did not write" in err
    assert (out / "config.json").read_text() == "{}"


def test_sharded_bert_checkpoints_keep_their_index_metadata(tmp_path, capsys):
    class ShardedBert(transformers.BertForMaskedLM):
        # The Trainer saves with save_pretrained's default shard size; a small one makes
        # this tiny model shard as a large one would.
        def save_pretrained(self, *arguments, **options):
            options["max_shard_size"] = "60KB"
            return super().save_pretrained(*arguments, **options)

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    run = tmp_path / "bert"
    train_with_trainer(ShardedBert(config), run, steps=4)
    capsys.readouterr()  # the Trainer prints its metrics
    members = [run / "checkpoint-4", run / "checkpoint-2"]
    newest_index = json.loads((members[0] / "model.safetensors.index.json").read_text())
    assert len(set(newest_index["weight_map"].values())) > 1
    assert "total_parameters" in newest_index["metadata"]

    out = tmp_path / "avg"
    report, _ = average_json([str(run / "checkpoint-*"), "-o", f"{out}/"], capsys)
    assert report["format"] == "sharded-safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # transformers' entries kept (total_parameters counted again), beside polyak's mark.
    assert index["metadata"].pop(MARK_KEY) == MARK_VALUE
    assert index["metadata"] == newest_index["metadata"]
    assert index["weight_map"] == newest_index["weight_map"]
    assert (out / "config.json").exists()

    model = transformers.BertForMaskedLM.from_pretrained(out)
    expected = float64_average([loaded_by_hand(member) for member in members])
    for name, value in model.state_dict().items():
        if name in expected:
            torch.testing.assert_close(value, expected[name].to(value.dtype), rtol=0, atol=2e-7)
    inputs = RandomTokens(97).ids[:2]
    assert torch.isfinite(model(input_ids=inputs, labels=inputs).loss)


def test_tied_pytorch_model_bin_stays_tied(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=97)
    model = transformers.GPT2LMHeadModel(config)
    states = []
    for step in (1, 2):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        directory = tmp_path / "run" / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
        states.insert(0, {k: v.clone() for k, v in model.state_dict().items()})
    newest = tmp_path / "run" / "checkpoint-2" / "pytorch_model.bin"
    out = tmp_path / "avg.bin"
    average_json([str(tmp_path / "run"), "-o", str(out)], capsys)
    # One storage for the tied pair, as in the input: not larger than a member.
    assert out.stat().st_size <= newest.stat().st_size
    written = torch.load(out, weights_only=True)
    assert written["lm_head.weight"].data_ptr() == written["transformer.wte.weight"].data_ptr()
    expected = float64_average(states)
    for name, value in written.items():
        torch.testing.assert_close(value, expected[name].to(value.dtype), rtol=0, atol=2e-7)


# ------------------------------------------------------------------------------ Lightning

pl = pytest.importorskip("lightning.pytorch")


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, batch_index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_index):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def lightning_trainer(root: Path, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )


def test_lightning_checkpoints_average_load_and_validate(tmp_path, capsys):
    torch.manual_seed(0)
    x = torch.randn(48, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    checkpoints = tmp_path / "checkpoints"
    saver = pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, save_last=True)
    lightning_trainer(tmp_path, [saver]).fit(Regressor(), loader, loader)

    out = tmp_path / "averaged.ckpt"
    code, printed, err = polyak(["average", str(checkpoints), "-o", str(out)], capsys)
    assert code == 0, err
    assert "Trainer.fit(ckpt_path=path) cannot resume from it" in " ".join(printed.split())

    restored = Regressor.load_from_checkpoint(out, weights_only=True)
    results = lightning_trainer(tmp_path).validate(restored, loader, verbose=False)
    assert np.isfinite(results[0]["val_loss"])
    # A new fit starts from the averaged weights.
    lightning_trainer(tmp_path / "again").fit(restored, loader)


def test_ckpt_output_from_plain_state_dicts_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    for step in (1, 2):
        torch.save(Regressor().state_dict(), tmp_path / f"model_{step}.pt")
    out = tmp_path / "avg.ckpt"
    code, _, err = polyak(["average", str(tmp_path / "model_*.pt"), "-o", str(out)], capsys)
    assert code == 2
    assert f"output {out}: a .ckpt file is a Lightning checkpoint" in err
    assert "Write .pt" in err and not out.exists()


# ------------------------------------------------------------------------------------ timm


def timm_run(directory: Path) -> list[dict]:
    """Three epochs saved as timm's CheckpointSaver saves them (see the module docstring),
    with its last.pth.tar and model_best.pth.tar copies."""
    directory.mkdir()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(2),
    )
    net(torch.randn(2, 3, 6, 6))
    ema = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(
        model="resnet18", lr=0.1, epochs=3, sched="cosine", mean=None, input_size=(3, 6, 6)
    )
    saved = []
    for epoch in range(3):
        loss = net(torch.randn(8, 3, 6, 6)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                ema[name].mul_(0.5).add_(value, alpha=0.5)
        state = {
            "epoch": epoch,
            "arch": "resnet18",
            "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": args,
            "metric": 0.5 + epoch / 10,
            "state_dict_ema": {k: v.clone() for k, v in ema.items()},
        }
        torch.save(state, directory / f"checkpoint-{epoch}.pth.tar")
        saved.insert(0, state)
    shutil.copy(directory / "checkpoint-2.pth.tar", directory / "last.pth.tar")
    shutil.copy(directory / "checkpoint-1.pth.tar", directory / "model_best.pth.tar")
    return saved


def test_timm_checkpoints_with_args_average_and_keep_args(tmp_path, capsys):
    saved = timm_run(tmp_path / "run")
    out = tmp_path / "averaged.pth.tar"
    report, _ = average_json([str(tmp_path / "run"), "-o", str(out)], capsys)
    assert [Path(m["path"]).name for m in report["members"]] == [
        f"checkpoint-{epoch}.pth.tar" for epoch in (2, 1, 0)
    ]
    with torch.serialization.safe_globals([argparse.Namespace]):
        written = torch.load(out, weights_only=True)
    assert written["args"] == saved[0]["args"]
    assert isinstance(written["args"], argparse.Namespace)
    assert "optimizer" not in written
    expected = float64_average([state["state_dict"] for state in saved])
    for name, value in written["state_dict"].items():
        torch.testing.assert_close(value, expected[name].to(value.dtype), rtol=0, atol=2e-7)

    # --key state_dict_ema averages the EMA weights instead.
    ema_out = tmp_path / "ema.pth.tar"
    average_json([str(tmp_path / "run"), "--key", "state_dict_ema", "-o", str(ema_out)], capsys)
    with torch.serialization.safe_globals([argparse.Namespace]):
        written = torch.load(ema_out, weights_only=True)
    expected = float64_average([state["state_dict_ema"] for state in saved])
    for name, value in written["state_dict_ema"].items():
        torch.testing.assert_close(value, expected[name].to(value.dtype), rtol=0, atol=2e-7)


def test_timm_inspect_names_the_weight_entries(tmp_path, capsys):
    timm_run(tmp_path / "run")
    code, out, err = polyak(["inspect", str(tmp_path / "run"), "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["checkpoints"]
    assert [row["key"] for row in rows] == ["state_dict"] * 3
    assert rows[0]["weight_keys"] == ["state_dict", "state_dict_ema"]
    # A timm name's number is its epoch, but polyak cannot know: labelled as a name's number.
    assert rows[0]["position"] == "2 (name)"
    # Weights and files: the optimizer state and the EMA make the file larger.
    assert rows[0]["bytes"] > rows[0]["weight_bytes"] > 0
    code, out, _ = polyak(["inspect", str(tmp_path / "run")], capsys)
    assert "also hold 'state_dict_ema' (read one with --key state_dict_ema)" in " ".join(
        out.split()
    )


def test_timm_copies_in_a_shell_expanded_glob_are_named(tmp_path, capsys):
    timm_run(tmp_path / "run")
    expanded = sorted(str(path) for path in (tmp_path / "run").glob("*.pth.tar"))
    assert any(path.endswith("model_best.pth.tar") for path in expanded)
    code, _, err = polyak(["average", *expanded, "-o", str(tmp_path / "avg.pt")], capsys)
    assert code == 2
    assert "is timm's copy of" in err
    assert "last.pth.tar and model_best.pth.tar" in err
    assert "Rename it" not in err


# ----------------------------------------------------------------------------------- Keras

KERAS_SCRIPT = r"""
import os, sys
import numpy as np
import keras

run, out = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
y = (x.sum(axis=1) > 0).astype("int32")

def model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8)(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.ReLU()(hidden))
    net = keras.Model(inputs, outputs)
    net.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return net

if out == "train":
    net = model()
    saver = keras.callbacks.ModelCheckpoint(os.path.join(run, "model_{epoch:02d}.keras"))
    net.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[saver])
    net.save_weights(os.path.join(run, "model_03.weights.h5"))
else:
    averaged = keras.saving.load_model(out)
    members = [keras.saving.load_model(os.path.join(run, f"model_{e:02d}.keras"))
               for e in (3, 2, 1)]
    for index, value in enumerate(averaged.get_weights()):
        stack = np.stack([m.get_weights()[index] for m in members]).astype("float64")
        if np.issubdtype(value.dtype, np.floating):
            np.testing.assert_allclose(value, stack.mean(axis=0), rtol=1e-6, atol=1e-7)
    history = averaged.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    weights_only = model()
    weights_only.load_weights(sys.argv[3])
    for a, b in zip(weights_only.get_weights(), keras.saving.load_model(out).get_weights()):
        np.testing.assert_array_equal(a, b)
    print("ok")
"""


def test_keras_checkpoints_average_load_and_fit(tmp_path, capsys):
    pytest.importorskip("keras")
    script = tmp_path / "keras_run.py"
    script.write_text(KERAS_SCRIPT)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    environment = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}

    def python(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *arguments],
            capture_output=True,
            text=True,
            env=environment,
            check=False,
            timeout=300,
        )

    trained = python(str(run_dir), "train")
    assert trained.returncode == 0, trained.stderr

    # .keras and .weights.h5 of one run are not mixed (one epoch would count twice).
    code, _, err = polyak(["average", str(run_dir), "-o", str(tmp_path / "x.keras")], capsys)
    assert code == 2
    assert "2 layouts were given" in err and "model_03.weights.h5 (keras-weights)" in err

    out = tmp_path / "averaged.keras"
    average_json([str(run_dir / "*.keras"), "-o", str(out)], capsys)
    # .keras -> .weights.h5: the file model.save_weights writes, for model.load_weights.
    weights = tmp_path / "averaged.weights.h5"
    average_json([str(run_dir / "*.keras"), "-o", str(weights)], capsys)
    checked = python(str(run_dir), str(out), str(weights))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().endswith("ok")
