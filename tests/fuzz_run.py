"""Fuzz one parser of ``tests/fuzz_targets.py`` with atheris (coverage-guided) for a set time.

Seeded with real files (``fuzz_targets.seeds``); coverage comes from instrumenting
polyak's own modules. An input that breaks the property (an exception other than a
clean refusal, a signal, more than 10 s, more than 2 GiB of memory) is written to
``tests/fuzz_regressions/TARGET/`` and the run stops with a non-zero exit;
``tests/test_fuzz_regressions.py`` replays every such file in ``make test``.

Run:
    python tests/fuzz_run.py TARGET [--seconds 60]    (``make fuzz`` runs every target)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    arguments = parser.parse_args()
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["polyak"]):
        import fuzz_targets
    target = fuzz_targets.TARGETS[arguments.target]
    crashes = HERE / "fuzz_regressions" / arguments.target
    crashes.mkdir(parents=True, exist_ok=True)
    corpus = Path(tempfile.mkdtemp(prefix=f"polyak-fuzz-{arguments.target}-"))
    for number, seed in enumerate(fuzz_targets.seeds(arguments.target)):
        (corpus / f"seed-{number}").write_bytes(seed)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={arguments.seconds}",
            "-timeout=10",
            f"-rss_limit_mb={arguments.rss_limit_mb}",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
            str(corpus),
        ],
        target,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
