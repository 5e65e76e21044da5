"""The framework-free evaluation helpers both adapters' sweeps share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from polyak.data import sweep_metric, with_recalibrated

EVALUATOR = SimpleNamespace(metric="loss", higher_is_better=False)


def test_sweep_metric_of_data_is_the_evaluators():
    assert sweep_metric(EVALUATOR, None, "loss", None) == ("loss", False)


def test_sweep_metric_of_evaluate_is_named_by_metric_and_higher_is_better():
    evaluate = object()
    assert sweep_metric(EVALUATOR, evaluate, "accuracy", None) == ("metric", True)
    assert sweep_metric(EVALUATOR, evaluate, "f1", None) == ("f1", True)
    assert sweep_metric(EVALUATOR, evaluate, len, None) == ("metric", True)


@pytest.mark.parametrize("evaluate", [None, object()])
def test_sweep_metric_direction_given_by_the_caller_wins(evaluate):
    assert sweep_metric(EVALUATOR, evaluate, "loss", True)[1] is True
    assert sweep_metric(EVALUATOR, evaluate, "loss", False)[1] is False


def test_with_recalibrated_from_floats():
    assert with_recalibrated(0.5, 0.75) == {"test": 0.5, "recalibrated": {"test": 0.75}}


def test_with_recalibrated_from_splits_keeps_the_plain_splits():
    plain = {"test": 0.5, "validation": 0.25}
    result = with_recalibrated(plain, {"test": 0.75, "validation": 0.5})
    assert result == {
        "test": 0.5,
        "validation": 0.25,
        "recalibrated": {"test": 0.75, "validation": 0.5},
    }
    assert "recalibrated" not in plain
