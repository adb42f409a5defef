"""SharpBalance's split (training/partition.py): the 12-sample worked example by hand, every rule
against a brute-force set computation (tests/references.py), random and identical subsets against
numpy's own draws, and the refusals of impossible arguments."""
import itertools
import math

import numpy as np
import pytest
import torch

from tests.references import brute_force_masks
from training.partition import build_sam_masks, random_sam_masks, resolve_split_rule, sam_masks, selected_sets
from utils.errors import UserError


def as_set(mask_row):
    return set(np.flatnonzero(mask_row).tolist())


# --------------------------------------------------------------------------- worked example

WORKED_LOW_SETS = [{2, 3, 4, 5, 6, 7}, {0, 2, 4, 6, 7, 10}, {2, 3, 4, 6, 7, 11}]


def worked_scores():
    """Scores whose 6 lowest per member are exactly the worked example's L_0, L_1, L_2 (N=12)."""
    rng = np.random.RandomState(5)
    scores = np.zeros((3, 12))
    for j, low in enumerate(WORKED_LOW_SETS):
        for k in range(12):
            scores[j, k] = rng.uniform(0, 1) if k in low else rng.uniform(2, 3)
    return scores


def test_the_worked_example_gives_its_low_sets():
    low = selected_sets(worked_scores(), 0.5)
    assert [as_set(row) for row in low] == WORKED_LOW_SETS


def test_the_share_rule_gives_the_worked_example_sets():
    masks = sam_masks(worked_scores(), 0.5, rule="share")
    # A = {1, 8, 9}: A_0 = [1], A_1 = [8], A_2 = [9].
    assert as_set(masks[0]) == {0, 2, 3, 4, 6, 7, 10, 11} | {1}
    assert as_set(masks[1]) == ({2, 3, 4, 5, 6, 7} | {2, 3, 4, 6, 7, 11}) | {8}
    assert as_set(masks[2]) == ({2, 3, 4, 5, 6, 7} | {0, 2, 4, 6, 7, 10}) | {9}


def test_the_boost_rule_gives_the_worked_example_sets():
    masks = sam_masks(worked_scores(), 0.5, rule="boost")
    assert as_set(masks[0]) == {0, 2, 3, 4, 6, 7, 10, 11} | {8, 9}
    assert as_set(masks[1]) == {2, 3, 4, 5, 6, 7, 11} | {1, 9}
    assert as_set(masks[2]) == {0, 2, 3, 4, 5, 6, 7, 10} | {1, 8}


def test_build_sam_masks_takes_boost_for_cifar10_and_share_otherwise():
    scores = worked_scores()
    assert np.array_equal(build_sam_masks(scores, 0.5, dataset="cifar10"),
                          sam_masks(scores, 0.5, rule="boost"))
    assert np.array_equal(build_sam_masks(scores, 0.5, dataset="cifar100"),
                          sam_masks(scores, 0.5, rule="share"))
    assert np.array_equal(build_sam_masks(torch.tensor(scores), 0.5, split_rule="share", dataset="cifar10"),
                          sam_masks(scores, 0.5, rule="share"))


# --------------------------------------------------------------------------- brute force

@pytest.mark.parametrize("select", ["flattest", "sharpest"])
@pytest.mark.parametrize("rule", ["share", "boost"])
def test_split_matches_brute_force(select, rule):
    rng = np.random.RandomState(0)
    for m, n, ratio in itertools.product([1, 2, 3, 5], [1, 7, 40], [0.0, 0.3, 0.5, 0.77, 0.99]):
        for tied in (False, True):
            # Integer scores make many ties, which checks the stable tie order too.
            scores = rng.randint(0, 4, size=(m, n)).astype(float) if tied else rng.rand(m, n)
            low_sets, expected = brute_force_masks(scores, ratio, rule, select)
            low = selected_sets(scores, ratio, select=select)
            got = sam_masks(scores, ratio, rule=rule, select=select)
            assert [as_set(row) for row in low] == low_sets, (m, n, ratio, tied)
            assert [as_set(row) for row in got] == expected, (m, n, ratio, tied)
            assert got.dtype == bool and got.shape == (m, n)


def test_the_sam_fraction_of_random_scores_is_the_expected_share():
    scores = np.random.RandomState(1).rand(3, 3000)
    share = sam_masks(scores, 0.5, rule="share").mean(axis=1)
    boost = sam_masks(scores, 0.5, rule="boost").mean(axis=1)
    # Independent random scores: P(in U_-i) = 3/4, leftovers = 1/8 of the data.
    assert np.all((share > 0.67) & (share < 0.9))
    assert np.all(np.abs(boost - (0.75 + 0.125 * 2 / 3)) < 0.03)


def test_bad_split_arguments_are_refused():
    scores = np.random.rand(3, 10)
    with pytest.raises(UserError):
        sam_masks(scores, 1.5)
    with pytest.raises(UserError):
        sam_masks(scores, 0.5, rule="other")
    with pytest.raises(UserError):
        selected_sets(scores, 0.5, select="middle")
    with pytest.raises(ValueError):
        selected_sets(np.full((3, 10), np.nan), 0.5)
    with pytest.raises(ValueError):
        selected_sets(np.random.rand(10), 0.5)
    assert resolve_split_rule("auto", "CIFAR10") == "boost"
    assert resolve_split_rule("auto", "tiny_imgnet") == "share"
    assert resolve_split_rule("share", "cifar10") == "share"
    with pytest.raises(UserError):
        resolve_split_rule("nope", "cifar10")


# --------------------------------------------------------------------------- random / same

def test_random_masks_have_their_size_and_depend_on_each_members_seed_alone():
    n, ratio, seeds = 101, 0.3, [13, 17, 27]
    masks = random_sam_masks(n, ratio, seeds)
    num_normal = math.floor((1 - ratio) * n)
    assert masks.shape == (3, n) and masks.dtype == bool
    assert np.all((~masks).sum(axis=1) == num_normal)
    assert not np.array_equal(masks[0], masks[1])
    # Member i depends only on its own seed.
    assert np.array_equal(random_sam_masks(n, ratio, [17])[0], masks[1])
    expected_normal = np.random.RandomState(27).choice(np.arange(n), num_normal, replace=False)
    assert as_set(~masks[2]) == set(expected_normal.tolist())


def test_same_masks_are_identical_across_members():
    n, ratio = 64, 0.5
    masks = random_sam_masks(n, ratio, [13, 17, 27], same=True)
    assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[1], masks[2])
    expected_normal = np.random.RandomState(0).choice(np.arange(n), n // 2, replace=False)
    assert as_set(~masks[0]) == set(expected_normal.tolist())
    built = build_sam_masks(np.zeros((3, n)), ratio, train_subset="same")
    assert np.array_equal(built, masks)
    built = build_sam_masks(np.zeros((3, n)), ratio, train_subset="random", seeds=[13, 17, 27])
    assert np.array_equal(built, random_sam_masks(n, ratio, [13, 17, 27]))
    with pytest.raises(ValueError):
        build_sam_masks(np.zeros((3, n)), ratio, train_subset="random", seeds=[1])
