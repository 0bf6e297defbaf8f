"""jaxcam.metrics.classification against hand computations and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcam.metrics import classification

# ----------------------------------------------------------------------------------------
# Classification metrics
# ----------------------------------------------------------------------------------------

# A 3-class example worked by hand:
# true: 0 0 0 1 1 2 2 2 2 2      pred: 0 0 1 1 2 2 2 2 0 0
#   M = [[2, 1, 0],
#        [0, 1, 1],
#        [2, 0, 3]]
# precision = [2/4, 1/2, 3/4], recall = [2/3, 1/2, 3/5]
# F1_0 = 2 * (1/2)(2/3) / (1/2 + 2/3) = 4/7, F1_1 = 1/2, F1_2 = 2 * .75 * .6 / 1.35 = 2/3
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 2, 2, 2, 2, 0, 0]


def test_confusion_matrix_by_hand():
    m = classification.confusion_matrix(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(m, [[2, 1, 0], [0, 1, 1], [2, 0, 3]])


def test_classification_report_by_hand():
    r = classification.classification_report(Y_TRUE, Y_PRED, 3)
    np.testing.assert_allclose(r["per_class"]["precision"], [0.5, 0.5, 0.75])
    np.testing.assert_allclose(r["per_class"]["recall"], [2 / 3, 0.5, 0.6])
    f1 = [4 / 7, 0.5, 2 / 3]
    np.testing.assert_allclose(r["per_class"]["f1"], f1)
    assert r["per_class"]["support"] == [3, 2, 5]
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 0.6) / 3)
    assert r["macro"]["f1"] == pytest.approx(np.mean(f1))
    assert r["macro"]["precision"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert r["weighted"]["f1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + 5 * f1[2]) / 10)
    assert r["weighted"]["recall"] == pytest.approx(r["accuracy"])  # an identity
    assert r["total"] == 10


def test_report_zero_division_is_zero():
    # class 2 never predicted and never true: precision = recall = F1 = 0, excluded from
    # balanced accuracy (support 0).
    r = classification.classification_report([0, 1, 1], [0, 1, 0], 3)
    assert r["per_class"]["f1"][2] == 0.0
    assert r["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)


def test_quadratic_weighted_kappa_by_hand():
    # O = [[1, 1], [0, 2]] (true 0 0 1 1 ; pred 0 1 1 1), N = 4, W = [[0, 1], [1, 0]]
    # E = outer([2, 2], [1, 3]) / 4 = [[.5, 1.5], [.5, 1.5]]
    # kappa = 1 - (1) / (1.5 + .5) = 0.5
    kappa = classification.quadratic_weighted_kappa([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert kappa == pytest.approx(0.5)
    # 3 classes: true 0 1 2, pred 0 2 2 ; O = [[1,0,0],[0,0,1],[0,0,1]], W = (i-j)^2 / 4
    # sum W O = W[1,2] = 1/4 ; E = outer([1,1,1], [1,0,2]) / 3
    # sum W E = (1/3) * sum_i (W[i,0] * 1 + W[i,2] * 2)
    #         = (1/3) * ((0 + 2) + (1/4 + 2/4) + (1 + 0)) = (1/3) * 3.75 = 1.25
    assert classification.quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], 3) == pytest.approx(
        1 - 0.25 / 1.25
    )


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.randoms())
def test_kappa_properties(labels, rnd):
    y = np.asarray(labels)
    assert classification.quadratic_weighted_kappa(y, y, 5) == pytest.approx(1.0)
    pred = np.asarray([rnd.randint(0, 4) for _ in labels])
    k = classification.quadratic_weighted_kappa(y, pred, 5)
    assert k == pytest.approx(classification.quadratic_weighted_kappa(pred, y, 5))  # symmetric
    assert -1.0 - 1e-9 <= k <= 1.0 + 1e-9
    r = classification.classification_report(y, pred, 5)
    assert np.sum(r["confusion_matrix"]) == len(labels)
    assert r["accuracy"] == pytest.approx(np.trace(r["confusion_matrix"]) / len(labels))


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        classification.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="y_pred has 1"):
        classification.confusion_matrix([0, 1], [0], 3)


