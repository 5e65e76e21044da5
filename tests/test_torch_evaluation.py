"""Sweeping PyTorch checkpoints: one reused module, data or --eval, layouts, the CLI."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

from safetensors.torch import save_file  # noqa: E402

from polyak.cli.main import main  # noqa: E402
from polyak.errors import CheckpointError, DataError  # noqa: E402
from polyak.torch import evaluation  # noqa: E402
from polyak.torch.evaluation import sweep  # noqa: E402

EPOCHS = range(10, 16)  # six members, 15 the newest
SCHEMES = ["equal", "linear", "exp:2"]


def build(hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 3),
    )


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = datasets.make_blobs(
        n_samples=700, centers=3, n_features=2, cluster_std=2.5, random_state=2
    )
    x = x.astype(np.float32)
    return {
        "train": (x[:100], y[:100]),
        "test": (x[100:400], y[100:400]),
        "val": (x[400:], y[400:]),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> dict:
    """state_dict files after each of the last epochs of a bouncy run, and their tensors."""
    root = tmp_path_factory.mktemp("torch-run")
    files = tmp_path_factory.mktemp("torch-data")
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    x, y = (torch.from_numpy(a) for a in data["train"])
    states = []
    for epoch in range(EPOCHS.stop):
        for start in range(0, 100, 20):
            loss = torch.nn.functional.cross_entropy(
                model(x[start : start + 20]), y[start : start + 20]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch in EPOCHS:
            torch.save(model.state_dict(), root / f"checkpoint_{epoch}.pt")
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    for split in ("test", "val", "train"):
        np.savez(files / f"{split}.npz", x=data[split][0], y=data[split][1])
    return {"dir": root, "data": files, "states": states[::-1]}  # newest first


def formula_weights(scheme: str, n: int) -> np.ndarray:
    i = np.arange(1, n + 1, dtype=np.float64)
    raw = {"equal": np.ones(n), "linear": (n - i + 1) / n}.get(scheme)
    if raw is None:
        raw = np.exp(-i / float(scheme.partition(":")[2]))
    return raw / raw.sum()


def reference_state(states: list[dict], weights: np.ndarray) -> dict:
    """numpy.average in float64 of floating tensors; integer ones from the newest."""
    averaged = {}
    for name, newest in states[0].items():
        if newest.is_floating_point():
            stacked = [s[name].double().numpy() for s in states[: len(weights)]]
            value = np.average(stacked, axis=0, weights=weights)
            averaged[name] = torch.from_numpy(value).to(newest.dtype)
        else:
            averaged[name] = newest.clone()
    return averaged


def reference_accuracy(state: dict, x: np.ndarray, y: np.ndarray) -> float:
    model = build()
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(-1).numpy()
    return float(np.mean(predicted == y))


@pytest.fixture(scope="module")
def swept(run, data):
    return sweep(run["dir"], data["test"], data["val"], model=build, schemes=",".join(SCHEMES))


def test_every_candidate_scores_like_a_fresh_module_with_numpy_average(swept, run, data):
    x, y = data["test"]
    x_val, y_val = data["val"]
    assert sorted((c.scheme, c.n) for c in swept.candidates) == sorted(
        (s, n) for s in SCHEMES for n in range(1, len(EPOCHS) + 1)
    )
    for candidate in swept.candidates:
        state = reference_state(run["states"], formula_weights(candidate.scheme, candidate.n))
        assert candidate.test == reference_accuracy(state, x, y), candidate
        assert candidate.validation == reference_accuracy(state, x_val, y_val), candidate
    singles = [reference_accuracy(state, x, y) for state in run["states"]]
    assert [s.test for s in swept.single] == singles
    assert swept.selected_on == "validation"
    # The members differ: the run bounces.
    assert len(set(singles)) > 1


def test_one_module_is_built_and_reused(run, data, monkeypatch):
    built = []

    def factory():
        built.append(build())
        return built[-1]

    loads = []
    original = evaluation.load_tensors

    def counting_load(module, tensors, source="checkpoint"):
        loads.append(module)
        return original(module, tensors, source)

    monkeypatch.setattr(evaluation, "load_tensors", counting_load)
    sweep(run["dir"], data["test"], model=factory, schemes="equal")
    assert len(built) == 1
    assert len(loads) == 2 * len(EPOCHS) and all(m is built[0] for m in loads)


def test_loss_is_cross_entropy_of_logits_and_lower_is_better(run, data):
    x, y = data["test"]
    result = sweep(run["dir"], data["test"], model=build, schemes="linear", metric="loss")
    assert result.metric == "loss" and result.higher_is_better is False
    state = reference_state(run["states"], formula_weights("linear", 3))
    model = build()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    expected = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    (candidate,) = [c for c in result.candidates if c.n == 3]
    assert candidate.test == pytest.approx(expected, rel=1e-6)
    assert result.best.test == min(c.test for c in result.candidates)


def test_evaluate_callable_gets_the_module(run, data):
    x, y = data["test"]
    seen = []

    def evaluate(module) -> dict:
        seen.append(module)
        module.eval()
        with torch.no_grad():
            predicted = module(torch.from_numpy(x)).argmax(-1).numpy()
        return {
            "test": float(np.mean(predicted == y)),
            "validation": float(np.mean(predicted == y)),
        }

    result = sweep(run["dir"], evaluate=evaluate, model=build, schemes="equal,greedy")
    assert len({id(m) for m in seen}) == 1
    assert result.selected_on == "validation"
    assert result.candidates_of("greedy")


def test_a_model_of_another_architecture_is_refused(run, data):
    with pytest.raises(CheckpointError, match=r"does not fit the model"):
        sweep(run["dir"], data["test"], model=lambda: build(hidden=8), schemes="equal")


def test_a_model_with_other_names_is_refused_listing_them(run, data):
    def renamed():
        model = torch.nn.Module()
        model.net = build()
        return model

    with pytest.raises(
        CheckpointError, match=r"net\.0\.weight.*missing.*0\.weight.*not in the model"
    ):
        sweep(run["dir"], data["test"], model=renamed, schemes="equal")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (None, r"give the architecture with --model"),
        ("no_module_polyak_xyz:build", r"cannot import module no_module_polyak_xyz"),
        (lambda: "not a module", r"returned str, not a torch\.nn\.Module"),
    ],
)
def test_bad_models_are_refused(run, data, model, message):
    with pytest.raises(DataError, match=message):
        sweep(run["dir"], data["test"], model=model)


def test_a_user_recalibration_is_scored_beside_the_plain_candidate(run, data):
    def stale(module):  # a stand-in "recalibration" that visibly changes the statistics
        module[1].running_mean.fill_(5.0)

    result = sweep(run["dir"], data["test"], model=build, schemes="equal", recalibrate=stale)
    assert result.recalibrated
    assert all(c.recalibrated_test is not None for c in result.candidates)
    assert any(c.recalibrated_test != c.test for c in result.candidates)


# ---------------------------------------------------------------- layouts


def test_sweep_over_lightning_checkpoints_skips_last_ckpt(run, data, tmp_path):
    for epoch, state in zip(reversed(EPOCHS), run["states"], strict=True):
        checkpoint = {"state_dict": state, "epoch": epoch, "global_step": 5 * (epoch + 1)}
        torch.save(checkpoint, tmp_path / f"epoch={epoch}-step={5 * (epoch + 1)}.ckpt")
    torch.save({"state_dict": run["states"][-1]}, tmp_path / "last.ckpt")
    result = sweep(tmp_path, data["test"], model=build, schemes="equal")
    assert result.members[0].path.name == "epoch=15-step=80.ckpt"
    assert len(result.members) == len(EPOCHS)


def test_sweep_over_sharded_hugging_face_checkpoints(run, data, tmp_path):
    for epoch, state in zip(reversed(EPOCHS), run["states"], strict=True):
        directory = tmp_path / f"checkpoint-{epoch}"
        directory.mkdir()
        names = list(state)
        shards = {
            "model-00001-of-00002.safetensors": names[:3],
            "model-00002-of-00002.safetensors": names[3:],
        }
        for shard, shard_names in shards.items():
            save_file(
                {n: state[n].contiguous() for n in shard_names}, directory / shard, {"format": "pt"}
            )
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {n: shard for shard, shard_names in shards.items() for n in shard_names},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        torch.save({"state": {}}, directory / "optimizer.pt")
    result = sweep(tmp_path, data["test"], model=build, schemes="linear")
    plain = sweep(run["dir"], data["test"], model=build, schemes="linear")
    assert [c.test for c in result.candidates] == [c.test for c in plain.candidates]


# ---------------------------------------------------------------- the command line


def write_module(directory: Path, test_npz: Path) -> str:
    name = "polyak_test_torch_net"
    (directory / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            import torch

            def build():
                torch.manual_seed(0)
                return torch.nn.Sequential(
                    torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                    torch.nn.Linear(16, 3),
                )

            def evaluate(module):
                data = np.load({str(test_npz)!r})
                module.eval()
                with torch.no_grad():
                    predicted = module(torch.from_numpy(data["x"])).argmax(-1).numpy()
                return float(np.mean(predicted == data["y"]))
            """
        )
    )
    return name


def run_cli(arguments: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_cli_sweep_with_model_and_data_writes_a_loadable_best(run, tmp_path, monkeypatch, capsys):
    name = write_module(tmp_path, run["data"] / "test.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    arguments = [
        "sweep", str(run["dir"]), "--model", f"{name}:build",
        "--data", str(run["data"] / "test.npz"), "--val", str(run["data"] / "val.npz"),
        "--schemes", "equal,linear,greedy", "--json", "report.json", "--out-model", "best.pt",
    ]  # fmt: skip
    code, out, err = run_cli(arguments, capsys)
    assert code == 0, err
    assert "> 1: single=" in out and "greedy" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["selected_on"] == "validation"
    model = build()
    model.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True), strict=True)


def test_cli_sweep_with_eval_chooses_on_test_and_says_so(run, tmp_path, monkeypatch, capsys):
    name = write_module(tmp_path, run["data"] / "test.npz")
    monkeypatch.syspath_prepend(str(tmp_path))
    arguments = ["sweep", str(run["dir"]), "--model", f"{name}:build", "--eval", f"{name}:evaluate"]
    code, out, err = run_cli(arguments, capsys)
    assert code == 0, err
    assert "chosen on the test data itself" in " ".join(out.split())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give test data with --data, or an evaluation function with --eval"),
        (["--data", "TEST", "--eval", "m:f"], "give test data with --data, or"),
        (["--data", "TEST"], "give the architecture with --model"),
        (["--data", "TEST", "--model", "no_module_polyak_xyz:f"], "cannot import module"),
        (["--data", "TEST", "--model", "M", "--batch-size", "0"], "--batch-size must be"),
    ],
)
def test_cli_sweep_refusals_exit_2_with_one_line(
    run, tmp_path, monkeypatch, capsys, extra, message
):
    name = write_module(tmp_path, run["data"] / "test.npz")
    monkeypatch.syspath_prepend(str(tmp_path))
    replace = {"TEST": str(run["data"] / "test.npz"), "M": f"{name}:build"}
    code, _, err = run_cli(["sweep", str(run["dir"]), *[replace.get(a, a) for a in extra]], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_recalibration_on_data_scores_each_candidate_both_ways(run, data):
    from polyak.torch import recalibrate_batchnorm

    x, y = data["test"]
    result = sweep(
        run["dir"], data["test"], model=build, schemes="equal", recalibrate=data["train"]
    )
    for candidate in result.candidates:
        state = reference_state(run["states"], formula_weights("equal", candidate.n))
        model = build()
        model.load_state_dict(state)
        recalibrate_batchnorm(model, [torch.from_numpy(data["train"][0])])
        model.eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(x)).argmax(-1).numpy()
        assert candidate.recalibrated_test == float(np.mean(predicted == y))
        assert candidate.test == reference_accuracy(state, x, y)


def test_cli_recalibrate_reports_both_numbers_and_writes_the_chosen_variant(
    run, tmp_path, monkeypatch, capsys
):
    name = write_module(tmp_path, run["data"] / "test.npz")
    monkeypatch.syspath_prepend(str(tmp_path))
    arguments = [
        "sweep", str(run["dir"]), "--model", f"{name}:build",
        "--data", str(run["data"] / "test.npz"), "--val", str(run["data"] / "val.npz"),
        "--recalibrate", str(run["data"] / "train.npz"), "--schemes", "equal",
        "--json", str(tmp_path / "r.json"), "--out-model", str(tmp_path / "best.pt"),
    ]  # fmt: skip
    code, out, err = run_cli(arguments, capsys)
    assert code == 0, err
    assert "->" in out and "BatchNorm recalibration" in " ".join(out.split())
    report = json.loads((tmp_path / "r.json").read_text())
    assert all("recalibrated" in c for c in report["candidates"])
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    n = report["best"]["n"]
    averaged = reference_state(run["states"], formula_weights("equal", n))
    statistics = best["1.running_mean"]
    if report["best"]["recalibrated"]:
        from polyak.torch import recalibrate_batchnorm

        model = build()
        model.load_state_dict(averaged)
        recalibrate_batchnorm(model, [torch.from_numpy(np.load(run["data"] / "train.npz")["x"])])
        torch.testing.assert_close(statistics, model[1].running_mean)
    else:
        torch.testing.assert_close(statistics, averaged["1.running_mean"])


def test_a_module_the_caller_gave_gets_its_state_back(run, data):
    model = build()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    sweep(run["dir"], data["test"], model=model, schemes="equal")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def reference_outputs(state: dict, x: np.ndarray) -> np.ndarray:
    model = build()
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).double().numpy()


def test_per_example_outcomes_for_accuracy(swept, run, data):
    x, y = data["test"]
    for key, state in (
        ("final", run["states"][0]),
        ("best_single", run["states"][swept.best_single]),
        (
            "selected",
            reference_state(run["states"], formula_weights(swept.best.scheme, swept.best.n)),
        ),
    ):
        outcomes = swept.outcomes[key]
        assert outcomes.dtype == bool
        np.testing.assert_array_equal(outcomes, reference_outputs(state, x).argmax(-1) == y)
    assert swept.comparisons()["final"].p_value is not None


def test_per_example_outcomes_for_loss(run, data):
    x, y = data["test"]
    result = sweep(run["dir"], data["test"], model=build, schemes="equal", metric="loss")
    logits = torch.from_numpy(reference_outputs(run["states"][0], x))
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none")
    np.testing.assert_allclose(result.outcomes["final"], expected.numpy(), rtol=1e-6)
    assert result.single[0].test == pytest.approx(float(expected.mean()), rel=1e-12)


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (lambda y: y + 5, "y holds labels 5 to 7, but the model outputs 3 classes (0 to 2)"),
        (lambda y: np.eye(4, dtype=np.float32)[y], "y is one-hot of width 4"),
    ],
)
def test_labels_the_model_cannot_output_are_refused(run, data, metric, labels, message):
    """Before: accuracy scored every candidate 0.0 silently; loss was an internal error."""
    x, y = data["test"]
    with pytest.raises(DataError, match=re.escape(message)):
        sweep(run["dir"], (x, labels(y)), model=build, schemes="equal", metric=metric)
