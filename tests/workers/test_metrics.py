"""Tests of workers.metrics: the one macro-F1 that node validation and the prediction report use."""

from __future__ import annotations

import numpy as np
import pytest

from workers.metrics import macro_f1, per_class_f1


def test_f1_per_class_and_macro_mean_over_classes_that_occur():
    # class 0: tp 2, fp 1, fn 0 -> 0.8; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2 never occurs
    tp, fp, fn = np.array([2.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    assert per_class_f1(tp, fp, fn).tolist() == pytest.approx([0.8, 2 / 3, 0.0])
    assert macro_f1(tp, fp, fn) == pytest.approx((0.8 + 2 / 3) / 2)


def test_macro_f1_without_any_counts_is_zero():
    zeros = np.zeros(3)
    assert macro_f1(zeros, zeros, zeros) == 0.0
