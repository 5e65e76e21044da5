"""Lightning adapter: the snapshot callback and the online-average callback.

Its file names are the Keras and torch adapters'; its class names are Lightning's habit.

Its modules have the file names of the Keras and PyTorch adapters where the roles
match: ``snapshots`` (:class:`SnapshotCallback`, the counterpart of
``polyak.keras.SnapshotCheckpoint`` and ``polyak.torch.SnapshotSaver``) and ``online``
(:class:`OnlineAverageCallback`, wrapping ``polyak.torch.OnlineAverage``);
``framework`` imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``)
and torch, or names the ``lightning`` extra that installs them.

The class names follow each framework's habit rather than one polyak name: a
Lightning user hands ``Callback`` objects to ``Trainer(callbacks=[...])`` (as Lightning's
own ``ModelCheckpoint`` and ``EarlyStopping`` are), a Keras user hands callbacks to
``fit`` (Keras names its ``ModelCheckpoint`` for what it writes, hence
``SnapshotCheckpoint``), and the torch helpers are plain objects a training loop calls
(``SnapshotSaver.save``, ``OnlineAverage.update``). The arguments and the files they
write are the same in all three (:class:`polyak.snapshots.SnapshotOptions`).

Example:
    >>> from polyak.lightning import OnlineAverageCallback, SnapshotCallback
    >>> snapshots = SnapshotCallback("run/", keep=10)
    >>> average = OnlineAverageCallback(half_life=1000)
    >>> trainer = Trainer(max_epochs=500, callbacks=[snapshots, average])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader)  # doctest: +SKIP
    >>> polyak.average_to("run/", "averaged.safetensors", scheme="exp:2")  # doctest: +SKIP
    >>> average.export("online-average.safetensors")  # doctest: +SKIP
"""

from polyak.lightning.online import OnlineAverageCallback
from polyak.lightning.snapshots import SnapshotCallback

__all__ = ["OnlineAverageCallback", "SnapshotCallback"]
