"""README.md blocks that benchmarks write: ``<!-- NAME:begin ... -->`` to ``<!-- NAME:end -->``.

A benchmark checks that its block is there before it runs (``has_readme_block``) and
replaces the block's text in one read and write when it is done
(``replace_readme_block``); the text around the markers is never touched.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(name: str) -> re.Pattern[str]:
    marker = re.escape(name)
    return re.compile(rf"(<!-- {marker}:begin[^\n]*-->\n)(.*?)(<!-- {marker}:end -->)", re.DOTALL)


def has_readme_block(name: str) -> bool:
    """Whether README.md holds the markers of block ``name``."""
    return _block(name).search(README.read_text()) is not None


def replace_readme_block(name: str, text: str, section: str) -> None:
    """Put ``text`` between the markers of block ``name``, in one read and write.

    Raises:
        SystemExit: README.md lacks the markers; the message says to restore them
            under ``section``.
    """
    readme = README.read_text()
    found = _block(name).search(readme)
    if found is None:
        raise SystemExit(
            f"README.md: no block <!-- {name}:begin ... --> ... <!-- {name}:end --> to "
            f"replace; restore the markers under '{section}'."
        )
    README.write_text(readme[: found.start(2)] + text.rstrip("\n") + "\n" + readme[found.end(2) :])
