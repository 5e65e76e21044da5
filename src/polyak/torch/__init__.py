"""PyTorch adapter: snapshot helpers, evaluation and BatchNorm recalibration.

torch is imported only here and in ``polyak.formats.torch``, never by ``import polyak``.
"""

from polyak.errors import require

require("torch", "torch", "polyak.torch")

__all__: list[str] = []
