"""Two rows of docs/differences.md (the differences from the paper and the release) that no other
test pins on the very inputs where the project and the reference it differs from part ways. (Leftover samples
dealt in sorted index order and ties broken by a stable sort are pinned by the brute-force split
test in tests/test_partition.py, with tied integer scores.)"""
import numpy as np

from measure import metrics


def test_ece_bins_are_left_open_right_closed():
    # Confidence 9/15 lies exactly on the edge between bins 8 and 9: (lo, hi] (Guo et al.) puts it
    # in bin 8, alone; [lo, hi) (torchmetrics) would put it in bin 9 with the 0.62 sample.
    probs = np.array([[1 - 9 / 15, 9 / 15], [0.38, 0.62]])
    labels = np.array([1, 0])                     # the first is right, the second wrong
    assert probs[0].max() * 15 == 9.0             # on the edge in float arithmetic, too
    left_open = (abs(1 - 9 / 15) + abs(0 - 0.62)) / 2
    right_open = abs(0.5 - (9 / 15 + 0.62) / 2)   # both in one bin: accuracy 1/2
    assert metrics.ece(probs, labels) == left_open
    assert abs(left_open - right_open) > 0.3


def test_ensemble_prediction_resolves_what_float32_probabilities_tie():
    # Two confident members disagree: 30 vs 0 for class 0 and 31 vs 0 for class 1. The mean
    # probability of class 1 is larger by e^-30 - e^-31 (up to e^-61 terms) ≈ 5.9e-14; float32
    # softmax saturates both members to one-hot, so the release's float32 mean ties at 0.5/0.5 and
    # argmax picks class 0. The log-sum-exp of float64 log-probabilities keeps the difference.
    logits = np.array([[[30.0, 0.0]], [[0.0, 31.0]]])
    z = logits.astype(np.float32)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    release = (p / p.sum(axis=-1, keepdims=True)).mean(axis=0)
    assert release[0, 0] == release[0, 1] and np.argmax(release[0]) == 0
    log_p = metrics.ensemble_log_probs(logits)
    assert np.argmax(log_p[0]) == 1
    exact = (np.exp(-30) - np.exp(-31)) / 0.5       # d log p̄ ≈ d p̄ / p̄ with p̄ ≈ 1/2
    assert abs((log_p[0, 1] - log_p[0, 0]) / exact - 1) < 1e-2  # float64 spacing at 0.69: 1e-16
