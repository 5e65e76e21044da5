"""polyak: Polyak-Ruppert weight averaging of neural network checkpoints.

Snapshot the last epochs while training, average N checkpoints into one model of
the same format (streaming, tensor by tensor), and choose the best average on
validation data.

Example:
    >>> import polyak
    >>> weights = polyak.average("run/model_*.h5", scheme="exp:2")  # doctest: +SKIP
    >>> polyak.average_to("run/", "averaged.h5", scheme="linear", last=5)  # doctest: +SKIP
"""

from polyak import schemes
from polyak.averaging import AverageResult, average, average_to
from polyak.discovery import Checkpoint, find_checkpoints
from polyak.errors import PolyakError
from polyak.formats import open_checkpoint
from polyak.weights.schemes import parse_scheme

__version__ = "0.1.0"

__all__ = [
    "AverageResult",
    "Checkpoint",
    "PolyakError",
    "__version__",
    "average",
    "average_to",
    "find_checkpoints",
    "open_checkpoint",
    "parse_scheme",
    "schemes",
]
