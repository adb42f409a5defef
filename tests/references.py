"""Reference computations the tests hold the product code against: slow, literal, written apart
from the code they check (a loop per sample, a plain formula, a projected gradient ascent)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from measure.ellipsoid import EllipsoidProjection
from tests.fixtures import LR, MOMENTUM, WEIGHT_DECAY


# ------------------------------------------------------------------ SGD and the loss (training/sam.py, steps.py)
def mean_loss(model, params, images, targets):
    """Mean cross-entropy of ``model`` evaluated with ``params`` (one tensor per parameter, in
    ``named_parameters`` order) in place of its own."""
    from torch.func import functional_call
    names = [name for name, _ in model.named_parameters()]
    return F.cross_entropy(functional_call(model, dict(zip(names, params)), (images,)), targets)


def sgd_by_hand(params, direction, buffers=None, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY):
    """torch.optim.SGD with momentum and coupled weight decay, written out: (new params, new
    momentum buffers) after one step along ``direction`` (``buffers`` None: the first step)."""
    new_params, new_buffers = [], []
    for k, (p, g) in enumerate(zip(params, direction)):
        d_p = g + weight_decay * p
        buf = d_p.clone() if buffers is None else momentum * buffers[k] + d_p
        new_params.append(p - lr * buf)
        new_buffers.append(buf)
    return new_params, new_buffers


# ------------------------------------------------------------------ SharpBalance's split (training/partition.py)
def brute_force_masks(scores, flat_ratio, rule, select):
    """The split by set algebra on Python sets: (each member's K = floor(flat_ratio·N) flattest or
    sharpest samples, each member's SAM set). Member i gets the union of the others' sets plus, for
    the samples in nobody's set (in index order), every M-th from position i ("share") or all the
    others ("boost")."""
    m, n = scores.shape
    k = math.floor(flat_ratio * n)
    low_sets = []
    for j in range(m):
        ascending = sorted(range(n), key=lambda idx: (scores[j, idx], idx))  # stable ascending
        low_sets.append(set(ascending[:k]) if select == "flattest" else set(ascending[n - k:]))
    everybody = set().union(*low_sets)
    leftovers = sorted(set(range(n)) - everybody)
    result = []
    for i in range(m):
        others = set().union(*(low_sets[j] for j in range(m) if j != i))
        own = set(leftovers[i::m])
        result.append(others | own if rule == "share" else others | (set(leftovers) - own))
    return low_sets, result


# ------------------------------------------------------------------ squared gradient norms (training/scores.py)
def loop_squared_grad_norms(model, loader, num_samples=None):
    """‖∇_θ CE(f(x), y)‖² over the trainable parameters for every sample of ``loader``
    (``(images, targets, indices)``), one plain backward pass per sample, in eval mode; (N,) float32
    at the loader's indices. The model's mode is restored."""
    was_training = model.training
    model.eval()
    n = len(loader.dataset) if num_samples is None else num_samples
    norms = torch.full((n,), float("nan"))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for images, targets, indices in loader:
            for k in range(len(targets)):
                loss = F.cross_entropy(model(images[k:k + 1]), targets[k:k + 1])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms[int(indices[k])] = float(sum(g.double().pow(2).sum() for g in grads if g is not None))
    finally:
        model.train(was_training)
    return norms


# ------------------------------------------------------------------ perturbation sets (measure/ellipsoid.py)
def weighted_norm(delta, scale):
    """‖delta / scale‖₂ over entries with scale > 0 (entries with scale = 0 are excluded)."""
    inside = scale > 0
    return torch.where(inside, delta / torch.where(inside, scale, 1), 0).norm()


def in_set(delta, scale, rho, norm, rtol=1e-5):
    """True if delta lies in the (adaptive) l2 ellipsoid / linf box of radius rho."""
    if bool((delta[scale == 0] != 0).any()):
        return False
    if norm == "linf":
        return bool((delta.abs() <= rho * scale * (1 + rtol) + 1e-12).all())
    return weighted_norm(delta, scale).item() <= rho * (1 + rtol) + 1e-12


def project_l2_ellipsoid(v, scale, rho):
    """One cold call of the ellipsoid projection: P(v)."""
    return EllipsoidProjection(scale, rho)(v)[0]


# ------------------------------------------------------------------ logit variance (measure/metrics.py)
def logit_variance(logits):
    """The release's variance diversity of member logits (M, n, C): per input
    (mean_m ‖z_m‖² − ‖mean_m z_m‖²)·M/(M − 1), averaged over the inputs."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.shape[0]
    return float(np.mean((np.sum(z ** 2, axis=-1).mean(0) - np.sum(z.mean(0) ** 2, axis=-1)) * m / (m - 1)))


# ------------------------------------------------------------------ theory (theory/)
def sam_steps_reference(A, y, w0, k, eta, rho):
    """k literal un-normalised SAM steps w ← w − η∇f(w + ρ∇f(w)) on f(w) = ½‖Aw − y‖²."""
    w = np.array(w0, dtype=float)
    for _ in range(k):
        grad = A.T @ (A @ w - y)
        w = w - eta * (A.T @ (A @ (w + rho * grad) - y))
    return w


def max_quadratic_on_ball_pga(hessian, gradient, radius, steps=20000, step_size=None, tol=1e-13):
    """Projected gradient ascent for max gᵀε + ½εᵀBε over ‖ε‖ ≤ radius, in the original coordinates.

    For a convex objective each projected ascent step cannot decrease the value, so the iteration
    climbs to a KKT point; started from the gradient direction it reaches the global max in
    practice. Slow (power-iteration-like) but independent of the secular-equation algebra of
    theory.max_quadratic_on_ball. Returns (value, ε).
    """
    B = np.asarray(hessian, dtype=float)
    g = np.asarray(gradient, dtype=float)
    if step_size is None:
        step_size = 10.0 / max(np.linalg.norm(B, 2), 1e-12)
    eps = radius * g / max(np.linalg.norm(g), 1e-300)
    for _ in range(steps):
        ascent = eps + step_size * (g + B @ eps)
        new = ascent * (radius / max(np.linalg.norm(ascent), radius))
        done = np.linalg.norm(new - eps) <= tol * radius
        eps = new
        if done:
            break
    return float(g @ eps + 0.5 * eps @ B @ eps), eps


def mp_density(x, ratio):
    """Limiting (Marchenko–Pastur) eigenvalue density of AᵀA for N(0, 1/d) entries, ratio = n/d ≥ 1."""
    lo, hi = (math.sqrt(ratio) - 1.0) ** 2, (math.sqrt(ratio) + 1.0) ** 2
    x = np.asarray(x, dtype=float)
    inside = (x > lo) & (x < hi)
    out = np.zeros_like(x)
    out[inside] = np.sqrt((hi - x[inside]) * (x[inside] - lo)) / (2.0 * math.pi * x[inside])
    return out
