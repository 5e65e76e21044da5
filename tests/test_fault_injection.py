"""kill -9 at random moments: ``polyak average`` writing its output, the snapshot helpers saving.

The promise under test (README "Output files", :mod:`polyak.files`, :mod:`polyak.snapshots`):
a failed or interrupted write leaves the destination as it was, and no stray temporary
files after the next run.

- ``polyak average`` (a safetensors file, a sharded directory, a ``.pt`` file; each trial
  alternately to a fresh destination and with ``--overwrite`` over a previous output)
  is killed with SIGKILL; the destination is then absent (fresh), the previous output
  byte for byte (overwrite), or the complete new output, bit for bit that of an unkilled
  run. A directory replaced by ``--overwrite`` may also be killed between its two renames:
  then the destination is absent and the previous output is whole under its
  ``.polyak-old-`` name (one test kills it exactly there). The inputs are never touched.
  The next, unkilled run to the same destination writes the correct output and leaves
  nothing else in its directory.
- ``SnapshotSaver`` (PyTorch), ``SnapshotCheckpoint`` (Keras, a real ``fit``) and, in the
  slow tests, ``SnapshotCallback`` (Lightning, a real ``Trainer``) are killed while
  saving a model of 3 MB every step or epoch, each run resuming where the killed one
  stopped. ``verify`` then passes (the manifest lists only complete files, each
  matching its checksum); the listed snapshots are exactly those committed before the
  interrupted save, or those and the interrupted one with retention applied: never
  fewer than before, at most ``keep``; ``find_checkpoints`` returns exactly the
  verified files. The next run (a new saver, the next ``fit``) finds, once it has opened
  the directory, no temporaries and no unfinished commit, and goes on saving.

How the kills are timed: ``polyak average`` is watched (its output directory polled
every half millisecond) until its temporary file or directory appears, then killed
after a random extra delay of up to the write's duration (the median of the last
unkilled runs to the same destination), so most kills land mid-write and some after
the rename; one trial in seven is killed at a random moment before the write would
start instead. A snapshot helper is killed, one trial in eight, while it opens the
directory (completing or undoing the previous kill's save), otherwise at a random
moment within three save periods after its first save. Where each kill landed is read
off what it left (a temporary, an unfinished commit in the manifest, the old or the new
output) and counted; the slow tests print the counts and require at least 30% of the
kills to land mid-write (mid-save). The random generators are seeded; every assertion
message names the seed and the trial.

How the processes are started: loading torch and Keras takes seconds, so the trials
fork their process from a server that has imported them once (``ForkServer``); the
forked child runs ``polyak.cli.main.main(argv)`` (what the ``polyak`` script runs) or the
training loop, and is killed with SIGKILL like any process. One test runs the real
``polyak`` script as a subprocess instead.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import polyak
from polyak.snapshots import MANIFEST_NAME, verify

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and SIGKILL"
)

CHILD_TIMEOUT = 120.0  # seconds any one child may take before the test gives up on it

# ---------------------------------------------------------------- processes

# Reads one JSON request a line. {"preload": code} runs code here, once, before any fork.
# {"code", "argv", "log"} forks a child that runs code with sys.argv = argv, stdout and
# stderr going to the file log; the server answers the child's pid, then waits for a line
# from the test (which has killed the child or seen it finish) before reaping it, so the
# pid cannot be reused by another process while the test may still signal it; it answers
# the exit code (negative: the signal that ended it). The child creates log + ".done"
# just before it exits on its own.
SERVER = r"""
import json, os, sys, traceback

def run_child(request):
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.argv = request["argv"]
        try:
            exec(compile(request["code"], "<child>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            open(request["log"] + ".done", "w").close()
        finally:
            os._exit(code)

while line := sys.stdin.readline():
    request = json.loads(line)
    if "preload" in request:
        exec(request["preload"], {"__name__": "__preload__"})
        print("ok", flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        run_child(request)
    print(pid, flush=True)
    sys.stdin.readline()
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class ForkServer:
    """A Python process that imports once and forks a child per run (see SERVER)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stderr = directory / "server.err"
        with open(self._stderr, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=directory,
            )
        self._buffer = b""
        self._preloaded: set[str] = set()
        self._runs = 0

    def _send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def _read_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the fork server did not answer in {timeout} s")
            ready, _, _ = select.select([descriptor], [], [], remaining)
            if ready:
                chunk = os.read(descriptor, 4096)
                if not chunk:
                    raise EOFError(f"the fork server exited: {self._stderr.read_text()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def preload(self, code: str) -> None:
        """Run ``code`` in the server (imports), once, so that every child starts with it."""
        if code in self._preloaded:
            return
        self._send(json.dumps({"preload": code}))
        answer = self._read_line(timeout=300)
        assert answer == "ok", answer
        self._preloaded.add(code)

    def spawn(self, code: str, argv: Sequence[str], log: Path | None = None) -> ForkedChild:
        self._runs += 1
        log = log or self.directory / f"child-{self._runs}.log"
        log.unlink(missing_ok=True)
        Path(f"{log}.done").unlink(missing_ok=True)
        self._send(json.dumps({"code": code, "argv": ["child", *argv], "log": str(log)}))
        return ForkedChild(self, int(self._read_line(timeout=30)), log)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkedChild:
    """A process forked by the server; it stays unreaped until :meth:`wait`."""

    def __init__(self, server: ForkServer, pid: int, log: Path) -> None:
        self.server, self.pid, self.log = server, pid, log
        self.returncode: int | None = None

    def finished(self) -> bool:
        return self.returncode is not None or Path(f"{self.log}.done").exists()

    def kill(self) -> None:
        # Safe until reaped: the pid is this child's, alive or a zombie.
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = CHILD_TIMEOUT) -> int:
        if self.returncode is None:
            self.server._send("reap")
            self.returncode = int(self.server._read_line(timeout=timeout))
        return self.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ExecChild:
    """A subprocess started from an executable, e.g. the ``polyak`` script."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        self.pid = self.process.pid

    def finished(self) -> bool:
        return self.process.poll() is not None

    def kill(self) -> None:
        self.process.kill()  # Popen does not signal a process it has reaped

    def wait(self, timeout: float = CHILD_TIMEOUT) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


Child = ForkedChild | ExecChild


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    fork_server = ForkServer(tmp_path_factory.mktemp("server"))
    try:
        yield fork_server
    finally:
        fork_server.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.0005)


# ---------------------------------------------------------------- polyak average

CLI = "import sys\nfrom polyak.cli.main import main\nmain(sys.argv[1:])\n"
CLI_PRELOAD = "import safetensors.numpy, torch\nfrom polyak.cli import main, average\n"
POLYAK = Path(sys.executable).with_name("polyak")

# Three members of 20 MB each: the output takes about a tenth of a second to write here.
SHAPES = [(1024, 1024), (2048, 512), (512,), (1000, 1000), (3, 3, 64, 128), (777, 999), (9,)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for step in (100, 200, 300):
        tensors = {
            f"layer{index}.weight": rng.standard_normal(shape, dtype=np.float32)
            for index, shape in enumerate(SHAPES)
        }
        tensors["norm.num_batches_tracked"] = np.array(step, dtype=np.int64)
        safetensors.numpy.save_file(
            tensors, str(directory / f"model_{step}.safetensors"), metadata={"format": "pt"}
        )
    return directory


@dataclass(frozen=True)
class OutputKind:
    """What ``polyak average`` writes: the output's name and options, and those of an older one."""

    name: str  # the destination inside its directory
    options: tuple[str, ...]
    old_options: tuple[str, ...]  # a previous output that differs from the new one

    def argument(self, directory: Path) -> str:
        path = str(directory / self.name)
        return path + "/" if self.name.endswith("/") else path


OUTPUT_KINDS = {
    "safetensors": OutputKind("avg.safetensors", (), ("--scheme", "linear")),
    "directory": OutputKind(
        "avg/", ("--max-shard-size", "6MB"), ("--scheme", "linear", "--max-shard-size", "9MB")
    ),
    "pt": OutputKind("avg.pt", (), ("--scheme", "linear")),
}


def tree(path: Path) -> dict[str, str] | None:
    """SHA-256 of a file, or of every entry of a directory by name; None if absent."""
    if path.is_dir():
        return {
            entry.name: (
                hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "(dir)"
            )
            for entry in sorted(path.iterdir())
        }
    if path.exists():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return None


def copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def stat_signature(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(directory.iterdir())
    }


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".polyak-" in p.name)


@dataclass
class AverageRunner:
    """Starts ``polyak average`` on the inputs, forked from the server or as the real script."""

    server: ForkServer
    inputs: Path
    executable: bool = False

    def start(self, kind: OutputKind, out_dir: Path, *options: str, prologue: str = "") -> Child:
        argv = ["average", str(self.inputs), "-o", kind.argument(out_dir), *options]
        log = self.server.directory / "average.log"
        if self.executable:
            command = [str(POLYAK)] if POLYAK.exists() else [sys.executable, "-m", "polyak"]
            return ExecChild([*command, *argv], log)
        self.server.preload(CLI_PRELOAD)
        return self.server.spawn(prologue + CLI, argv, log)

    def run(self, kind: OutputKind, out_dir: Path, *options: str) -> Timing:
        """An unkilled run, watched as the killed ones are; it must succeed."""
        started = time.monotonic()
        child = self.start(kind, out_dir, *options)
        appeared = watch_for_temporary(child, out_dir)
        while not child.finished() and temporaries(out_dir):
            time.sleep(0.0005)
        written = time.monotonic()
        code = child.wait()
        assert code == 0, f"polyak average {options} exited with {code}:\n{child.output()}"
        return Timing(appeared - started, max(written - appeared, 0.001))


@dataclass(frozen=True)
class Timing:
    before_write: float  # from the start to the temporary's appearance
    write: float  # from its appearance to its rename


def temporaries(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".polyak-tmp-" in name]


def watch_for_temporary(child: Child, out_dir: Path) -> float:
    """When the child's temporary output appeared (or it finished without one seen)."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not temporaries(out_dir) and not child.finished():
        if time.monotonic() > deadline:
            raise TimeoutError(f"polyak average wrote nothing in {CHILD_TIMEOUT} s")
        time.sleep(0.0005)
    return time.monotonic()


@dataclass
class Counts:
    """Where the kills landed, by what they left behind, in groups (fresh, overwrite)."""

    landed: collections.Counter = field(default_factory=collections.Counter)

    def add(self, where: str, group: str = "") -> None:
        self.landed[group, where] += 1

    def share(self, *where: str) -> float:
        total = sum(self.landed.values())
        return sum(n for (_, w), n in self.landed.items() if w in where) / total if total else 0

    def __str__(self) -> str:
        groups = sorted({group for group, _ in self.landed})
        return "; ".join(
            (f"{group}: " if group else "")
            + ", ".join(f"{w} {n}" for (g, w), n in sorted(self.landed.items()) if g == group)
            for group in groups
        )


MID_WRITE = ("mid-write", "between the renames")


def kill_average(
    runner: AverageRunner, kind_name: str, trials: int, seed: int, work: Path
) -> Counts:
    """Kill ``polyak average`` writing ``kind_name`` output ``trials`` times; check each."""
    kind = OUTPUT_KINDS[kind_name]
    rng = random.Random(seed)
    counts = Counts()
    reference, out_dir = work / "reference", work / "out"
    reference.mkdir()
    out_dir.mkdir()
    inputs_before = {p.name: tree(p) for p in sorted(runner.inputs.iterdir())}
    signature = stat_signature(runner.inputs)

    # The expected outputs, and the write's timing, from unkilled runs.
    old_dir = reference / "old"
    old_dir.mkdir()
    runner.run(kind, old_dir, *kind.old_options)
    old = old_dir / kind.name.rstrip("/")
    timings = [runner.run(kind, out_dir, *kind.options, "--overwrite") for _ in range(3)]
    destination = out_dir / kind.name.rstrip("/")
    new = tree(destination)
    old_tree = tree(old)
    assert new is not None and old_tree is not None and new != old_tree

    for trial in range(trials):
        context = f"seed {seed}, trial {trial}, {kind_name}"
        overwrite = trial % 2 == 1
        remove(destination)
        if overwrite:
            copy(old, destination)
        before = old_tree if overwrite else None
        options = (*kind.options, "--overwrite") if overwrite else kind.options

        # Timed by the median of the last unkilled runs: it follows the machine's load.
        before_write = float(np.median([t.before_write for t in timings[-9:]]))
        write = float(np.median([t.write for t in timings[-9:]]))
        child = runner.start(kind, out_dir, *options)
        try:
            if rng.random() < 1 / 7:
                time.sleep(rng.uniform(0, before_write))
            else:
                watch_for_temporary(child, out_dir)
                time.sleep(rng.uniform(0, write))
            child.kill()
        finally:
            code = child.wait()
        assert code in (-signal.SIGKILL, 0), f"{context}: exit {code}\n{child.output()}"

        # As the kill left it.
        after = tree(destination)
        stray = leftovers(out_dir)
        set_aside = [out_dir / name for name in stray if ".polyak-old-" in name]
        if code == 0:
            where = "after it finished"
        elif after == new:
            where = "after the rename"
        elif set_aside:
            where = "between the renames"
        elif any(".polyak-tmp-" in name for name in stray):
            where = "mid-write"
        else:
            where = "before the write"
        counts.add(where, "overwrite" if overwrite else "fresh")
        context += f", killed {where}"
        if after is None and overwrite:
            # Only a directory, only between its two renames: the old one is set aside.
            assert kind.name.endswith("/"), f"{context}: the previous output was lost"
            assert [tree(path) for path in set_aside] == [old_tree], context
        else:
            assert after in (before, new), f"{context}: the destination is neither old nor new"
        assert stat_signature(runner.inputs) == signature, f"{context}: an input was touched"

        # The next run cleans up and writes the output.
        timings.append(runner.run(kind, out_dir, *kind.options, "--overwrite"))
        assert tree(destination) == new, f"{context}: the next run's output is wrong"
        assert os.listdir(out_dir) == [destination.name], f"{context}: {leftovers(out_dir)}"

    inputs_after = {p.name: tree(p) for p in sorted(runner.inputs.iterdir())}
    assert inputs_after == inputs_before, f"seed {seed}: the inputs changed"
    return counts


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_kill_9_while_polyak_average_writes(server, inputs, tmp_path: Path, kind: str) -> None:
    counts = kill_average(AverageRunner(server, inputs), kind, trials=4, seed=10, work=tmp_path)
    print(f"polyak average -> {kind}, 4 trials: {counts}")


def test_kill_9_while_the_polyak_script_writes(server, inputs, tmp_path: Path) -> None:
    runner = AverageRunner(server, inputs, executable=True)
    counts = kill_average(runner, "safetensors", trials=2, seed=20, work=tmp_path)
    print(f"polyak script -> safetensors, 2 trials: {counts}")


# The process kills itself right after setting the old output directory aside: a moment
# random kills all but never hit, since the next thing it does is rename the new one in.
KILLED_BETWEEN_THE_RENAMES = """
import os, signal
rename = os.rename

def rename_then_die(source, target, *args, **kwargs):
    rename(source, target, *args, **kwargs)
    if ".polyak-old-" in os.fspath(target):
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename_then_die
"""


def test_kill_9_between_the_renames_of_an_overwritten_directory(
    server, inputs, tmp_path: Path
) -> None:
    runner, kind = AverageRunner(server, inputs), OUTPUT_KINDS["directory"]
    old_dir, out_dir = tmp_path / "old", tmp_path / "out"
    old_dir.mkdir()
    out_dir.mkdir()
    runner.run(kind, old_dir, *kind.old_options)
    runner.run(kind, out_dir, *kind.options)
    destination, old = out_dir / "avg", old_dir / "avg"
    new, old_tree = tree(destination), tree(old)
    remove(destination)
    copy(old, destination)

    child = runner.start(
        kind, out_dir, *kind.options, "--overwrite", prologue=KILLED_BETWEEN_THE_RENAMES
    )
    assert child.wait() == -signal.SIGKILL, child.output()
    # No directory under the output's name, never a partial one; the old one set aside.
    assert not destination.exists()
    (set_aside,) = [out_dir / name for name in leftovers(out_dir) if ".polyak-old-" in name]
    assert tree(set_aside) == old_tree

    runner.run(kind, out_dir, *kind.options, "--overwrite")
    assert tree(destination) == new
    assert os.listdir(out_dir) == ["avg"]


# Half of them to a fresh destination, half with --overwrite; .pt writes through the same
# atomic_output as a safetensors file, so it gets fewer.
SLOW_TRIALS = {"safetensors": 400, "directory": 400, "pt": 200}


@pytest.mark.slow
@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_kill_9_while_polyak_average_writes_hundreds_of_times(
    server, inputs, tmp_path: Path, kind: str
) -> None:
    trials = SLOW_TRIALS[kind]
    runner = AverageRunner(server, inputs)
    counts = kill_average(runner, kind, trials=trials, seed=11, work=tmp_path)
    print(f"polyak average -> {kind}, {trials} trials: {counts}")
    assert counts.share(*MID_WRITE) >= 0.3, f"too few kills landed mid-write: {counts}"


# ---------------------------------------------------------------- snapshot helpers

# Shared by the training loops: what the directory looks like once opened.
REPORT = r"""
import json, os, sys, time

def report(*words):
    sys.stdout.write(" ".join(map(str, words)) + "\n")  # one write: a line is whole or absent
    sys.stdout.flush()

def opened(directory):
    manifest = os.path.join(directory, "polyak-manifest.json")
    data = json.load(open(manifest)) if os.path.exists(manifest) else {}
    report("opened", json.dumps({
        "hidden": sorted(name for name in os.listdir(directory) if name.startswith(".")),
        "keys": sorted(data),
        "listed": [entry["file"] for entry in data.get("snapshots", [])],
        "time": time.time(),
    }))
"""

TORCH_LOOP = (
    REPORT
    + r"""
import torch
from polyak.torch.snapshots import SnapshotSaver

directory, step, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
saves, deadline = int(sys.argv[4]), time.time() + float(sys.argv[5])
torch.manual_seed(step)
model = torch.nn.Sequential(
    torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU(),
    torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10),
)  # 0.8 M parameters, 3.2 MB
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(16, 256)
saver = SnapshotSaver(directory, keep=keep)
opened(directory)
for _ in range(saves):
    if time.time() > deadline:
        break
    loss = model(x).logsumexp(1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    report("saved", saver.save(model, step=step, logs={"loss": loss}).name, time.time())
    step += 1
"""
)
# Also one optimizer step: torch.optim's first use imports for a second and a half.
TORCH_PRELOAD = """
import torch, safetensors.torch
import polyak.torch.snapshots
layer = torch.nn.Linear(2, 2)
torch.optim.SGD(layer.parameters(), lr=0.1).step()
"""

KERAS_LOOP = (
    REPORT
    + r"""
import keras, numpy as np
from polyak.keras import SnapshotCheckpoint

directory, epoch, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
saves, deadline = int(sys.argv[4]), time.time() + float(sys.argv[5])

class Report(keras.callbacks.Callback):
    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def on_train_begin(self, logs=None):  # after the checkpoint's, which opens the directory
        opened(directory)

    def on_epoch_end(self, epoch, logs=None):
        report("saved", self.checkpoint.saved[-1].name, time.time())
        if len(self.checkpoint.saved) >= saves or time.time() > deadline:
            self.model.stop_training = True

keras.utils.set_random_seed(epoch)
model = keras.Sequential([
    keras.Input((256,)), keras.layers.Dense(1024, activation="relu"),
    keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10, activation="softmax"),
])  # 0.8 M parameters, 3.2 MB
model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
rng = np.random.default_rng(epoch)
x, y = rng.normal(size=(16, 256)).astype("float32"), rng.integers(0, 10, 16)
checkpoint = SnapshotCheckpoint(directory, keep=keep, rolling=True)
model.fit(x, y, batch_size=16, epochs=epoch + 10**6, initial_epoch=epoch, verbose=0,
          callbacks=[checkpoint, Report(checkpoint)])
"""
)
KERAS_PRELOAD = "import keras, h5py\nimport polyak.keras\n"


LIGHTNING_LOOP = (
    REPORT
    + r"""
import torch, lightning.pytorch as pl
from polyak.lightning import SnapshotCallback

directory, start, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
saves, deadline = int(sys.argv[4]), time.time() + float(sys.argv[5])

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU(),
            torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10),
        )  # 0.8 M parameters, 3.2 MB

    def training_step(self, batch, index):
        return self.net(batch[0]).logsumexp(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

class Report(pl.Callback):
    def __init__(self, snapshots):
        self.snapshots = snapshots

    def on_train_start(self, trainer, module):  # after the callback's, which opens the directory
        opened(directory)

    def on_train_epoch_end(self, trainer, module):
        report("saved", self.snapshots.saved[-1].name, time.time())
        if len(self.snapshots.saved) >= saves or time.time() > deadline:
            trainer.should_stop = True

torch.manual_seed(start)
data = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.randn(16, 256)), batch_size=16
)
# Each run counts epochs from 0: its own prefix keeps the names apart.
snapshots = SnapshotCallback(directory, keep=keep, rolling=True, prefix=f"run{start:06d}")
trainer = pl.Trainer(
    max_epochs=10**6, callbacks=[snapshots, Report(snapshots)], logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    accelerator="cpu", devices=1,
)
trainer.fit(Net(), data)
"""
)
LIGHTNING_PRELOAD = TORCH_PRELOAD + "import lightning.pytorch\nimport polyak.lightning\n"


@dataclass(frozen=True)
class Helper:
    """A snapshot helper's training loop: how to start it and how it names its saves."""

    loop: str
    preload: str
    # The file a loop started at index ``start`` commits at its ``count``-th save (0-based).
    name: Callable[[int, int], str]


HELPERS = {
    "torch": Helper(
        TORCH_LOOP, TORCH_PRELOAD, lambda start, count: f"model_step{start + count:08d}.safetensors"
    ),
    "keras": Helper(
        KERAS_LOOP, KERAS_PRELOAD, lambda start, count: f"model_{start + count:04d}.weights.h5"
    ),
    "lightning": Helper(
        LIGHTNING_LOOP,
        LIGHTNING_PRELOAD,
        lambda start, count: f"run{start:06d}_{count:04d}.safetensors",
    ),
}


def retained(listed: Sequence[str], name: str, keep: int) -> list[str]:
    """The manifest's list after committing ``name``: appended (or moved last), the newest kept."""
    return [*(entry for entry in listed if entry != name), name][-keep:]


def log_lines(child: Child, word: str) -> list[list[str]]:
    lines = [line.split() for line in child.output().splitlines(keepends=True) if line[-1:] == "\n"]
    return [line[1:] for line in lines if line and line[0] == word]


def temporary_owner(name: str) -> int | None:
    """The process id in a temporary's name (``.polyak-tmp-PID-...``), or None."""
    _, mark, rest = name.partition(".polyak-tmp-")
    pid = rest.split("-")[0]
    return int(pid) if mark and pid.isdigit() else None


def manifest_data(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def kill_snapshot_helper(
    server: ForkServer, helper_name: str, trials: int, seed: int, directory: Path, keep: int = 3
) -> Counts:
    """Kill a snapshot helper's loop ``trials`` times at random moments; check each."""
    helper = HELPERS[helper_name]
    server.preload(helper.preload)
    rng = random.Random(seed)
    counts = Counts()
    directory.mkdir()
    (directory / "notes.txt").write_text("the user's")

    def start(index: int, saves: int) -> Child:
        argv = [str(directory), str(index), str(keep), str(saves), str(CHILD_TIMEOUT)]
        return server.spawn(helper.loop, argv)

    def opened(child: Child) -> dict | None:
        lines = log_lines(child, "opened")
        return json.loads(" ".join(lines[0])) if lines else None

    def wait_for(child: Child, word: str, context: str) -> None:
        wait_until(lambda: log_lines(child, word) or child.finished(), CHILD_TIMEOUT, context)
        assert log_lines(child, word), f"{context}: the loop stopped:\n{child.output()}"

    # An unkilled run first: it fills the directory and times opening it and saving.
    spawned = time.time()
    child = start(0, saves=3 * keep)
    assert child.wait() == 0, child.output()
    saves = log_lines(child, "saved")
    assert len(saves) == 3 * keep, child.output()
    opening = opened(child)["time"] - spawned
    period = float(np.median(np.diff([float(line[1]) for line in saves])))
    index = len(saves)  # the next save's step (torch) or epoch (Keras)
    listed = [line[0] for line in saves][-keep:]  # what the manifest lists now
    # The snapshots a kill may leave listed: those committed before the save it
    # interrupted, or those and the interrupted one, with retention applied.
    possible = [listed]
    interrupted = None
    killed: set[int] = set()

    for trial in range(trials):
        context = f"seed {seed}, trial {trial}, {helper_name}"
        child = start(index, saves=10**6)
        try:
            if rng.random() < 1 / 8:
                time.sleep(rng.uniform(0, opening))  # while it opens the directory
            else:
                wait_for(child, "saved", context)
                time.sleep(rng.uniform(0, 3 * period))
            child.kill()
        finally:
            code = child.wait()
        assert code == -signal.SIGKILL, f"{context}: exit {code}\n{child.output()}"
        killed.add(child.pid)

        state = opened(child)
        if state is not None:
            # Opening finished or undid the save the previous kill interrupted, without
            # losing a snapshot, and removed every temporary of the dead process.
            assert state["hidden"] == [], f"{context}: left after opening: {state}"
            assert state["keys"] == ["format", "snapshots", "version"], f"{context}: {state}"
            assert state["listed"] in possible, f"{context}: opened {state}, not in {possible}"
            committed = state["listed"]
            saved = [name for name, *_ in log_lines(child, "saved")]
            assert saved == [helper.name(index, count) for count in range(len(saved))], context
            for name in saved:
                committed = retained(committed, name, keep)
            interrupted = helper.name(index, len(saved))
            possible = [committed, retained(committed, interrupted, keep)]
            index += len(saved)

        # As the kill left it: complete, checksums valid, nothing lost, at most keep.
        data = manifest_data(directory)
        hidden = sorted(p.name for p in directory.iterdir() if p.name.startswith("."))
        verified = [snapshot.name for snapshot in verify(directory)]
        if state is None:
            where = "opening the directory"
        elif any(name.startswith(f".{MANIFEST_NAME}.polyak-tmp-") for name in hidden):
            where = "writing the manifest"
        elif "pending" in data or "evicting" in data:
            where = "committing"
        elif hidden:
            where = "writing the snapshot"
        elif verified == possible[-1] != possible[0]:
            where = "after the commit"
        else:
            where = "between saves"
        counts.add(where)
        context += f", killed {where} (the save of {interrupted})"
        # Temporaries of this child, or of earlier ones if it died before opening finished.
        owners = {temporary_owner(name) for name in hidden}
        assert owners <= killed, f"{context}: left {hidden}"
        assert verified in possible, f"{context}: verified {verified}, not one of {possible}"
        assert len(possible[0]) <= len(verified) <= keep, context
        found = polyak.find_checkpoints(directory)
        assert sorted(c.path.name for c in found) == sorted(verified), context
        with polyak.open_checkpoint(directory / verified[-1]) as reader:
            assert len(reader.names()) >= 6, context
        assert (directory / "notes.txt").read_text() == "the user's", context
        listed = verified
        possible = [listed, *possible[1:]]

    # The next run after the last kill cleans up and goes on saving.
    child = start(index, saves=keep)
    assert child.wait() == 0, child.output()
    state = opened(child)
    assert state["hidden"] == [] and state["keys"] == ["format", "snapshots", "version"], state
    assert state["listed"] in possible, f"seed {seed}, the last run: {state}, not in {possible}"
    final = [snapshot.name for snapshot in verify(directory)]
    assert final == [name for name, *_ in log_lines(child, "saved")][-keep:]
    assert sorted(os.listdir(directory)) == sorted([*final, MANIFEST_NAME, "notes.txt"])
    return counts


MID_SAVE = ("writing the snapshot", "writing the manifest", "committing")


@pytest.mark.parametrize("helper", ["torch", "keras"])
def test_kill_9_while_a_snapshot_helper_saves(server, tmp_path: Path, helper: str) -> None:
    counts = kill_snapshot_helper(server, helper, trials=4, seed=30, directory=tmp_path / "run")
    print(f"{helper} snapshots, 4 trials: {counts}")


@pytest.mark.slow
@pytest.mark.parametrize("helper", HELPERS)
def test_kill_9_while_a_snapshot_helper_saves_200_times(
    server, tmp_path: Path, helper: str
) -> None:
    counts = kill_snapshot_helper(server, helper, trials=200, seed=31, directory=tmp_path / "run")
    print(f"{helper} snapshots, 200 trials: {counts}")
    assert counts.share(*MID_SAVE) >= 0.3, f"too few kills landed mid-save: {counts}"
