"""lesion_grouped_split: groups never straddle splits; per-class proportions within the bound."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcam.data.splits import SPLIT_NAMES, check_proportions, lesion_grouped_split


@st.composite
def grouped_labels(draw):
    num_groups = draw(st.integers(1, 60))
    sizes = draw(st.lists(st.integers(1, 4), min_size=num_groups, max_size=num_groups))
    group_labels = draw(st.lists(st.integers(0, 4), min_size=num_groups, max_size=num_groups))
    groups, labels = [], []
    for g, (size, lab) in enumerate(zip(sizes, group_labels, strict=True)):
        groups += [f"L{g}"] * size
        labels += [lab] * size
    order = draw(st.permutations(list(range(len(groups)))))
    return [groups[i] for i in order], [labels[i] for i in order]


proportions_st = st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.floats(0.05, 1.0)).map(
    lambda t: tuple(x / sum(t) for x in t)
)


@settings(max_examples=25, deadline=None)
@given(grouped_labels(), proportions_st, st.integers(0, 2**31 - 1))
def test_groups_never_straddle_and_proportions_within_bound(data, props, seed):
    groups, labels = data
    split = lesion_grouped_split(groups, labels, props, seed)
    assert split.shape == (len(groups),) and set(split.tolist()) <= {0, 1, 2}
    for g in set(groups):
        assert len({int(split[i]) for i, h in enumerate(groups) if h == g}) == 1
    labels = np.asarray(labels)
    sizes = {g: groups.count(g) for g in groups}
    for c in np.unique(labels):
        in_c = labels == c
        g_max = max(sizes[g] for g, lab in zip(groups, labels, strict=True) if lab == c)
        for s in range(3):
            deviation = np.sum(in_c & (split == s)) - props[s] * in_c.sum()
            # Greedy largest-deficit assignment: -(k-1) g_max < deviation < g_max.
            assert -2 * g_max - 1e-9 < deviation < g_max + 1e-9


@settings(max_examples=10, deadline=None)
@given(grouped_labels(), st.integers(0, 1000))
def test_pure_function_of_inputs(data, seed):
    groups, labels = data
    a = lesion_grouped_split(groups, labels, seed=seed)
    b = lesion_grouped_split(list(groups), np.asarray(labels), seed=seed)
    np.testing.assert_array_equal(a, b)


def test_singleton_groups_are_a_stratified_split():
    labels = np.repeat(np.arange(5), 100)
    split = lesion_grouped_split(np.arange(500), labels, (0.7, 0.15, 0.15), seed=3)
    for c in range(5):
        counts = np.bincount(split[labels == c], minlength=3)
        np.testing.assert_array_equal(counts, [70, 15, 15])


def test_seed_changes_the_assignment():
    labels = np.repeat(np.arange(2), 50)
    a = lesion_grouped_split(np.arange(100), labels, seed=0)
    b = lesion_grouped_split(np.arange(100), labels, seed=1)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bad", [(0.7, 0.3), (0.5, 0.5, 0.0), (0.6, 0.3, 0.3), (-0.1, 0.6, 0.5)])
def test_bad_proportions(bad):
    with pytest.raises(
        ValueError, match=r"3 positive numbers \(train/validation/test\) summing to 1"
    ):
        check_proportions(bad)
    with pytest.raises(ValueError, match="summing to 1"):
        lesion_grouped_split(["a"], [0], bad)


def test_length_mismatch():
    with pytest.raises(ValueError, match=r"groups \(2\) and labels \(1\) differ"):
        lesion_grouped_split(["a", "b"], [0])


def test_split_names():
    assert SPLIT_NAMES == ("train", "validation", "test")
