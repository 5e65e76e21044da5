"""The weight math, on the package's lowest floor: numpy only, no files, no framework.

:mod:`~polyak.weights.schemes` (how much each member of an average counts),
:mod:`~polyak.weights.profiles` (power-function EMA profiles, post-hoc EMA's formulas)
and :mod:`~polyak.weights.schedule` (when an online average updates, and by how much).
It imports nothing of polyak but :mod:`polyak.errors`; everything else builds on it.
"""
