"""The machine a study ran on: CPU model, thread counts, library versions.

Recorded with a study's results because exact numbers depend on them: a BLAS
build, its kernels for the CPU at hand, and the number of threads change the
rounding of float sums, and a training run that rounds differently ends in other
weights.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_description() -> dict:
    """CPU, thread counts and versions as JSON-ready data, with a one-line ``summary``."""
    threads: dict = {
        "cpus": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        threads["torch_threads"] = torch.get_num_threads()
        threads["torch_interop_threads"] = torch.get_num_interop_threads()
    try:
        from threadpoolctl import threadpool_info

        threads["blas"] = [
            {key: pool.get(key) for key in ("internal_api", "version", "num_threads")}
            for pool in threadpool_info()
        ]
    except ImportError:
        pass
    versions = {
        "python": sys.version.split()[0],
        **{
            name: _version(name)
            for name in ("numpy", "torch", "keras", "scikit-learn", "polyak")
            if _version(name) is not None
        },
    }
    keras = sys.modules.get("keras")
    backend = keras.backend.backend() if keras is not None else None
    cpu = cpu_model()
    summary = (
        f"{cpu}, {threads['cpus']} CPUs, {platform.platform()}; Python {versions['python']}"
        + "".join(f", {name} {version}" for name, version in versions.items() if name != "python")
        + (f" (Keras backend {backend})" if backend else "")
        + (f"; torch threads {threads['torch_threads']}" if "torch_threads" in threads else "")
    )
    return {
        "cpu": cpu,
        "platform": platform.platform(),
        "threads": threads,
        "versions": versions,
        "keras_backend": backend,
        "summary": summary,
    }
