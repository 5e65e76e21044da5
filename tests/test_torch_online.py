"""Tests of polyak.torch.online: OnlineAverage on tiny real models, against float64 references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from polyak.errors import OutputError, SchemeError  # noqa: E402
from polyak.online import AveragingSchedule  # noqa: E402
from polyak.posthoc import gamma_of  # noqa: E402
from polyak.torch.online import STATE_KEY, OnlineAverage  # noqa: E402


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2)
    )


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator))
        for _ in range(count)
    ]


def train_step(model, optimizer, batch) -> None:
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def snapshot(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's tensors as float64 (integers as they are), for references."""
    return {
        name: value.detach().to(torch.float64).numpy()
        if value.is_floating_point()
        else value.detach().clone().numpy()
        for name, value in model.state_dict().items()
    }


def weighted(snapshots: list[dict[str, np.ndarray]], weights) -> dict[str, np.ndarray]:
    return {
        name: sum(w * s[name] for w, s in zip(weights, snapshots, strict=True))
        for name in snapshots[0]
    }


def average_arrays(average: OnlineAverage) -> dict[str, np.ndarray]:
    return {
        name: tensor.to(torch.float64).numpy()
        for name, tensor in average.state_dict()["average"].items()
    }


# ---------------------------------------------------------------- precision


def test_a_bf16_models_average_moves_as_a_float64_computation_says():
    decay, steps = 0.9999, 1000
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-2.0)
    average = OnlineAverage(model, decay=decay)
    naive = {name: p.detach().clone() for name, p in model.named_parameters()}  # a bf16 EMA
    reference = None
    for step in range(1, steps + 1):
        with torch.no_grad():  # small steps: the weights drift by 0.002 a step, rounded to bf16
            model.weight.copy_(torch.full((4, 4), 1.0 + 0.002 * step))
            model.bias.copy_(torch.full((4,), -2.0 - 0.002 * step))
        average.update(step)
        values = {
            name: p.detach().to(torch.float64).numpy() for name, p in model.named_parameters()
        }
        if reference is None:
            reference = values
        else:
            reference = {k: decay * reference[k] + (1 - decay) * values[k] for k in values}
        for name, parameter in model.named_parameters():
            naive[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)
    kept = average_arrays(average)
    assert {tensor.dtype for tensor in average.state_dict()["average"].values()} == {torch.float32}
    for name in ("weight", "bias"):
        moved = reference[name] - np.array([1.0, -2.0][name == "bias"])
        assert np.all(np.abs(moved) > 0.09)  # the float64 average moved by about 0.1
        # An fp32 average rounds each update by at most half an ulp of |a| (< 4).
        bound = steps * float(np.spacing(np.float32(4.0))) / 2
        np.testing.assert_allclose(kept[name], reference[name], rtol=0, atol=bound)
        # A bf16 average rounds every update of 1e-4 * (theta - a) away: it never moved.
        assert torch.equal(naive[name], torch.full_like(naive[name], [1.0, -2.0][name == "bias"]))
    with average.swapped():
        for name, parameter in model.named_parameters():
            # Swapped in: the average rounded to bf16 (to nearest).
            rounded = reference[name].astype(np.float32).astype(ml_dtypes.bfloat16)
            ulp = np.abs(rounded.astype(np.float64)) * 2.0**-7
            np.testing.assert_array_less(
                np.abs(parameter.detach().to(torch.float64).numpy() - reference[name]),
                ulp / 2 + steps * float(np.spacing(np.float32(4.0))) / 2,
            )
            assert parameter.dtype == torch.bfloat16


def test_an_fp32_model_repeated_gives_itself_back_exactly():
    model = make_net()
    raw = snapshot(model)
    average = OnlineAverage(model, half_life=3)
    for step in range(1, 20):
        average.update(step)
    with average.swapped():
        for name, value in snapshot(model).items():
            np.testing.assert_array_equal(value, raw[name])


# ---------------------------------------------------------------- schedules on a model


def drifting_states(count: int) -> list[dict[str, torch.Tensor]]:
    """A random walk of Linear(3, 2) weights, as float32 tensors."""
    rng = np.random.default_rng(5)
    weight, bias = rng.normal(size=(2, 3)), rng.normal(size=2)
    states = []
    for _ in range(count):
        weight = weight + 0.05 * rng.normal(size=weight.shape)
        bias = bias + 0.05 * rng.normal(size=bias.shape)
        states.append(
            {
                "weight": torch.tensor(weight, dtype=torch.float32),
                "bias": torch.tensor(bias, dtype=torch.float32),
            }
        )
    return states


def run_on_states(states, **arguments) -> tuple[OnlineAverage, list[int]]:
    model = torch.nn.Linear(3, 2)
    average = OnlineAverage(model, **arguments)
    updated = []
    for step, state in enumerate(states, start=1):
        model.load_state_dict(state)
        if average.update(step):
            updated.append(step)
    return average, updated


@pytest.mark.parametrize("update_every", [1, 10])
def test_half_life_gives_the_same_time_scale_with_update_every_1_and_10(update_every):
    half_life, total = 30.0, 200
    states = drifting_states(total)
    average, updated = run_on_states(states, half_life=half_life, update_every=update_every)
    assert updated == list(range(update_every, total + 1, update_every))
    # Intended weights, from the closed form (not from the schedule): a step's weight
    # halves every half_life steps; an update stands for the update_every steps before it.
    rate = 0.5 ** (1 / half_life)
    steps = np.array(updated, dtype=float)
    weights = (1 - rate**update_every) * rate ** (total - steps)
    weights[0] = rate ** (total - steps[0])
    members = [{k: v.double().numpy() for k, v in states[s - 1].items()} for s in updated]
    expected = weighted(members, weights)
    # The every-step EMA's weights, summed over each block of update_every steps.
    every_step = (1 - rate) * rate ** (total - np.arange(1, total + 1, dtype=float))
    every_step[0] = rate ** (total - 1)
    np.testing.assert_allclose(
        every_step.reshape(-1, update_every).sum(axis=1), weights, rtol=1e-10
    )
    for name, value in average_arrays(average).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_decay_per_step_with_update_every_equals_the_half_life_it_implies():
    states = drifting_states(60)
    by_decay, _ = run_on_states(states, decay=0.5 ** (1 / 12), update_every=10)
    by_half_life, _ = run_on_states(states, half_life=12, update_every=10)
    for name, value in average_arrays(by_decay).items():
        np.testing.assert_allclose(value, average_arrays(by_half_life)[name], rtol=1e-6)


def test_polyak_from_start_step_is_the_equal_average_of_the_update_steps():
    model, optimizer_steps = make_net(), batches(23)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    average = OnlineAverage(model, mode="polyak", start_step=5, update_every=2)
    recorded, updated = [], []
    for step, batch in enumerate(optimizer_steps, start=1):
        train_step(model, optimizer, batch)
        if average.update(step):
            updated.append(step)
            recorded.append(snapshot(model))
    assert updated == list(range(7, 24, 2))
    expected = weighted(recorded, np.full(len(recorded), 1 / len(recorded)))
    kept = average_arrays(average)
    assert set(kept) == set(average.averaged_names)
    for name in average.averaged_names:
        np.testing.assert_allclose(kept[name], expected[name], rtol=1e-5, atol=1e-7)


def test_power_mode_weights_steps_as_the_profile_says():
    sigma_rel, total = 0.1, 40
    states = drifting_states(total)
    average, _ = run_on_states(states, mode="power", sigma_rel=sigma_rel)
    exponent = gamma_of(sigma_rel) + 1
    tau = np.arange(1, total + 1, dtype=float)
    weights = (tau**exponent - (tau - 1) ** exponent) / total**exponent
    expected = weighted([{k: v.double().numpy() for k, v in s.items()} for s in states], weights)
    for name, value in average_arrays(average).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- buffers


def test_integer_buffers_are_copied_and_floating_ones_averaged_by_default():
    model, data = make_net(), batches(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = OnlineAverage(model)  # polyak from the start
    recorded = []
    for step, batch in enumerate(data, start=1):
        train_step(model, optimizer, batch)
        average.update(step)
        recorded.append(snapshot(model))
    assert "1.num_batches_tracked" not in average.averaged_names
    assert "1.running_mean" in average.averaged_names
    expected = weighted(recorded, np.full(6, 1 / 6))
    with average.swapped():
        state = model.state_dict()
        assert state["1.num_batches_tracked"].dtype == torch.int64
        assert int(state["1.num_batches_tracked"]) == 6  # the raw model's count
        np.testing.assert_allclose(
            state["1.running_mean"].numpy(), expected["1.running_mean"], rtol=1e-5, atol=1e-7
        )
    exported = average.averaged_state_dict()
    assert int(exported["1.num_batches_tracked"]) == 6


def test_buffers_copy_leaves_floating_buffers_to_the_raw_model():
    model, data = make_net(), batches(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = OnlineAverage(model, buffers="copy")
    assert [n for n in average.averaged_names if "running" in n] == []
    for step, batch in enumerate(data, start=1):
        train_step(model, optimizer, batch)
        average.update(step)
    raw = snapshot(model)
    with average.swapped():
        np.testing.assert_array_equal(snapshot(model)["1.running_var"], raw["1.running_var"])
        assert not np.array_equal(snapshot(model)["0.weight"], raw["0.weight"])


# ---------------------------------------------------------------- swapping


class Boom(Exception):
    pass


def test_swapped_restores_the_raw_weights_bit_for_bit_also_on_error():
    model = make_net().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = OnlineAverage(model, half_life=2)
    for step, (x, y) in enumerate(batches(5), start=1):
        train_step(model, optimizer, (x.bfloat16(), y.bfloat16()))
        average.update(step)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Boom):
        with average.swapped() as swapped_model:
            assert swapped_model is model
            assert not torch.equal(model.state_dict()["0.weight"], raw["0.weight"])
            with average.swapped():  # nested: nothing more to do
                pass
            assert average.is_swapped
            raise Boom
    assert not average.is_swapped
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_raw_tensors_are_the_raw_weights_also_while_swapped_in():
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = OnlineAverage(model, half_life=2)
    for step, batch in enumerate(batches(4), start=1):
        train_step(model, optimizer, batch)
        average.update(step)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    names += ["3.weight", "3.bias"]
    outside = average.raw_tensors()
    assert list(outside) == names
    with average.swapped():
        inside = average.raw_tensors()
        assert not torch.equal(model.state_dict()["0.weight"], raw["0.weight"])
    for name in names:
        assert torch.equal(outside[name], raw[name]) and torch.equal(inside[name], raw[name])
    tied = OnlineAverage(TiedNet())
    assert sorted(tied.raw_tensors()) == ["embed.weight", "head.weight"]


def test_misuse_of_swapping_is_refused():
    model = make_net()
    average = OnlineAverage(model)
    average.update(1)
    with pytest.raises(RuntimeError, match="swap_out\\(\\) follows swap_in\\(\\)"):
        average.swap_out()
    average.swap_in()
    with pytest.raises(RuntimeError, match="already swapped in"):
        average.swap_in()
    with pytest.raises(RuntimeError, match="would average them into themselves"):
        average.update(2)
    average.swap_out()
    # The swap is the one both framework averages share (polyak.online).
    from polyak.online import SwappableAverage

    assert isinstance(average, SwappableAverage)


def test_before_the_first_update_the_model_is_its_own_average():
    model = make_net()
    raw = snapshot(model)
    average = OnlineAverage(model, start_step=10)
    average.update(3)
    with average.swapped():
        for name, value in snapshot(model).items():
            np.testing.assert_array_equal(value, raw[name])
    with pytest.raises(ValueError, match="the average has not started: no update step yet"):
        average.export("never.safetensors")


def test_steps_default_to_counting_calls_and_must_not_decrease():
    average = OnlineAverage(torch.nn.Linear(2, 2), update_every=2)
    assert [average.update() for _ in range(4)] == [False, True, False, True]
    assert average.last_step == 4 and average.updates == 2
    assert average.update(4) is False  # gradient accumulation: the same optimizer step
    with pytest.raises(ValueError, match="steps must not decrease; received step 3 after step 4"):
        average.update(3)


# ---------------------------------------------------------------- resuming and exporting


def test_resuming_from_a_checkpoint_continues_exactly_from_the_raw_weights(tmp_path):
    data = batches(14)
    arguments = {"half_life": 4, "start_step": 2, "update_every": 3}

    def fresh(seed):
        model = make_net(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, OnlineAverage(model, **arguments)

    model, optimizer, average = fresh(0)
    for step, batch in enumerate(data, start=1):
        train_step(model, optimizer, batch)
        average.update(step)

    model_a, optimizer_a, average_a = fresh(0)
    for step, batch in enumerate(data[:8], start=1):
        train_step(model_a, optimizer_a, batch)
        average_a.update(step)
    with average_a.swapped():  # an evaluation just before saving changes nothing
        pass
    torch.save(
        {
            "model": model_a.state_dict(),
            "optimizer": optimizer_a.state_dict(),
            STATE_KEY: average_a.state_dict(),
        },
        tmp_path / "checkpoint.pt",
    )
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    model_b, optimizer_b, average_b = fresh(1)  # other initial weights, all overwritten
    model_b.load_state_dict(checkpoint["model"])
    optimizer_b.load_state_dict(checkpoint["optimizer"])
    average_b.load_state_dict(checkpoint[STATE_KEY])
    for step, batch in enumerate(data[8:], start=9):
        train_step(model_b, optimizer_b, batch)
        average_b.update(step)

    assert average_b.updates == average.updates and average_b.last_step == 14
    for name, value in model.state_dict().items():
        assert torch.equal(model_b.state_dict()[name], value), name
    for name, value in average.state_dict()["average"].items():
        assert torch.equal(average_b.state_dict()["average"][name], value), name


def test_loading_a_state_of_another_schedule_or_model_is_refused():
    average = OnlineAverage(make_net(), half_life=4)
    state = average.state_dict()
    with pytest.raises(ValueError, match=r"saved by an average with AveragingSchedule\(mode='ema'"):
        OnlineAverage(make_net(), half_life=5).load_state_dict(state)
    with pytest.raises(
        ValueError,
        match="does not match the model's tensors: missing 'weight', 'bias'; unexpected '0.we",
    ):
        OnlineAverage(torch.nn.Linear(3, 6), half_life=4).load_state_dict(state)
    with pytest.raises(ValueError, match="expected the state of an OnlineAverage"):
        average.load_state_dict({"average": {}})


class TiedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_writes_a_normal_model_file_holding_the_average(tmp_path, suffix):
    model, data = make_net(), batches(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = OnlineAverage(model)
    recorded = []
    for step, batch in enumerate(data, start=1):
        train_step(model, optimizer, batch)
        average.update(step)
        recorded.append(snapshot(model))
    raw = snapshot(model)
    path = average.export(tmp_path / f"averaged{suffix}")
    if suffix == ".safetensors":
        state = safetensors_torch.load_file(path)
    else:
        state = torch.load(path, weights_only=True)
    fresh = make_net(seed=3)
    fresh.load_state_dict(state, strict=True)
    expected = weighted(recorded, np.full(5, 1 / 5))
    for name, value in snapshot(fresh).items():
        if name.endswith("num_batches_tracked"):
            assert value == 5
        else:
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)
    for name, value in snapshot(model).items():  # the model still holds its raw weights
        np.testing.assert_array_equal(value, raw[name])
    with pytest.raises(OutputError, match="exists; pass overwrite=True"):
        average.export(path)
    average.export(path, overwrite=True)


def test_tied_weights_are_averaged_once_and_export_loads_strictly(tmp_path):
    model = TiedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    average = OnlineAverage(model, decay=0.5)
    assert average.averaged_names == ["embed.weight", "head.weight"]
    for step in range(1, 4):
        loss = model(torch.tensor([0, 1, 2, 3])).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average.update(step)
    path = average.export(tmp_path / "tied.safetensors")
    fresh = TiedNet()
    fresh.load_state_dict(safetensors_torch.load_file(path), strict=True)
    with average.swapped():
        assert torch.equal(fresh.embed.weight, model.embed.weight)
        assert fresh.head.weight is fresh.embed.weight


def test_bad_arguments_are_refused_with_the_rule():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module; received dict"):
        OnlineAverage({})
    with pytest.raises(ValueError, match="buffers must be one of 'average', 'copy'"):
        OnlineAverage(torch.nn.Linear(2, 2), buffers="ema")
    with pytest.raises(SchemeError, match="mode 'polyak' takes no parameter"):
        OnlineAverage(torch.nn.Linear(2, 2), mode="polyak", half_life=3)
    counter = torch.nn.Module()
    counter.register_buffer("count", torch.zeros((), dtype=torch.int64))
    with pytest.raises(ValueError, match="no floating parameters or buffers to average"):
        OnlineAverage(counter)
    with pytest.raises(ValueError, match=r"export writes \.safetensors, \.pt, \.pth files"):
        OnlineAverage(torch.nn.Linear(2, 2)).export("model.h5")


def test_repr_and_schedule_describe_the_average():
    average = OnlineAverage(torch.nn.Linear(2, 2), sigma_rel=0.1, update_every=4)
    assert average.schedule == AveragingSchedule(sigma_rel=0.1, update_every=4)
    assert repr(average).startswith("OnlineAverage(power EMA, sigma_rel 0.1")
