"""Ensemble metrics on arrays of logits (definitions: measure/README.md), in float64 numpy.

Shapes: ``logits`` of one model is ``(n, C)``; a stack of members is ``(M, n, C)``; ``labels`` is
``(n,)`` of ints. Nothing here touches a model or a file, so every function can be checked against a
brute-force computation on hand-made numbers (tests/test_metrics.py).

Conventions
- member probabilities p_m = softmax(z_m); the ensemble averages **probabilities**, not logits:
  p̄ = (1/M) Σ_m p_m, computed in log space as logsumexp_m(log p_m) − log M, so the NLL −log p̄_y
  stays finite when a softmax underflows.
- ECE: 15 equal-width confidence bins (lo, hi] on [0, 1] (a confidence of exactly 0 goes to the
  first bin), confidence = max_c p_c, ECE = Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|.
- Brier: mean over inputs of Σ_c (p_c − 1[c = y])² (the multi-class form, range [0, 2]).
- Disagreement D_ij: fraction of inputs where argmax of members i and j differ.
- DER = mean off-diagonal D / mean member error; EIR = (mean member error − ensemble error) / mean
  member error (both NaN when the members make no errors).
- KL_ij = mean over inputs of KL(p_i ‖ p_j) = Σ_c p_i,c (log p_i,c − log p_j,c); not symmetric.
- Logit variance (measure_diversity_variance.py): per input, Σ_c of the unbiased variance over members
  of the raw logit z_mc; averaged over inputs.
"""
import numpy as np

ECE_BINS = 15


def _as_stack(logits):
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected logits of shape (n, C) or (M, n, C), got {arr.shape}")
    return arr


def log_softmax(logits, axis=-1):
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def logsumexp(values, axis):
    top = values.max(axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.squeeze(top, axis=axis) + np.log(np.exp(values - top).sum(axis=axis))


def ensemble_log_probs(logits):
    """log of the averaged member probabilities, shape (n, C), from member logits (M, n, C)."""
    member_log_probs = log_softmax(_as_stack(logits))
    return logsumexp(member_log_probs, axis=0) - np.log(member_log_probs.shape[0])


def accuracy(log_probs, labels):
    labels = np.asarray(labels)
    return float(np.mean(np.argmax(log_probs, axis=-1) == labels))


def nll(log_probs, labels):
    """Mean negative log-likelihood of the true class, from log-probabilities (n, C)."""
    labels = np.asarray(labels)
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def ece(probs, labels, n_bins=ECE_BINS):
    """Expected calibration error with ``n_bins`` equal-width bins on the top-class confidence."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    # bin b holds confidences in (b/n_bins, (b+1)/n_bins]; ceil-1 maps 0 to bin 0 after the clip
    # sum_b (n_b/N)·|acc_b − conf_b| = sum_b |Σ correct − Σ confidence| / N, so no counts are needed
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    conf_sums = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sums = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(acc_sums - conf_sums).sum() / len(labels))


def brier(probs, labels):
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def classification_metrics(log_probs, labels):
    """accuracy, loss (NLL), ece and brier of one predictive distribution given as log-probs."""
    probs = np.exp(log_probs)
    return {"accuracy": accuracy(log_probs, labels), "loss": nll(log_probs, labels),
            "ece": ece(probs, labels), "brier": brier(probs, labels)}


def ensemble_report(logits, labels):
    """Per-member and ensemble metrics with the release's key names.

    Returns ``ensemble_<metric>``, ``individual_<metric>`` (a list over members) and
    ``average_individual_<metric>`` for metric in accuracy, loss, ece, brier, plus ``n``.
    """
    stack = _as_stack(logits)
    members = [classification_metrics(log_softmax(z), labels) for z in stack]
    ensemble = classification_metrics(ensemble_log_probs(stack), labels)
    report = {"n": int(stack.shape[1])}
    for key in ("accuracy", "loss", "ece", "brier"):
        report[f"ensemble_{key}"] = ensemble[key]
        report[f"individual_{key}"] = [m[key] for m in members]
        report[f"average_individual_{key}"] = float(np.mean(report[f"individual_{key}"]))
    return report


def predictions(logits):
    """argmax class of every member: (M, n) ints."""
    return np.argmax(_as_stack(logits), axis=-1)


def disagreement_matrix(preds):
    """Symmetric (M, M) matrix of the fraction of inputs on which two members' predictions differ."""
    preds = np.asarray(preds)
    differ = preds[:, None, :] != preds[None, :, :]
    return differ.mean(axis=-1).astype(np.float64)


def mean_off_diagonal(matrix):
    matrix = np.asarray(matrix, dtype=np.float64)
    m = matrix.shape[0]
    if m < 2:
        return float("nan")
    return float((matrix.sum() - np.trace(matrix)) / (m * (m - 1)))


def der(disagreement, member_errors):
    """Disagreement-error ratio: mean off-diagonal disagreement / mean member error."""
    mean_error = float(np.mean(member_errors))
    return mean_off_diagonal(disagreement) / mean_error if mean_error > 0 else float("nan")


def eir(member_errors, ensemble_error):
    """Ensemble improvement rate: (mean member error − ensemble error) / mean member error."""
    mean_error = float(np.mean(member_errors))
    return (mean_error - float(ensemble_error)) / mean_error if mean_error > 0 else float("nan")


def diversity_report(logits, labels):
    """Disagreement matrix, its mean, DER and EIR, with the member and ensemble errors used."""
    stack = _as_stack(logits)
    labels = np.asarray(labels)
    preds = predictions(stack)
    member_errors = [float(np.mean(p != labels)) for p in preds]
    ensemble_error = 1.0 - accuracy(ensemble_log_probs(stack), labels)
    matrix = disagreement_matrix(preds)
    return {"n": int(stack.shape[1]), "disagreement": matrix.tolist(),
            "mean_disagreement": mean_off_diagonal(matrix),
            "DER": der(matrix, member_errors), "EIR": eir(member_errors, ensemble_error),
            "individual_error": member_errors, "ensemble_error": ensemble_error}


def kl_matrix(logits):
    """(M, M) matrix, entry (i, j) = mean over inputs of KL(p_i ‖ p_j)."""
    log_p = log_softmax(_as_stack(logits))
    p = np.exp(log_p)
    # Σ_c p_i (log p_i − log p_j) = Σ_c p_i log p_i − Σ_c p_i log p_j
    self_term = np.einsum("inc,inc->in", p, log_p)
    cross_term = np.einsum("inc,jnc->ijn", p, log_p)
    return (self_term[:, None, :] - cross_term).mean(axis=-1)


def kl_report(logits):
    matrix = kl_matrix(logits)
    return {"n": int(_as_stack(logits).shape[1]), "kl": matrix.tolist(),
            "mean_kl": mean_off_diagonal(matrix)}


def logit_variance_sum(logits):
    """Σ over inputs of Σ_c unbiased member variance of the logits; with the input count.

    Returns ``(total, n)`` so batches can be summed exactly; the variance diversity is total / n.
    """
    stack = _as_stack(logits)
    m = stack.shape[0]
    if m < 2:
        raise ValueError("logit variance needs at least two members")
    centred = stack - stack.mean(axis=0, keepdims=True)
    return float((centred ** 2).sum() / (m - 1)), int(stack.shape[1])


class VarianceAccumulator:
    """Streams logit variance over batches: memory does not grow with the number of inputs.

    ``update(key, logits)`` adds a batch (M, b, C) under a group key (e.g. a corruption name);
    ``result()`` gives the pooled variance over everything and per key.
    """

    def __init__(self):
        self.totals = {}
        self.counts = {}

    def update(self, key, logits):
        total, n = logit_variance_sum(logits)
        self.totals[key] = self.totals.get(key, 0.0) + total
        self.counts[key] = self.counts.get(key, 0) + n

    def result(self):
        n = sum(self.counts.values())
        overall = sum(self.totals.values()) / n if n else float("nan")
        per_key = {k: self.totals[k] / self.counts[k] for k in self.totals}
        return overall, per_key, n


# ----------------------------------------------------------------------------- corrupted cells
def mean_reports(reports):
    """Unweighted mean over reports of every numeric entry (lists and matrices elementwise);
    ``n`` is summed. The -C summaries are unweighted means over the 15 × 5 (corruption, severity) cells."""
    out = {}
    for key in reports[0]:
        values = [r[key] for r in reports]
        if key == "n":
            out[key] = int(sum(values))
        elif isinstance(values[0], (int, float, list)) and not isinstance(values[0], bool):
            out[key] = np.mean(np.asarray(values, dtype=np.float64), axis=0).tolist()
    return out


def mean_diversity_reports(reports):
    """Mean disagreement matrix and errors over cells; mean disagreement, DER and EIR recomputed
    from those means (a ratio of means, not a mean of ratios)."""
    out = mean_reports(reports)
    out["mean_disagreement"] = mean_off_diagonal(out["disagreement"])
    out["DER"] = der(out["disagreement"], out["individual_error"])
    out["EIR"] = eir(out["individual_error"], out["ensemble_error"])
    return out


def summarise_cells(cells, combine=mean_reports):
    """``cells``: list of (corruption, severity, report) -> cells, per_corruption, per_severity, ood."""
    if not cells:
        return None
    by_corruption, by_severity = {}, {}
    for corruption, severity, report in cells:
        by_corruption.setdefault(corruption, []).append(report)
        by_severity.setdefault(str(severity), []).append(report)
    return {"cells": {f"{c}_{s}": r for c, s, r in cells},
            "per_corruption": {c: combine(rs) for c, rs in by_corruption.items()},
            "per_severity": {s: combine(rs) for s, rs in sorted(by_severity.items())},
            "ood": dict(combine([r for _, _, r in cells]), n_cells=len(cells))}
