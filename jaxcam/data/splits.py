"""Train/validation/test splits grouped by lesion (or patient) and stratified by class.

HAM10000 has several images of one lesion; putting them in different splits
leaks the test set into training. :func:`lesion_grouped_split` assigns whole
groups, class by class, so each split gets its share of every class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")
DEFAULT_PROPORTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)


def check_proportions(proportions: Sequence[float]) -> tuple[float, ...]:
    """Validate split proportions: one positive number per split, summing to 1."""
    props = tuple(float(p) for p in proportions)
    if len(props) != len(SPLIT_NAMES) or min(props) <= 0 or abs(sum(props) - 1.0) > 1e-6:
        raise ValueError(
            f"split proportions must be {len(SPLIT_NAMES)} positive numbers "
            f"({'/'.join(SPLIT_NAMES)}) summing to 1, got {proportions}; e.g. "
            f"{DEFAULT_PROPORTIONS}."
        )
    return props


def lesion_grouped_split(
    groups: Sequence,
    labels: Sequence[int],
    proportions: Sequence[float] = DEFAULT_PROPORTIONS,
    seed: int = 0,
) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) for each item, grouped and stratified.

    Items sharing a group id always land in the same split. Each group takes
    the label of its first item (in HAM10000 all images of a lesion share
    ``dx``). Per class ``c`` with ``n_c`` items, the groups are shuffled with
    ``seed``, stably sorted largest first, and each is given to the split with
    the largest deficit ``p_s n_c - count_s``. Hence, per class and split,
    ``count_s - p_s n_c`` lies in ``(-(k-1) g, g)`` with ``g`` the largest group
    of that class and ``k`` the number of splits; with singleton groups
    (APTOS) this is a plain stratified split within 2 items per class.

    Args:
      groups: group id per item (hashable), length ``N``.
      labels: class index per item, length ``N``.
      proportions: fraction of items per split, positive, summing to 1.
      seed: shuffling seed; the result is a pure function of the inputs.

    Returns:
      int array ``(N,)`` of split indices into :data:`SPLIT_NAMES`.
    """
    props = np.asarray(check_proportions(proportions))
    groups = list(groups)
    labels = np.asarray(labels, dtype=np.int64)
    if len(groups) != len(labels):
        raise ValueError(f"groups ({len(groups)}) and labels ({len(labels)}) differ in length.")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    # Deterministic group order independent of hash seeds: first appearance.
    group_ids = list(members)
    group_label = np.array([labels[members[g][0]] for g in group_ids], dtype=np.int64)
    group_size = np.array([len(members[g]) for g in group_ids], dtype=np.int64)
    out = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(group_label):
        idx = np.flatnonzero(group_label == c)
        idx = idx[rng.permutation(len(idx))]
        idx = idx[np.argsort(-group_size[idx], kind="stable")]
        target = props * group_size[idx].sum()
        count = np.zeros(len(props))
        for gi in idx:
            s = int(np.argmax(target - count))
            count[s] += group_size[gi]
            out[members[group_ids[gi]]] = s
    return out
