"""SharpBalance's partition (README: "What SharpBalance does", step 3): per-member SAM masks from scores.

The partition divides the training split, once per member, into the samples the member trains with
SAM and those it trains with the plain loss (on disk: ``sharpbalance_split.pt``; flag: ``--split_rule``).
Every member j selects its K = floor(flat_ratio·N) lowest-scored samples L_j (``flattest``, released)
or highest (``sharpest``, the paper's Figure 6). Member i trains with SAM on the samples the *other*
members selected, plus a share of the samples nobody selected, and with the plain loss on the rest.
All functions here are pure functions of the score matrix and return boolean masks (M, N), True =
SAM sample, so the training loop looks membership up by index and every rank computes the same
partition. ``--flat_ratio`` is checked here, once, for main.py and these functions alike.
"""
import math

import numpy as np
import torch

from utils.errors import UserError

SELECT_CHOICES = ("flattest", "sharpest")
SPLIT_RULE_CHOICES = ("auto", "share", "boost")
TRAIN_SUBSET_CHOICES = ("boosting", "random", "same")


def _as_score_matrix(scores):
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (members, samples) matrix, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN (a diverged member?); the partition would be arbitrary")
    return scores


def check_flat_ratio(flat_ratio):
    """``--flat_ratio`` must lie in [0, 1), as in the released code (0 = no partition)."""
    if not 0.0 <= flat_ratio < 1.0:  # also refuses NaN
        raise UserError(f"--flat_ratio must be in [0, 1), got {flat_ratio}")


def _check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got '{value}'")


def selected_sets(scores, flat_ratio, select="flattest"):
    """Bool (M, N): row j marks L_j, the K = floor(flat_ratio·N) samples member j selects.

    ``flattest`` = the K lowest scores (the release), ``sharpest`` = the K highest (the paper's
    Figure 6). Both read one stable ascending sort, so ties go the same way on every machine:
    the first K positions for flattest, the last K for sharpest (as the release sliced it).
    """
    scores = _as_score_matrix(scores)
    check_flat_ratio(flat_ratio)
    _check_choice(select, SELECT_CHOICES, "--select")
    num_members, n = scores.shape
    k = int(math.floor(flat_ratio * n))
    order = np.argsort(scores, axis=1, kind="stable")
    chosen = order[:, :k] if select == "flattest" else order[:, n - k:]
    selected = np.zeros((num_members, n), dtype=bool)
    np.put_along_axis(selected, chosen, True, axis=1)
    return selected


def sam_masks(scores, flat_ratio, rule="share", select="flattest"):
    """Bool (M, N): row i is True where member i trains with SAM (SharpBalance's partition).

    U_{-i} = union of the other members' sets L_j; A = the samples in no L_j, in ascending index
    order; A_i = A[i::M]. ``share``: SAM_i = U_{-i} ∪ A_i. ``boost``: SAM_i = U_{-i} ∪ (A \\ A_i).
    """
    _check_choice(rule, ("share", "boost"), "--split_rule")
    selected = selected_sets(scores, flat_ratio, select=select)
    num_members, n = selected.shape
    times_selected = selected.sum(axis=0)
    unselected = times_selected == 0
    leftovers = np.flatnonzero(unselected)  # ascending
    masks = np.zeros((num_members, n), dtype=bool)
    for i in range(num_members):
        selected_by_others = (times_selected - selected[i]) > 0
        own_leftovers = np.zeros(n, dtype=bool)
        own_leftovers[leftovers[i::num_members]] = True
        if rule == "share":
            masks[i] = selected_by_others | own_leftovers
        else:
            masks[i] = selected_by_others | (unselected & ~own_leftovers)
    return masks


def random_sam_masks(n, flat_ratio, seeds, same=False):
    """Bool (M, N) for the ablations: member i's normal set is a uniform random subset of size
    floor((1 − flat_ratio)·N), drawn without replacement with ``RandomState(seeds[i])``
    (``random``) or once with ``RandomState(0)`` for every member (``same``); SAM = the rest.
    """
    check_flat_ratio(flat_ratio)
    seeds = list(seeds)
    num_normal = int(math.floor((1.0 - flat_ratio) * n))
    masks = np.ones((len(seeds), n), dtype=bool)
    for i, seed in enumerate(seeds):
        rng = np.random.RandomState(0 if same else int(seed))
        normal = rng.choice(np.arange(n), size=num_normal, replace=False)
        masks[i, normal] = False
    return masks


def resolve_split_rule(split_rule, dataset):
    """``auto`` is what the release did: ``boost`` for CIFAR-10, ``share`` for everything else."""
    _check_choice(split_rule, SPLIT_RULE_CHOICES, "--split_rule")
    if split_rule != "auto":
        return split_rule
    if dataset is None:
        raise ValueError("split_rule 'auto' needs the dataset name")
    return "boost" if str(dataset).lower() == "cifar10" else "share"


def build_sam_masks(scores, flat_ratio, train_subset="boosting", split_rule="auto", select="flattest",
                    dataset=None, seeds=None):
    """The SAM masks (M, N) for ``--train_subset``: ``boosting`` (SharpBalance), ``random``, ``same``.

    ``scores`` is the (M, N) score matrix (members in seed order); the ablations use only its shape.
    ``seeds`` (one per member) is needed by ``random``.
    """
    _check_choice(train_subset, TRAIN_SUBSET_CHOICES, "--train_subset")
    scores = _as_score_matrix(scores)
    num_members, n = scores.shape
    if train_subset == "boosting":
        rule = resolve_split_rule(split_rule, dataset)
        return sam_masks(scores, flat_ratio, rule=rule, select=select)
    if train_subset == "random":
        if seeds is None or len(seeds) != num_members:
            raise ValueError(f"train_subset 'random' needs one seed per member ({num_members})")
        return random_sam_masks(n, flat_ratio, seeds)
    return random_sam_masks(n, flat_ratio, range(num_members), same=True)
