"""Metrics against brute-force loops on hand-made logits (measure/metrics.py)."""
import math

import numpy as np
import pytest

from measure import metrics
from tests.references import logit_variance


def _softmax_loop(row):
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


@pytest.fixture
def stack():
    rng = np.random.RandomState(0)
    logits = rng.normal(scale=3.0, size=(3, 40, 5))
    labels = rng.randint(0, 5, size=40)
    return logits, labels


def test_ensemble_accuracy_and_nll_match_loops(stack):
    logits, labels = stack
    m, n, c = logits.shape
    correct, nll = 0, 0.0
    for i in range(n):
        avg = [sum(_softmax_loop(logits[k, i])[j] for k in range(m)) / m for j in range(c)]
        correct += int(max(range(c), key=lambda j: avg[j]) == labels[i])
        nll -= math.log(avg[labels[i]])
    report = metrics.ensemble_report(logits, labels)
    assert report["ensemble_accuracy"] == pytest.approx(correct / n)
    assert report["ensemble_loss"] == pytest.approx(nll / n, rel=1e-10)
    for k in range(m):
        acc = np.mean([np.argmax(logits[k, i]) == labels[i] for i in range(n)])
        loss = -np.mean([math.log(_softmax_loop(logits[k, i])[labels[i]]) for i in range(n)])
        assert report["individual_accuracy"][k] == pytest.approx(acc)
        assert report["individual_loss"][k] == pytest.approx(loss, rel=1e-10)
    assert report["average_individual_accuracy"] == pytest.approx(np.mean(report["individual_accuracy"]))


def test_ensemble_averages_probabilities_not_logits():
    # one member is sure of class 0, two prefer class 1: the mean logit picks 0, the mean
    # probability picks 1 (the ensemble averages probabilities)
    logits = np.array([[[10.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]], [[0.0, 3.0, 0.0]]])
    log_p = metrics.ensemble_log_probs(logits)
    probs = np.mean([np.exp(metrics.log_softmax(z)) for z in logits], axis=0)
    assert np.allclose(np.exp(log_p), probs)
    assert np.argmax(log_p[0]) == 1 and np.argmax(logits.mean(axis=0)[0]) == 0


def test_nll_is_finite_when_the_softmax_underflows():
    logits = np.array([[[2000.0, 0.0]], [[1000.0, 0.0]]])
    report = metrics.ensemble_report(logits, np.array([1]))
    # -log(mean(e^-2000, e^-1000)) = 1000 + log 2 (up to e^-1000)
    assert report["ensemble_loss"] == pytest.approx(1000 + math.log(2))


def test_ece_matches_a_loop(stack):
    logits, labels = stack
    probs = np.exp(metrics.log_softmax(logits[0]))
    n = len(labels)
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        members = [i for i in range(n) if lo < probs[i].max() <= hi or (b == 0 and probs[i].max() == 0)]
        if members:
            acc = np.mean([np.argmax(probs[i]) == labels[i] for i in members])
            conf = np.mean([probs[i].max() for i in members])
            total += len(members) / n * abs(acc - conf)
    assert metrics.ece(probs, labels) == pytest.approx(total)


def test_ece_equals_a_hand_made_example():
    # two samples at confidence 0.9 (one right, one wrong) and one at 0.6 (right): bins 13 and 8
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert metrics.ece(probs, labels) == pytest.approx(expected)


def test_brier_matches_a_loop(stack):
    logits, labels = stack
    probs = np.exp(metrics.ensemble_log_probs(logits))
    expected = np.mean([sum((probs[i, j] - (j == labels[i])) ** 2 for j in range(probs.shape[1]))
                        for i in range(len(labels))])
    assert metrics.brier(probs, labels) == pytest.approx(expected)
    assert metrics.brier(np.eye(3), np.arange(3)) == 0.0
    assert metrics.brier(np.eye(3)[[1, 2, 0]], np.arange(3)) == pytest.approx(2.0)


def test_disagreement_matrix_matches_a_loop(stack):
    logits, _ = stack
    preds = metrics.predictions(logits)
    matrix = metrics.disagreement_matrix(preds)
    m, n = preds.shape
    for i in range(m):
        for j in range(m):
            assert matrix[i, j] == pytest.approx(sum(preds[i, k] != preds[j, k] for k in range(n)) / n)
    assert np.allclose(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 0)
    same = np.repeat(logits[:1], 3, axis=0)
    assert np.all(metrics.disagreement_matrix(metrics.predictions(same)) == 0)


def test_der_and_eir_equal_hand_made_values():
    labels = np.array([0, 0, 0, 0])
    # member predictions: [0,0,1,1], [0,1,0,0], [0,0,0,1] via one-hot logits
    preds = np.array([[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]])
    logits = np.eye(2)[preds] * 5.0
    report = metrics.diversity_report(logits, labels)
    errors = [0.5, 0.25, 0.25]
    d01, d02, d12 = 3 / 4, 1 / 4, 2 / 4
    mean_d = (d01 + d02 + d12) / 3
    assert report["individual_error"] == pytest.approx(errors)
    assert report["mean_disagreement"] == pytest.approx(mean_d)
    assert report["DER"] == pytest.approx(mean_d / np.mean(errors))
    # ensemble (probability average): votes per sample -> class 0 wins on samples 0,1,2; sample 3
    # has two members voting 1 -> error 1/4
    assert report["ensemble_error"] == pytest.approx(0.25)
    assert report["EIR"] == pytest.approx((np.mean(errors) - 0.25) / np.mean(errors))


def test_identical_members_have_zero_diversity(stack):
    logits, labels = stack
    same = np.repeat(logits[:1], 4, axis=0)
    report = metrics.diversity_report(same, labels)
    assert report["mean_disagreement"] == 0 and report["DER"] == 0 and report["EIR"] == pytest.approx(0)
    assert metrics.logit_variance_sum(same)[0] == pytest.approx(0, abs=1e-12)
    assert np.allclose(metrics.kl_matrix(same), 0, atol=1e-12)


def test_kl_matrix_matches_a_loop(stack):
    logits, _ = stack
    matrix = metrics.kl_matrix(logits)
    m, n, _ = logits.shape
    for i in range(m):
        for j in range(m):
            values = []
            for k in range(n):
                p, q = _softmax_loop(logits[i, k]), _softmax_loop(logits[j, k])
                values.append(sum(a * math.log(a / b) for a, b in zip(p, q)))
            assert matrix[i, j] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12)
    assert np.all(matrix >= -1e-12)


def test_variance_matches_per_sample_computation(stack):
    logits, _ = stack
    m, n, c = logits.shape
    direct = 0.0
    for i in range(n):
        for j in range(c):
            values = logits[:, i, j]
            direct += sum((v - values.mean()) ** 2 for v in values) / (m - 1)
    total, count = metrics.logit_variance_sum(logits)
    assert count == n and total / count == pytest.approx(direct / n)
    # the release's formula: (mean ||z||² − ||mean z||²) · M/(M−1), averaged over inputs
    assert total / count == pytest.approx(logit_variance(logits))


def test_variance_accumulator_streams_exactly(stack):
    logits, _ = stack
    acc = metrics.VarianceAccumulator()
    for start in range(0, logits.shape[1], 7):
        acc.update("a" if start < 20 else "b", logits[:, start:start + 7])
    overall, per_key, n = acc.result()
    assert n == logits.shape[1]
    assert overall == pytest.approx(logit_variance(logits))
    assert per_key["a"] == pytest.approx(logit_variance(logits[:, :21]))
    assert per_key["b"] == pytest.approx(logit_variance(logits[:, 21:]))
