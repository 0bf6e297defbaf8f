"""Classification metrics (numpy): confusion matrix, per-class precision / recall / F1
with macro and weighted averages, and the quadratic weighted kappa of APTOS 2019."""

from __future__ import annotations

from typing import Any

import numpy as np


def _check_labels(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}.")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes}).")
    return y_true, y_pred


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``M[i, j]`` = number of examples of true class ``i`` predicted as ``j``; (C, C) int64."""
    y_true, y_pred = _check_labels(y_true, y_pred, num_classes)
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def classification_report(y_true, y_pred, num_classes: int) -> dict[str, Any]:
    """Per-class precision / recall / F1 / support with macro and weighted averages.

    ``precision_c = M_cc / sum_i M_ic``, ``recall_c = M_cc / sum_j M_cj``,
    ``F1_c = 2 P R / (P + R)`` (0 where undefined, as scikit-learn's
    ``zero_division=0``). Macro: unweighted mean over classes; weighted: mean
    weighted by support. ``balanced_accuracy`` is the mean recall over the
    classes present in ``y_true``.
    """
    m = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(m).astype(np.float64)
    predicted = m.sum(0).astype(np.float64)
    support = m.sum(1)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    precision = ratio(tp, predicted)
    recall = ratio(tp, support.astype(np.float64))
    f1 = ratio(2 * precision * recall, precision + recall)
    total = int(support.sum())
    present = support > 0
    weights = support / max(total, 1)
    return {
        "confusion_matrix": m.tolist(),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        },
        "macro": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        },
        "weighted": {
            "precision": float((precision * weights).sum()),
            "recall": float((recall * weights).sum()),
            "f1": float((f1 * weights).sum()),
        },
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "total": total,
    }


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (the APTOS 2019 metric).

    ``kappa = 1 - sum(W O) / sum(W E)`` with ``O`` the confusion matrix,
    ``E = outer(row sums, column sums) / N`` and ``W_ij = (i - j)^2 / (C - 1)^2``.
    Returns 1.0 when both raters put everything in one and the same class
    (``sum(W E) = 0`` and perfect agreement), 0.0 for other degenerate cases.
    """
    o = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    n = o.sum()
    if n == 0 or num_classes < 2:
        return 0.0
    idx = np.arange(num_classes)
    w = (idx[:, None] - idx[None, :]) ** 2 / (num_classes - 1) ** 2
    e = np.outer(o.sum(1), o.sum(0)) / n
    denom = (w * e).sum()
    if denom == 0:
        return 1.0 if (w * o).sum() == 0 else 0.0
    return float(1.0 - (w * o).sum() / denom)
