"""Tests of polyak.formats.keras on real Keras 3 files built in tmp_path."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"

import shutil
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from polyak.errors import CheckpointError, OutputError
from polyak.files import atomic_output
from polyak.formats import open_checkpoint
from polyak.formats.keras import (
    KerasArchiveReader,
    KerasLegacyH5Reader,
    KerasWeightsReader,
    write_keras_archive,
    write_keras_legacy_h5,
    write_keras_weights,
)

# suffix -> (reader class, writer)
FORMATS = {
    ".weights.h5": (KerasWeightsReader, write_keras_weights),
    ".keras": (KerasArchiveReader, write_keras_archive),
    ".h5": (KerasLegacyH5Reader, write_keras_legacy_h5),
}


def build_model(batchnorm: bool) -> keras.Model:
    """The classic 2-25-3 classifier, optionally with a BatchNormalization layer."""
    layers = [keras.Input((2,)), keras.layers.Dense(25, activation="relu", name="dense")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="batch_normalization"))
    layers.append(keras.layers.Dense(3, activation="softmax", name="dense_1"))
    model = keras.Sequential(layers, name="sequential")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="categorical_crossentropy"
    )
    return model


def save(model: keras.Model, path: Path) -> Path:
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        model.save(path)
    return path


def expected_tensors(model: keras.Model, suffix: str) -> dict[str, np.ndarray]:
    """The tensor names each format should list, mapped to the model's variable values.

    Built from the Keras layouts independently of the reader: ``layers/<layer>/vars/<i>``
    for Keras 3 weights, ``model_weights/<layer>/<variable path>`` for legacy HDF5.
    """
    tensors = {}
    for layer in model.layers:
        for index, variable in enumerate(layer.weights):
            if suffix == ".h5":
                name = f"model_weights/{layer.name}/{variable.path}"
            else:
                name = f"layers/{layer.name}/vars/{index}"
            tensors[name] = np.asarray(keras.ops.convert_to_numpy(variable.value))
    return tensors


@pytest.fixture(scope="module", params=[False, True], ids=["classic", "batchnorm"])
def trained(request, tmp_path_factory):
    """A model trained one epoch (so optimizer state exists), saved in the three formats."""
    keras.utils.set_random_seed(0)
    model = build_model(batchnorm=request.param)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, size=64), 3)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    folder = tmp_path_factory.mktemp("keras")
    files = {suffix: save(model, folder / f"model{suffix}") for suffix in FORMATS}
    return request.param, model, files


@pytest.fixture(params=list(FORMATS))
def suffix(request):
    return request.param


def assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# -- reading ---------------------------------------------------------------------------------


def test_names_map_one_to_one_to_model_variables(trained, suffix):
    _, model, files = trained
    reader_class, _ = FORMATS[suffix]
    with open_checkpoint(files[suffix]) as reader:
        assert isinstance(reader, reader_class)
        names = reader.names()
        assert len(names) == len(set(names)) == len(model.weights)
        tensors = {name: reader.read(name) for name in names}
    assert_same_tensors(tensors, expected_tensors(model, suffix))


def test_info_matches_data_without_reading(trained, suffix):
    _, _, files = trained
    reader_class, _ = FORMATS[suffix]
    with reader_class(files[suffix]) as reader:
        for name in reader.names():
            info = reader.info(name)
            array = reader.read(name)
            assert info.shape == array.shape
            assert info.dtype == "float32"
            assert info.nbytes == array.nbytes


def test_optimizer_state_is_not_listed(trained, suffix):
    _, _, files = trained
    reader_class, _ = FORMATS[suffix]
    with h5py.File(files[".weights.h5"]) as file:
        assert len(file["optimizer/vars"]) > 0  # the model was trained: there is state to skip
    with reader_class(files[suffix]) as reader:
        names = reader.names()
        assert not [name for name in names if "optimizer" in name]
        hidden = "optimizer/vars/0" if suffix != ".h5" else "optimizer_weights/sgd/iteration"
        with pytest.raises(CheckpointError, match=f"no model tensor named '{hidden}'"):
            reader.read(hidden)


def test_names_are_stable_and_in_natural_order(tmp_path):
    path = tmp_path / "many.weights.h5"
    with h5py.File(path, "w") as file:
        for index in (11, 2, 0, 10, 1):
            file[f"layers/wide/vars/{index}"] = np.full((2,), index, dtype="float32")
        file["vars/0"] = np.float32(7.0)  # a model-level scalar variable
        file["optimizer/vars/0"] = np.int64(3)
    with KerasWeightsReader(path) as first, KerasWeightsReader(path) as second:
        assert first.names() == second.names()
        assert first.names() == [
            "layers/wide/vars/0",
            "layers/wide/vars/1",
            "layers/wide/vars/2",
            "layers/wide/vars/10",
            "layers/wide/vars/11",
            "vars/0",
        ]
        scalar = first.read("vars/0")
        assert isinstance(scalar, np.ndarray)
        assert scalar.shape == ()
        assert first.info("vars/0").shape == ()
        assert scalar == np.float32(7.0)


def test_big_endian_data_comes_back_native(tmp_path):
    path = tmp_path / "big.weights.h5"
    values = np.arange(6, dtype=">f8").reshape(2, 3)
    with h5py.File(path, "w") as file:
        file["layers/dense/vars/0"] = values
    with KerasWeightsReader(path) as reader:
        assert reader.info("layers/dense/vars/0").dtype == "float64"
        array = reader.read("layers/dense/vars/0")
    assert array.dtype.isnative
    np.testing.assert_array_equal(array, values)


def test_compressed_keras_archive_is_extracted_and_cleaned_up(trained, tmp_path):
    _, model, files = trained
    compressed = tmp_path / "compressed.keras"
    with (
        zipfile.ZipFile(files[".keras"]) as source,
        zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    reader = KerasArchiveReader(compressed)
    extracted = reader._extracted
    assert extracted is not None and extracted.exists()
    tensors = {name: reader.read(name) for name in reader.names()}
    reader.close()
    assert not extracted.exists()
    assert_same_tensors(tensors, expected_tensors(model, ".keras"))


# -- writing ---------------------------------------------------------------------------------


def load_written(path: Path, batchnorm: bool) -> keras.Model:
    if path.name.endswith(".weights.h5"):
        model = build_model(batchnorm)
        model.optimizer.build(model.trainable_variables)  # so its state is loaded too
        model.load_weights(path)
        return model
    return keras.models.load_model(path)


def test_round_trip_with_scaled_weights(trained, suffix, tmp_path):
    batchnorm, _, files = trained
    reader_class, writer = FORMATS[suffix]
    output = tmp_path / f"scaled{suffix}"
    with reader_class(files[suffix]) as template:
        scaled = {name: template.read(name) * 2 for name in template.names()}
        # Any order will do: the writer finds each dataset by name.
        writer(output, reversed(list(scaled.items())), template)
    loaded = load_written(output, batchnorm)
    assert_same_tensors(expected_tensors(loaded, suffix), scaled)
    with reader_class(output) as reader:
        assert reader.names() == list(scaled)
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # no temporary left


def test_weights_h5_written_from_a_keras_archive_loads_with_load_weights(trained, tmp_path):
    # A .keras archive holds the file save_weights writes (model.weights.h5): an average of
    # .keras snapshots can be written as .weights.h5 for model.load_weights.
    batchnorm, _, files = trained
    output = tmp_path / "scaled.weights.h5"
    with KerasArchiveReader(files[".keras"]) as template:
        scaled = {name: template.read(name) * 2 for name in template.names()}
        write_keras_weights(output, scaled.items(), template)
    loaded = load_written(output, batchnorm)
    assert_same_tensors(expected_tensors(loaded, ".weights.h5"), scaled)
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]


def hdf5_datasets(file: h5py.File, group: str) -> dict[str, np.ndarray]:
    found = {}
    file[group].visititems(
        lambda name, obj: found.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None
    )
    return found


def test_optimizer_state_and_config_come_from_the_template(trained, tmp_path):
    _, _, files = trained
    output = tmp_path / "out.keras"
    with KerasArchiveReader(files[".keras"]) as template:
        write_keras_archive(output, template.items(), template)
    with zipfile.ZipFile(files[".keras"]) as source, zipfile.ZipFile(output) as written:
        assert [i.filename for i in written.infolist()] == [i.filename for i in source.infolist()]
        for info in source.infolist():
            if info.filename != "model.weights.h5":
                assert written.read(info.filename) == source.read(info)
                assert written.getinfo(info.filename).compress_type == info.compress_type
        assert written.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED
        weights = {}
        for archive, key in ((source, "template"), (written, "output")):
            folder = tmp_path / key
            archive.extract("model.weights.h5", folder)
            with h5py.File(folder / "model.weights.h5") as file:
                weights[key] = hdf5_datasets(file, "optimizer")
    assert weights["template"].keys() == weights["output"].keys()
    for name, value in weights["template"].items():
        np.testing.assert_array_equal(weights["output"][name], value)

    output_h5 = tmp_path / "out.h5"
    with KerasLegacyH5Reader(files[".h5"]) as template:
        write_keras_legacy_h5(output_h5, template.items(), template)
    with h5py.File(files[".h5"]) as source, h5py.File(output_h5) as written:
        assert dict(written.attrs) == {**source.attrs, "polyak": "average"}  # polyak's mark
        before, after = hdf5_datasets(source, "optimizer_weights"), hdf5_datasets(written, "/")
        for name, value in before.items():
            np.testing.assert_array_equal(after[f"optimizer_weights/{name}"], value)


def test_writer_copies_each_array_before_the_next_is_requested(trained, tmp_path):
    _, _, files = trained
    output = tmp_path / "reused.weights.h5"

    with KerasWeightsReader(files[".weights.h5"]) as template:
        expected = {name: template.read(name) + 1 for name in template.names()}

        def reusing_buffers():
            # Like the engine: each array is clobbered once the next one is requested.
            for name, value in expected.items():
                buffer = value.copy()
                yield name, buffer
                buffer[...] = np.nan

        write_keras_weights(output, reusing_buffers(), template)
    with KerasWeightsReader(output) as reader:
        assert_same_tensors({name: reader.read(name) for name in reader.names()}, expected)


def test_compressed_template_keeps_its_member_compression(trained, tmp_path):
    batchnorm, model, files = trained
    compressed = tmp_path / "compressed.keras"
    with (
        zipfile.ZipFile(files[".keras"]) as source,
        zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    output = tmp_path / "out.keras"
    with KerasArchiveReader(compressed) as template:
        write_keras_archive(output, template.items(), template)
    with zipfile.ZipFile(output) as written:
        assert written.getinfo("config.json").compress_type == zipfile.ZIP_DEFLATED
        assert written.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED
    loaded = load_written(output, batchnorm)
    assert_same_tensors(expected_tensors(loaded, ".keras"), expected_tensors(model, ".keras"))


@pytest.mark.parametrize(
    ("writer", "template_suffix"),
    [
        (write_keras_weights, ".h5"),
        (write_keras_archive, ".weights.h5"),
        (write_keras_legacy_h5, ".weights.h5"),
        (write_keras_archive, None),
    ],
)
def test_template_of_another_format_is_refused(trained, tmp_path, writer, template_suffix):
    _, _, files = trained
    output = tmp_path / "out.keras"
    if template_suffix is None:
        with pytest.raises(OutputError, match="only be written from Keras inputs of the same"):
            writer(output, [], None)
    else:
        with (
            open_checkpoint(files[template_suffix]) as template,
            pytest.raises(OutputError, match="only be written from Keras inputs of the same"),
        ):
            writer(output, template.items(), template)
    assert not output.exists()


def test_bad_tensors_are_refused_and_leave_no_output(trained, suffix, tmp_path):
    _, _, files = trained
    reader_class, writer = FORMATS[suffix]
    output = tmp_path / f"out{suffix}"
    with reader_class(files[suffix]) as template:
        names = template.names()
        good = [(name, template.read(name)) for name in names]
        cases = [
            (good[:-1], f"1 tensor\\(s\\) of the template .* were not given: '{names[-1]}'"),
            ([*good, ("nope/kernel", good[0][1])], "tensor 'nope/kernel' is not a model tensor"),
            ([good[0], good[0]], f"tensor '{names[0]}' was given twice"),
            ([(names[0], good[0][1][np.newaxis])], f"tensor '{names[0]}' has shape"),
            ([(names[0], good[0][1].astype("float64"))], f"tensor '{names[0]}' has dtype float64"),
        ]
        for tensors, message in cases:
            # Writers write into a temporary file that atomic_output removes on failure.
            with pytest.raises(OutputError, match=message), atomic_output(output) as temporary:
                writer(temporary, tensors, template)
            assert list(tmp_path.iterdir()) == []


# -- refusing bad files ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_files_are_refused(trained, suffix, tmp_path, damage):
    _, _, files = trained
    reader_class, _ = FORMATS[suffix]
    data = files[suffix].read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = np.random.default_rng(1).bytes(4096)
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(data)
    message = "cannot be read as a zip" if suffix == ".keras" else "not a readable HDF5 file"
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: .*{message}"):
        reader_class(path)


def test_truncated_weights_inside_a_keras_zip_are_refused(trained, tmp_path):
    _, _, files = trained
    path = tmp_path / "short.keras"
    with (
        zipfile.ZipFile(files[".keras"]) as source,
        zipfile.ZipFile(path, "w") as target,
    ):
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "model.weights.h5":
                data = data[: len(data) // 2]
            target.writestr(info.filename, data)
    with pytest.raises(
        CheckpointError, match=r"member 'model\.weights\.h5' is not a readable HDF5"
    ):
        KerasArchiveReader(path)


def rezip(source: Path, target: Path, drop: str | None = None, add: str | None = None) -> Path:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as output:
        for info in archive.infolist():
            if info.filename != drop:
                output.writestr(info.filename, archive.read(info))
        if add is not None:
            output.writestr(add, b"boo")
    return target


def test_keras_zip_without_weights_is_refused(trained, tmp_path):
    _, _, files = trained
    path = rezip(files[".keras"], tmp_path / "empty.keras", drop="model.weights.h5")
    with pytest.raises(
        CheckpointError, match=r"holds its weights in the member 'model\.weights\.h5'"
    ):
        KerasArchiveReader(path)


@pytest.mark.parametrize("member", ["../evil", "assets/../../evil", "/etc/evil", "C:/evil"])
def test_keras_zip_with_path_traversal_is_refused(trained, tmp_path, member):
    _, _, files = trained
    path = rezip(files[".keras"], tmp_path / "evil.keras", add=member)
    with pytest.raises(CheckpointError, match=f"member '{member}' .*path traversal"):
        KerasArchiveReader(path)


def test_keras_zip_weights_above_the_size_limit_are_refused(trained):
    _, _, files = trained
    with pytest.raises(CheckpointError, match="above the limit of 1000 bytes"):
        KerasArchiveReader(files[".keras"], max_weights_bytes=1000)


@pytest.mark.parametrize(
    ("link", "message"),
    [
        (h5py.SoftLink("/layers/dense/vars/0"), "'layers/dense/vars/7' is a soft link"),
        (h5py.ExternalLink("other.h5", "/data"), "'layers/dense/vars/7' is an external link"),
        ("hard", "'layers/dense/vars/7' is a second hard link"),
    ],
    ids=["soft", "external", "aliasing-hard"],
)
def test_links_among_the_weights_are_refused(trained, tmp_path, link, message):
    _, _, files = trained
    path = tmp_path / "linked.weights.h5"
    shutil.copyfile(files[".weights.h5"], path)
    with h5py.File(path, "r+") as file:
        group = file["layers/dense/vars"]
        group["7"] = group["0"] if link == "hard" else link
    with pytest.raises(CheckpointError, match=message):
        KerasWeightsReader(path)


def test_soft_link_in_a_legacy_file_is_refused(trained, tmp_path):
    _, _, files = trained
    path = tmp_path / "linked.h5"
    shutil.copyfile(files[".h5"], path)
    with h5py.File(path, "r+") as file:
        file["model_weights/dense/alias"] = h5py.SoftLink("/optimizer_weights")
    with pytest.raises(CheckpointError, match="'model_weights/dense/alias' is a soft link"):
        KerasLegacyH5Reader(path)


def test_layouts_of_the_wrong_kind_are_refused(trained, tmp_path):
    _, _, files = trained
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as file:
        file["dense/kernel"] = np.zeros((2, 3), dtype="float32")
    with pytest.raises(CheckpointError, match="'model_weights' group; this one has none"):
        KerasLegacyH5Reader(plain)
    misnamed = tmp_path / "legacy.weights.h5"
    shutil.copyfile(files[".h5"], misnamed)
    with pytest.raises(CheckpointError, match=r"Rename such a file to end in '\.h5'"):
        KerasWeightsReader(misnamed)


def test_unknown_names_and_unsupported_dtypes(tmp_path):
    path = tmp_path / "odd.weights.h5"
    with h5py.File(path, "w") as file:
        file["layers/dense/vars/0"] = np.zeros((2,), dtype="float32")
        file["layers/dense/vars/1"] = np.zeros((2,), dtype="complex64")
    with KerasWeightsReader(path) as reader:
        for method in (reader.info, reader.read):
            with pytest.raises(CheckpointError, match=f"checkpoint {path}: no model tensor named"):
                method("layers/dense/vars/9")
            with pytest.raises(
                CheckpointError, match="tensor 'layers/dense/vars/1' has dtype complex64"
            ):
                method("layers/dense/vars/1")


def test_the_archive_writers_scratch_file_is_named_for_the_cleanup(trained, tmp_path):
    """The scratch weights file of a .keras output is named after the output's temporary
    (not ``..NAME.polyak-tmp-*``), so a killed run's leftover is removed by the next write."""
    _, _, files = trained
    out = tmp_path / "avg.keras"
    seen: list[str] = []
    with open_checkpoint(files[".keras"]) as template:

        def tensors():
            seen.extend(p.name for p in tmp_path.iterdir())  # while the scratch file exists
            yield from template.items()

        with atomic_output(out) as temporary:
            write_keras_archive(temporary, tensors(), template)
    scratch = [name for name in seen if name.endswith(".weights.h5")]
    assert scratch and all(name.startswith(f"{temporary.name}.") for name in scratch), seen
    # What files.py's cleanup matches: .avg.keras.polyak-tmp-PID-...
    assert all(name.startswith(f".avg.keras.polyak-tmp-{os.getpid()}-") for name in scratch)
