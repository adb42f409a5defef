"""The method of a command (training/method.py) and the one --flat_ratio bound (training/partition.py)."""
from types import SimpleNamespace

import numpy as np
import pytest

from training.method import METHODS, method_name, partition_epoch
from training.partition import random_sam_masks, sam_masks, selected_sets
from utils.errors import UserError


def command(sam, flat_ratio, initial_epochs=-1):
    return SimpleNamespace(sam=sam, flat_ratio=flat_ratio, initial_epochs=initial_epochs)


@pytest.mark.parametrize("sam, flat_ratio, method, epoch", [
    (False, 0.0, "deep_ensemble", None),
    (True, 0.0, "sam", None),
    (True, 0.5, "sharpbalance", 4),     # initial_epochs 3: SAM on all data for epochs 0..3, then partition
    (True, 0.001, "sharpbalance", 4),
])
def test_each_command_names_its_method_and_partition_epoch(sam, flat_ratio, method, epoch):
    args = command(sam, flat_ratio, initial_epochs=3)
    assert method_name(args) == method and method in METHODS
    assert partition_epoch(args) == epoch
    assert partition_epoch(command(sam, flat_ratio, initial_epochs=-1)) == (0 if epoch is not None else None)


@pytest.mark.parametrize("flat_ratio", [1.0, 1.5, -0.1, float("nan")])
def test_one_flat_ratio_bound_for_the_command_and_the_partition(flat_ratio):
    """main.py (through method_name) and every partition function refuse the same values, with the
    same one line: [0, 1), as the released code."""
    expected = rf"^--flat_ratio must be in \[0, 1\), got {flat_ratio}$"
    scores = np.random.RandomState(0).rand(3, 10)
    for refuse in (lambda: method_name(command(True, flat_ratio)), lambda: selected_sets(scores, flat_ratio),
                   lambda: sam_masks(scores, flat_ratio), lambda: random_sam_masks(10, flat_ratio, [1, 2, 3])):
        with pytest.raises(UserError, match=expected):
            refuse()
    assert selected_sets(scores, 0.99).sum(axis=1).tolist() == [9, 9, 9]  # just below the bound: K = 9


def test_a_flat_ratio_without_sam_is_refused():
    with pytest.raises(UserError, match=r"^--flat_ratio > 0 is SharpBalance, which needs --sam True$"):
        method_name(command(False, 0.5))
