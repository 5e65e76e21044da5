"""Tests for polyak.torch.batchnorm: recomputing BatchNorm running statistics.

Expected statistics come from a float64 numpy reference: the activations entering
each BatchNorm layer are computed by hand (or captured from a train-mode copy of the
model) and reduced with numpy, never read from the code under test.
"""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import polyak  # noqa: E402
from polyak.errors import DataError  # noqa: E402
from polyak.torch.batchnorm import batchnorm_layers, recalibrate_batchnorm  # noqa: E402

EPS = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp(seed: int = 0, momentum: float | None = 0.1) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6, momentum=momentum),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 5),
        torch.nn.BatchNorm1d(5, momentum=momentum),
        torch.nn.Linear(5, 3),
    )
    with torch.no_grad():  # non-trivial affine parameters and stale statistics
        for layer in (model[1], model[4]):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
            layer.running_mean.uniform_(-3.0, 3.0)
            layer.running_var.uniform_(0.1, 5.0)
            layer.num_batches_tracked.fill_(1000)
    return model


def batches_of(sizes: list[int], features: int = 4, seed: int = 1) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [
        torch.tensor(rng.normal(2.0, 3.0, size=(size, features)), dtype=torch.float32)
        for size in sizes
    ]


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def reference_mlp_statistics(model, batches):
    """Per BN layer: (mean over batches of the batch mean, of the unbiased batch variance).

    torch's running_var uses the unbiased variance (divisor n - 1) while the layer
    normalizes in training with the biased one (divisor n).
    """
    w1, b1 = numpy_of(model[0].weight), numpy_of(model[0].bias)
    g1, c1 = numpy_of(model[1].weight), numpy_of(model[1].bias)
    w2, b2 = numpy_of(model[3].weight), numpy_of(model[3].bias)
    means, variances = ([], []), ([], [])
    for batch in batches:
        h1 = numpy_of(batch) @ w1.T + b1
        means[0].append(h1.mean(axis=0))
        variances[0].append(h1.var(axis=0, ddof=1))
        a1 = np.maximum((h1 - h1.mean(axis=0)) / np.sqrt(h1.var(axis=0) + EPS) * g1 + c1, 0.0)
        h2 = a1 @ w2.T + b2
        means[1].append(h2.mean(axis=0))
        variances[1].append(h2.var(axis=0, ddof=1))
    return [(np.mean(means[i], axis=0), np.mean(variances[i], axis=0)) for i in range(2)]


def running_statistics(layer):
    return numpy_of(layer.running_mean), numpy_of(layer.running_var)


def assert_statistics(layer, expected_mean, expected_variance):
    mean, variance = running_statistics(layer)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-5, atol=1e-5)


def state_of(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_same_state(model, state):
    current = model.state_dict()
    assert current.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(current[name], value), name


# -- the statistics -------------------------------------------------------------------


def test_statistics_are_the_mean_over_batches_of_each_batch_statistics():
    model = mlp()
    batches = batches_of([16, 16, 7])  # the short batch counts as much as a full one
    expected = reference_mlp_statistics(model, batches)

    assert recalibrate_batchnorm(model, batches) is model

    for layer, (mean, variance) in zip((model[1], model[4]), expected, strict=True):
        assert_statistics(layer, mean, variance)
        assert int(layer.num_batches_tracked) == 3


def test_convolutional_statistics_reduce_over_batch_and_space():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
    )
    rng = np.random.default_rng(3)
    batches = [
        torch.tensor(rng.normal(1.0, 2.0, size=(5, 2, 6, 6)), dtype=torch.float32) for _ in range(3)
    ]
    # The activations entering each layer, from an independent train-mode copy.
    captured = {1: [], 4: []}
    probe = copy.deepcopy(model).train()
    for index in captured:
        probe[index].register_forward_pre_hook(
            lambda module, args, index=index: captured[index].append(numpy_of(args[0]))
        )
    with torch.no_grad():
        for batch in batches:
            probe(batch)

    recalibrate_batchnorm(model.eval(), batches)

    for index, inputs in captured.items():
        axes = (0, 2, 3)
        mean = np.mean([a.mean(axis=axes) for a in inputs], axis=0)
        count = inputs[0].size // inputs[0].shape[1]
        variance = np.mean([a.var(axis=axes) * count / (count - 1) for a in inputs], axis=0)
        assert_statistics(model[index], mean, variance)
    assert not model.training


@pytest.mark.parametrize(
    ("make_layer", "shape", "axes"),
    [
        (lambda: torch.nn.BatchNorm1d(3), (8, 3, 5), (0, 2)),
        (lambda: torch.nn.BatchNorm3d(3), (4, 3, 2, 3, 2), (0, 2, 3, 4)),
        (lambda: torch.nn.SyncBatchNorm(3), (8, 3), (0,)),
        (lambda: torch.nn.LazyBatchNorm1d(), (8, 3), (0,)),
    ],
    ids=["BatchNorm1d-3d-input", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d"],
)
def test_every_batchnorm_kind_gets_its_input_statistics(make_layer, shape, axes):
    layer = make_layer()
    rng = np.random.default_rng(4)
    batches = [
        torch.tensor(rng.normal(location, scale, size=shape), dtype=torch.float32)
        for location, scale in ((-1.0, 0.5), (2.0, 4.0))
    ]
    recalibrate_batchnorm(torch.nn.Sequential(layer), batches)

    arrays = [numpy_of(batch) for batch in batches]
    mean = np.mean([a.mean(axis=axes) for a in arrays], axis=0)
    variance = np.mean([a.var(axis=axes, ddof=1) for a in arrays], axis=0)
    assert_statistics(layer, mean, variance)
    assert layer.momentum == 0.1


def test_a_layer_called_twice_per_forward_averages_over_its_calls():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.norm(x) + self.norm(2.0 * x + 1.0)

    model = Twice()
    batches = batches_of([10, 10])
    recalibrate_batchnorm(model, batches)

    inputs = [numpy_of(b) for b in batches] + [2.0 * numpy_of(b) + 1.0 for b in batches]
    mean = np.mean([a.mean(axis=0) for a in inputs], axis=0)
    variance = np.mean([a.var(axis=0, ddof=1) for a in inputs], axis=0)
    assert_statistics(model.norm, mean, variance)
    assert int(model.norm.num_batches_tracked) == 4


# -- a real case: averaged checkpoints with stale statistics --------------------------


def test_recalibrating_averaged_checkpoints_improves_test_accuracy(tmp_path):
    """A briefly trained classifier whose BatchNorm statistics lag its weights.

    momentum=0.01 is Keras' default (0.99 there); after 8 short epochs the running
    statistics still remember their initial 0 and 1, while the inputs (offset by 5)
    give pre-activations far from that. Averaging the last 4 epochs' state dicts
    averages those stale statistics too; recalibrating on the training inputs fixes
    them. Over seeds 0..7 the gain is 11 to 25 points; this asserts 5.
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=2.0, size=(4, 10))
    labels = rng.integers(0, 4, 1200)
    inputs = 5.0 + centers[labels] + rng.normal(scale=2.0, size=(1200, 10))
    x = torch.tensor(inputs, dtype=torch.float32)
    y = torch.tensor(labels)
    x_train, y_train, x_test, y_test = x[:600], y[:600], x[600:], y[600:]
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32),
        torch.nn.BatchNorm1d(32, momentum=0.01),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.BatchNorm1d(32, momentum=0.01),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(8):
        model.train()
        order = torch.randperm(600, generator=generator)
        for start in range(0, 600, 50):
            index = order[start : start + 50]
            loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch >= 4:
            torch.save(model.state_dict(), tmp_path / f"model_{epoch}.pt")

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(dim=1) == y_test).float().mean().item()

    averaged = polyak.average(tmp_path / "model_*.pt")
    model.load_state_dict({name: torch.from_numpy(array) for name, array in averaged.items()})
    before = accuracy()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=50
    )
    recalibrate_batchnorm(model, loader)
    after = accuracy()

    assert after - before >= 0.05, (before, after)
    assert after >= 0.85


# -- what is restored -----------------------------------------------------------------


def test_training_flags_and_momentum_are_restored():
    model = mlp()
    model.train()
    model[4].eval()  # a frozen layer inside a training model keeps its own flag
    model[1].momentum = None
    model[4].momentum = 0.3
    flags = {name: module.training for name, module in model.named_modules()}

    recalibrate_batchnorm(model, batches_of([8, 8]))

    assert {name: module.training for name, module in model.named_modules()} == flags
    assert (model[1].momentum, model[4].momentum) == (None, 0.3)


def test_a_failing_forward_restores_flags_momentum_and_statistics():
    model = mlp().eval()
    model[1].momentum = 0.05
    state = state_of(model)

    def forward(model, batch):
        if batch.shape[0] == 3:
            raise RuntimeError("broken batch")
        model(batch)

    with pytest.raises(RuntimeError, match="broken batch"):
        recalibrate_batchnorm(model, batches_of([8, 3, 8]), forward=forward)

    assert not any(module.training for module in model.modules())
    assert (model[1].momentum, model[4].momentum) == (0.05, 0.1)
    assert_same_state(model, state)


# -- batches --------------------------------------------------------------------------


def test_tuple_list_and_dict_batches_and_a_custom_forward_give_the_same_statistics():
    class Keyword(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features, scale=1.0):
            return self.inner(features * scale)

    batches = batches_of([8, 8, 8])
    expected = reference_mlp_statistics(mlp(), batches)
    labels = torch.zeros(8, dtype=torch.long)
    feeds = {
        "tensors": (mlp(), batches, None),
        "tuples": (mlp(), [(b, labels) for b in batches], None),
        "lists": (mlp(), [[b, labels] for b in batches], None),
        "dicts": (Keyword(mlp()), [{"features": b, "scale": 1.0} for b in batches], None),
        "custom": (mlp(), [{"pixels": b} for b in batches], lambda m, b: m(b["pixels"])),
    }
    for name, (model, feed, forward) in feeds.items():
        recalibrate_batchnorm(model, feed, forward=forward, device="cpu")
        net = model.inner if isinstance(model, Keyword) else model
        for layer, (mean, variance) in zip((net[1], net[4]), expected, strict=True):
            mean_now, variance_now = running_statistics(layer)
            np.testing.assert_allclose(mean_now, mean, rtol=1e-5, atol=1e-5, err_msg=name)
            np.testing.assert_allclose(variance_now, variance, rtol=1e-5, atol=1e-5)


def test_max_batches_reads_no_more_than_it_uses():
    batches = batches_of([8, 8, 8, 8])
    taken = []

    def stream():
        for batch in batches:
            taken.append(batch)
            yield batch

    model = mlp()
    recalibrate_batchnorm(model, stream(), max_batches=2)

    assert len(taken) == 2
    expected = reference_mlp_statistics(mlp(), batches[:2])
    assert_statistics(model[1], *expected[0])
    assert int(model[1].num_batches_tracked) == 2


def test_max_batches_may_be_a_numpy_integer_or_a_0d_tensor():
    batches = batches_of([8, 8, 8, 8])
    for count in (np.int64(2), torch.tensor(2)):
        model = mlp()
        recalibrate_batchnorm(model, iter(batches), max_batches=count)
        assert int(model[1].num_batches_tracked) == 2


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batches", "options", "message"),
    [
        ([], {}, r"at least one batch\. Received: an empty list"),
        (iter([]), {}, r"at least one batch\. Received: an empty list_iterator"),
        (batches_of([4]), {"max_batches": 0}, r"positive integer .*Received: 0\."),
        (batches_of([4]), {"max_batches": 2.5}, r"positive integer .*Received: 2\.5\."),
        (batches_of([4]), {"max_batches": True}, r"positive integer .*Received: True\."),
        (torch.zeros(4, 4), {}, r"Received: one tensor of shape \(4, 4\).*x\.split"),
        (5, {}, r"must be an iterable of batches .*Received: int\."),
        ([np.zeros((4, 4))], {}, r"Received: batch 1 is a numpy\.ndarray\..*forward="),
        ([()], {}, r"Received: batch 1 is an empty tuple"),
    ],
)
def test_bad_input_is_refused_with_the_rule_and_the_fix(batches, options, message):
    model = mlp()
    state = state_of(model)
    with pytest.raises(DataError, match=message):
        recalibrate_batchnorm(model, batches, **options)
    assert_same_state(model, state)


def test_a_bad_batch_after_good_ones_leaves_the_statistics_as_they_were():
    model = mlp()
    state = state_of(model)
    with pytest.raises(DataError, match=r"batch 2 is a builtins\.str"):
        recalibrate_batchnorm(model, [*batches_of([8]), "oops", *batches_of([8])])
    assert_same_state(model, state)
    assert not any(module.momentum is None for module in batchnorm_layers(model))


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(DataError, match=r"torch\.nn\.Module\. Received: dict"):
        recalibrate_batchnorm({}, batches_of([4]))


# -- nothing to recalibrate -----------------------------------------------------------


def never_read():
    raise AssertionError("batches were read")
    yield


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
        lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(4, track_running_stats=False)),
    ],
    ids=["no-batchnorm", "untracked-batchnorm"],
)
def test_a_model_without_running_statistics_is_returned_unchanged(make_model):
    model = make_model().eval()
    state = state_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert recalibrate_batchnorm(model, never_read()) is model
    assert_same_state(model, state)
    assert not model.training
    assert batchnorm_layers(model) == []


def test_a_layer_no_batch_reaches_keeps_its_statistics_with_a_warning():
    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.BatchNorm1d(4)
            self.unused = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.used(x)

    model = Branch()
    with torch.no_grad():
        model.unused.running_mean.fill_(7.0)
    state = {name: value.clone() for name, value in model.unused.state_dict().items()}

    with pytest.warns(RuntimeWarning, match=r"no batch reached BatchNorm layer\(s\) unused;"):
        recalibrate_batchnorm(model, batches_of([8]))

    for name, value in model.unused.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert int(model.used.num_batches_tracked) == 1
