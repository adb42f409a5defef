"""Sharpness of a trained model on fixed batches: worst case (APGD), average case, fisher.

All parameters are perturbed, the model stays in eval mode (BatchNorm uses its running statistics),
the loss is mean cross-entropy per batch. Parameters are handled as one flat vector ``w``; a
perturbation ``delta`` lives in the same flat space and the model is evaluated at ``w0 + delta``.

Adaptive sets (``adaptive=True``), with s = |w0| elementwise:
- l2:   Σ (delta / s)² ≤ rho²   (an ellipsoid; entries with s = 0 are pinned to 0)
- linf: |delta| ≤ rho · s       (a box; again 0 where s = 0)
Non-adaptive sets use s = 1.

The worst-case search is the APGD scheme of Andriushchenko et al. (2023) as released with SharpBalance:
step 2·rho, ascent along g/‖g‖₂·s (l2) or sign(g)·s (linf), Euclidean projection onto the set,
momentum delta ← 0.75·P(...) + 0.25·delta_prev (a convex combination of two feasible points, so the
iterate stays feasible), and at the checkpoints of ``apgd_checkpoints`` the step is halved when fewer
than 75% of the steps since the last checkpoint improved the loss, or when neither the step nor the
worst loss changed since then. What a halving does besides is ``restart``:
- ``release`` (default, the published numbers): the release loads the worst weights into the model
  but keeps its perturbation variables, so the next gradient is taken at the worst point and added
  to the *current* delta, whose momentum partner is still the previous iterate;
- ``worst``: delta and its momentum partner both return to the worst point.

The projections onto the sets are in measure/ellipsoid.py. Nothing inside a search on a GPU is read
back to the host: losses, the worst point and the halving rule are device tensors applied with
``torch.where``, the ellipsoid projection takes a fixed number of steps, and each batch's results
are copied to the host once, at its end. The host can then queue a whole batch of iterations
without waiting for one. On a CPU, where there is nothing to wait for, the ellipsoid projection
works with Python floats instead (see ``EllipsoidProjection``).

``fisher`` is the mean per-sample squared gradient norm over the batches, computed by the same
function as SharpBalance's scores (training/scores.py).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from measure.ellipsoid import make_projection
from training.scores import squared_grad_norms
from utils.device import float64_on

MOMENTUM = 0.75
MIN_UPDATE_RATIO = 0.75
STEP_SCALER = 0.5
# Largest certified relative error of an ellipsoid projection a measurement accepts (see
# measure/ellipsoid.EllipsoidProjection); the earlier bisection stopped within 1e-6 of the boundary,
# which bounds the error of the point itself only by ~1e-3.
PROJECTION_TOLERANCE = 1e-4


def apgd_checkpoints(n_iters):
    """Iterations at which APGD may halve its step: p0 = 0, p1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), checkpoint = ceil(p · n_iters), kept below
    n_iters. For 20 iterations: [5, 9, 12, 15, 16, 18, 19] (the float sums are part of the rule:
    0.22 + 0.19 + 0.16 + 0.13 lands just above 0.7, hence 15)."""
    p = [0.0, 0.22]
    points = [0, math.ceil(n_iters * 0.22)]
    while points[-1] < n_iters and points[-1] != points[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        points.append(math.ceil(p[-1] * n_iters))
    return [c for c in points[1:] if c < n_iters]


class LogitNormalization(nn.Module):
    """Centre the logits and scale them to unit L2 norm (the tml-epfl option)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        out = out - out.mean(dim=-1, keepdim=True)
        return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-10)


# ----------------------------------------------------------------------------- flat parameter views
class FlatModel:
    """Evaluate ``model`` at w0 + delta where w0 is the flat vector of all its parameters."""

    def __init__(self, model):
        self.model = model
        self.params = [p.requires_grad_(True) for p in model.parameters()]
        self.w0 = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def set(self, delta):
        torch.nn.utils.vector_to_parameters(self.w0 + delta, self.params)

    def restore(self):
        torch.nn.utils.vector_to_parameters(self.w0.clone(), self.params)

    def loss_err(self, x, y, delta=None):
        """Mean cross-entropy and error rate at w0 + delta, as 0-dim tensors on the model's device
        (read back by the caller once per batch, not here)."""
        if delta is not None:
            self.set(delta)
        with torch.no_grad():
            out = self.model(x)
            return F.cross_entropy(out, y), (out.argmax(dim=1) != y).to(out.dtype).mean()

    def grad(self, x, y, delta):
        self.set(delta)
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, self.params)])


def weight_scale(w0, adaptive):
    return w0.abs() if adaptive else torch.ones_like(w0)


# ----------------------------------------------------------------------------- worst case (APGD)
APGD_RESTARTS = ("release", "worst")


def _read(*values):
    """One device-to-host copy for a batch's results (0-dim tensors of one dtype), as floats."""
    return torch.stack(values).to("cpu", copy=True).tolist()


def apgd_batch(flat, x, y, rho, norm="l2", adaptive=True, n_iters=20, restart="release", trace=None,
               projection=None):
    """Worst-case loss on one batch. Returns floats (init_loss, init_err, worst_loss, worst_err,
    ‖δ_worst‖₂, projection gap); see the module docstring for ``restart``.

    The loop keeps everything on the device: the halving rule's counters and tests are tensors and
    ``torch.where`` applies them, so the host reads the batch's results once, at the end.
    ``trace``, when a list, receives every iterate delta (for the feasibility test); ``projection``
    is a projection object (``make_projection``), built here when None.
    """
    if restart not in APGD_RESTARTS:
        raise ValueError(f"unknown restart '{restart}' ({' or '.join(APGD_RESTARTS)})")
    zero = torch.zeros_like(flat.w0)
    init_loss, init_err = flat.loss_err(x, y, zero)
    if rho <= 0 or n_iters <= 0:
        flat.restore()
        return _read(init_loss, init_err, init_loss, init_err, zero.norm(), zero.new_zeros(()))
    scale = weight_scale(flat.w0, adaptive)
    project_onto_set = projection or make_projection(scale, rho, norm, adaptive)
    checkpoints = set(apgd_checkpoints(n_iters))
    delta = prev_delta = worst_delta = grad_point = zero
    worst_loss, worst_err = init_loss, init_err
    step = torch.full((), 2.0 * rho, dtype=flat.w0.dtype, device=flat.w0.device)
    prev_step, prev_worst_loss, prev_cp = step, init_loss, 0
    n_updates = torch.zeros((), dtype=torch.int64, device=flat.w0.device)
    mu = None  # the ellipsoid's multiplier: the next projection's start
    for i in range(n_iters):
        g = flat.grad(x, y, grad_point)
        if norm == "l2":
            ascent = g / (g.norm() + 1e-12) * scale
        else:
            ascent = g.sign() * scale
        candidate, mu = project_onto_set(delta + step * ascent, mu)
        prev_delta, delta = delta, MOMENTUM * candidate + (1 - MOMENTUM) * prev_delta
        if trace is not None:
            trace.append(delta.detach().clone())
        loss, err = flat.loss_err(x, y, delta)
        improved = loss > worst_loss
        worst_loss = torch.where(improved, loss, worst_loss)
        worst_err = torch.where(improved, err, worst_err)
        worst_delta = torch.where(improved, delta, worst_delta)
        n_updates = n_updates + improved
        grad_point = delta
        if i in checkpoints:  # the schedule is fixed, so this branch reads nothing from the device
            too_few = n_updates < MIN_UPDATE_RATIO * (i - prev_cp)
            stalled = (prev_step == step) & (prev_worst_loss == worst_loss)
            halve = too_few | stalled
            prev_step, prev_worst_loss, prev_cp = step, worst_loss, i
            n_updates = torch.zeros_like(n_updates)
            step = torch.where(halve, step * STEP_SCALER, step)
            if restart == "worst":
                delta = torch.where(halve, worst_delta, delta)
                prev_delta = torch.where(halve, worst_delta, prev_delta)
            # release: the worst weights were loaded into the model, so the next gradient is taken
            # there, while delta and prev_delta carry on; worst: the same point, as delta moved there
            grad_point = torch.where(halve, worst_delta, delta)
    flat.restore()
    gap = project_onto_set.take_gap()
    return _read(init_loss, init_err, worst_loss, worst_err, worst_delta.norm(),
                 zero.new_zeros(()) if gap is None else gap)


# ----------------------------------------------------------------------------- average case
def random_delta(w0, rho, norm, adaptive, generator):
    if norm == "l2":
        noise = torch.randn(w0.shape, generator=generator, device=w0.device, dtype=w0.dtype)
    elif norm == "linf":
        noise = 2 * torch.rand(w0.shape, generator=generator, device=w0.device, dtype=w0.dtype) - 1
    else:
        raise ValueError(f"unknown norm '{norm}' (l2 or linf)")
    return noise * rho * weight_scale(w0, adaptive)


def average_batch(flat, x, y, rho, norm="l2", adaptive=True, n_draws=100, generator=None):
    """Mean loss under random perturbations. Returns floats (init_loss, init_err, mean_loss, mean_err),
    read from the device once for the batch."""
    init_loss, init_err = flat.loss_err(x, y, torch.zeros_like(flat.w0))
    losses, errs = [], []
    for _ in range(n_draws):
        loss, err = flat.loss_err(x, y, random_delta(flat.w0, rho, norm, adaptive, generator))
        losses.append(loss)
        errs.append(err)
    flat.restore()
    wide = float64_on(flat.w0.device)  # means in float64 where the device has it
    mean_loss, mean_err = torch.stack(losses).to(wide).mean(), torch.stack(errs).to(wide).mean()
    return _read(init_loss.to(wide), init_err.to(wide), mean_loss, mean_err)


# ----------------------------------------------------------------------------- drivers
def _norms_and_rhos(norms, rhos):
    for norm in norms:
        for rho in rhos:
            yield norm, float(rho)


def setting_key(norm, rho):
    """The key of one (norm, rho) setting in the results and the CSV's ``setting`` column: the
    release's ``<norm>_<rho>`` with Python's float spelling (``l2_0.5``, ``linf_1.0``)."""
    return f"{norm}_{float(rho)}"


def _summary(init_losses, init_errs, losses, errs, delta_norms=None):
    init_losses, losses = np.asarray(init_losses), np.asarray(losses)
    init_errs, errs = np.asarray(init_errs), np.asarray(errs)
    out = {"sharpness": float(np.mean(losses - init_losses)),
           "error_increase": float(np.mean(errs - init_errs)),
           "init_loss": float(np.mean(init_losses)), "init_error": float(np.mean(init_errs)),
           "per_batch_sharpness": (losses - init_losses).tolist()}
    if delta_norms is not None:
        out["max_delta_norm"] = float(np.max(delta_norms)) if len(delta_norms) else 0.0
    return out


def uniform_loss(model, batches):
    """ln C, the cross-entropy of a uniform guess over the model's C classes (one tiny forward pass)."""
    if not batches:
        return float("nan")
    with torch.no_grad():
        return math.log(model(batches[0][0][:1]).shape[-1])


def worst_case_sharpness(model, batches, rhos=(0.5,), norms=("l2", "linf"), adaptive=True,
                         n_iters=20, restart="release", desc="APGD_worst"):
    """{``<norm>_<rho>``: summary} of worst-case sharpness over ``batches`` [(x, y), ...]. The
    summary's ``projection_gap`` is the largest certified relative tolerance of any ellipsoid
    projection in the search (0 for the linf box and the plain ball).

    ``saturated_fraction`` is the share of batches whose worst-case loss reached ``uniform_loss``
    (ln C): there the perturbation has destroyed the model, the loss is driven by how large the
    logits grow (linf at rho 0.5 reaches 1e9 and more, as in the release), and the number no longer
    says how flat the minimum is; a smaller radius does."""
    model.eval()
    chance = uniform_loss(model, batches)
    flat = FlatModel(model)
    scale = weight_scale(flat.w0, adaptive)
    results = {}
    for norm, rho in _norms_and_rhos(norms, rhos):
        projection = make_projection(scale, rho, norm, adaptive)
        rows = []
        for x, y in tqdm(batches, desc=f"{desc} {setting_key(norm, rho)}", leave=False):
            row = apgd_batch(flat, x, y, rho, norm, adaptive, n_iters, restart, projection=projection)
            if row[5] > PROJECTION_TOLERANCE:  # not seen in practice; redo the batch, converged
                row = apgd_batch(flat, x, y, rho, norm, adaptive, n_iters, restart,
                                 projection=make_projection(scale, rho, norm, adaptive, steps=12))
            rows.append(row)
        init_l, init_e, worst_l, worst_e, dn, gaps = (list(c) for c in zip(*rows))
        results[setting_key(norm, rho)] = dict(_summary(init_l, init_e, worst_l, worst_e, dn),
                                                 projection_gap=float(np.max(gaps)),  # np.max: a NaN shows
                                                 uniform_loss=chance,
                                                 saturated_fraction=float(np.mean(np.asarray(worst_l) >= chance)))
    flat.restore()
    return results


def average_case_sharpness(model, batches, rhos=(0.5,), norms=("l2", "linf"), adaptive=True,
                           n_draws=100, seed=0, desc="APGD_average"):
    model.eval()
    flat = FlatModel(model)
    results = {}
    for norm, rho in _norms_and_rhos(norms, rhos):
        generator = torch.Generator(device=flat.w0.device)
        generator.manual_seed(seed)
        rows = [average_batch(flat, x, y, rho, norm, adaptive, n_draws, generator)
                for x, y in tqdm(batches, desc=f"{desc} {setting_key(norm, rho)}", leave=False)]
        init_l, init_e, mean_l, mean_e = (list(c) for c in zip(*rows))
        results[setting_key(norm, rho)] = _summary(init_l, init_e, mean_l, mean_e)
    flat.restore()
    return results


def fisher_sharpness(model, batches, desc="fisher"):
    """Mean per-sample squared gradient norm over the batches [(x, y), ...] (the trace of the
    empirical Fisher), each batch in one piece."""
    device = batches[0][0].device if batches else torch.device("cpu")
    indexed, start = [], 0
    for x, y in batches:  # squared_grad_norms places each sample's norm at its index
        indexed.append((x, y, torch.arange(start, start + len(y))))
        start += len(y)
    values = squared_grad_norms(model, indexed, device, chunk_size=max([len(y) for _, y in batches], default=1),
                                progress=True, num_samples=start, desc=desc).double().numpy()
    return {"fisher": float(values.mean()), "n": int(values.size)}


def release_shuffle_order(n, seed):
    """The sample order of ``torch.manual_seed(seed); DataLoader(ds, shuffle=True)``, as the release
    drew its sharpness batches: the loader draws a base seed first, then RandomSampler draws its own
    seed, seeds a fresh generator and takes ``randperm(n)``."""
    g = torch.Generator().manual_seed(int(seed))
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's worker base seed
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=g).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed))
