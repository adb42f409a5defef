"""Sharpness of a trained model on fixed batches: worst case (APGD), average case, Fisher.

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
iterate stays feasible), and at the checkpoints of ``apgd_checkpoints`` the step is halved and the
search returns to the worst point found when fewer than 75% of the steps since the last checkpoint
improved the loss, or when neither the step nor the worst loss changed since then.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

MOMENTUM = 0.75
MIN_UPDATE_RATIO = 0.75
STEP_SCALER = 0.5


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
        if delta is not None:
            self.set(delta)
        with torch.no_grad():
            out = self.model(x)
            loss = F.cross_entropy(out, y).item()
            err = (out.argmax(dim=1) != y).float().mean().item()
        return loss, err

    def grad(self, x, y, delta):
        self.set(delta)
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, self.params)])


def weight_scale(w0, adaptive):
    return w0.abs() if adaptive else torch.ones_like(w0)


def weighted_norm(delta, scale):
    """‖delta / scale‖₂ over entries with scale > 0 (entries with scale = 0 are excluded)."""
    mask = scale > 0
    return torch.sqrt(((delta[mask] / scale[mask]) ** 2).sum())


def project_l2_ellipsoid(v, scale, rho, tol=1e-6, max_iter=200):
    """Euclidean projection of v onto {d : Σ (d/scale)² ≤ rho², d = 0 where scale = 0}.

    KKT: d = v·s²/(s² + 2λ) with λ ≥ 0 chosen so the constraint is tight; the weighted norm is
    decreasing in λ, so λ is found by bisection. The returned point is always feasible (the upper end
    of the bracket is used), within ``tol`` (relative) of the boundary.
    """
    s2 = scale * scale
    v = torch.where(s2 > 0, v, torch.zeros_like(v))
    if rho <= 0:
        return torch.zeros_like(v)

    def norm_at(lmbd):
        # ‖d/s‖² = Σ v² s² / (s² + 2λ)²
        return torch.sqrt((v * v * s2 / (s2 + 2 * lmbd) ** 2).sum()).item()

    if weighted_norm(v, scale).item() <= rho:
        return v
    low, high = 0.0, 1.0
    while norm_at(high) > rho:
        low, high = high, high * 2.0
        if high > 1e30:  # pragma: no cover - only with absurd inputs
            break
    for _ in range(max_iter):
        mid = 0.5 * (low + high)
        value = norm_at(mid)
        if value > rho:
            low = mid
        else:
            high = mid
            if rho - value <= tol * rho:
                break
        if high - low <= tol * high:
            break
    return v * s2 / (s2 + 2 * high)


def project(v, scale, rho, norm, adaptive):
    if norm == "linf":
        bound = rho * scale
        return torch.maximum(torch.minimum(v, bound), -bound)
    if norm != "l2":
        raise ValueError(f"unknown norm '{norm}' (l2 or linf)")
    if adaptive:
        return project_l2_ellipsoid(v, scale, rho)
    length = v.norm().item()
    return v * (rho / length) if length > rho else v


def in_set(delta, scale, rho, norm, rtol=1e-5):
    """True if delta lies in the (adaptive) l2 ellipsoid / linf box of radius rho."""
    if bool((delta[scale == 0] != 0).any()):
        return False
    if norm == "linf":
        return bool((delta.abs() <= rho * scale * (1 + rtol) + 1e-12).all())
    return weighted_norm(delta, scale).item() <= rho * (1 + rtol) + 1e-12


# ----------------------------------------------------------------------------- worst case (APGD)
def apgd_batch(flat, x, y, rho, norm="l2", adaptive=True, n_iters=20, trace=None):
    """Worst-case loss on one batch. Returns (init_loss, init_err, worst_loss, worst_err, ‖δ_worst‖₂).

    ``trace``, when a list, receives every iterate delta (for the feasibility test).
    """
    init_loss, init_err = flat.loss_err(x, y, torch.zeros_like(flat.w0))
    if rho <= 0 or n_iters <= 0:
        return init_loss, init_err, init_loss, init_err, 0.0
    scale = weight_scale(flat.w0, adaptive)
    checkpoints = set(apgd_checkpoints(n_iters))
    delta = torch.zeros_like(flat.w0)
    prev_delta = delta.clone()
    worst_delta = delta.clone()
    worst_loss, worst_err = init_loss, init_err
    step = prev_step = 2.0 * rho
    prev_worst_loss, prev_cp, n_updates = init_loss, 0, 0
    for i in range(n_iters):
        g = flat.grad(x, y, delta)
        if norm == "l2":
            ascent = g / (g.norm() + 1e-12) * scale
        else:
            ascent = g.sign() * scale
        candidate = project(delta + step * ascent, scale, rho, norm, adaptive)
        new_delta = MOMENTUM * candidate + (1 - MOMENTUM) * prev_delta
        prev_delta, delta = delta, new_delta
        if trace is not None:
            trace.append(delta.detach().clone())
        loss, err = flat.loss_err(x, y, delta)
        if loss > worst_loss:
            worst_loss, worst_err, worst_delta = loss, err, delta.clone()
            n_updates += 1
        if i in checkpoints:
            too_few = n_updates < MIN_UPDATE_RATIO * (i - prev_cp)
            stalled = prev_step == step and prev_worst_loss == worst_loss
            prev_step, prev_worst_loss, prev_cp, n_updates = step, worst_loss, i, 0
            if too_few or stalled:
                step *= STEP_SCALER
                delta, prev_delta = worst_delta.clone(), worst_delta.clone()
    flat.restore()
    return init_loss, init_err, worst_loss, worst_err, worst_delta.norm().item()


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
    """Mean loss under random perturbations. Returns (init_loss, init_err, mean_loss, mean_err)."""
    init_loss, init_err = flat.loss_err(x, y, torch.zeros_like(flat.w0))
    losses, errs = [], []
    for _ in range(n_draws):
        loss, err = flat.loss_err(x, y, random_delta(flat.w0, rho, norm, adaptive, generator))
        losses.append(loss)
        errs.append(err)
    flat.restore()
    return init_loss, init_err, float(np.mean(losses)), float(np.mean(errs))


# ----------------------------------------------------------------------------- Fisher
def per_sample_sq_grad_norms(model, x, y):
    """‖∇_θ CE(f(x_i), y_i)‖² for every sample of the batch (vmap over torch.func; eval mode)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.reshape(len(x), -1).pow(2).sum(dim=1) for g in grads.values())


# ----------------------------------------------------------------------------- drivers
def _norms_and_rhos(norms, rhos):
    for norm in norms:
        for rho in rhos:
            yield norm, float(rho)


def sharpness_key(norm, rho):
    """The release's result key, ``<norm>_<rho>`` with Python's float spelling (``l2_0.5``, ``linf_1.0``)."""
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


def worst_case_sharpness(model, batches, rhos=(0.5,), norms=("l2", "linf"), adaptive=True,
                         n_iters=20, desc="APGD_worst"):
    """{``<norm>_<rho>``: summary} of worst-case sharpness over ``batches`` [(x, y), ...]."""
    model.eval()
    flat = FlatModel(model)
    results = {}
    for norm, rho in _norms_and_rhos(norms, rhos):
        rows = [apgd_batch(flat, x, y, rho, norm, adaptive, n_iters)
                for x, y in tqdm(batches, desc=f"{desc} {sharpness_key(norm, rho)}", leave=False)]
        init_l, init_e, worst_l, worst_e, dn = (list(c) for c in zip(*rows))
        results[sharpness_key(norm, rho)] = _summary(init_l, init_e, worst_l, worst_e, dn)
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
                for x, y in tqdm(batches, desc=f"{desc} {sharpness_key(norm, rho)}", leave=False)]
        init_l, init_e, mean_l, mean_e = (list(c) for c in zip(*rows))
        results[sharpness_key(norm, rho)] = _summary(init_l, init_e, mean_l, mean_e)
    flat.restore()
    return results


def fisher_sharpness(model, batches, desc="fisher"):
    """Mean per-sample squared gradient norm (trace of the empirical Fisher) over the batches."""
    model.eval()
    values = [per_sample_sq_grad_norms(model, x, y).detach().cpu()
              for x, y in tqdm(batches, desc=desc, leave=False)]
    values = torch.cat(values).double().numpy()
    return {"fisher": float(values.mean()), "n": int(values.size)}


def release_shuffle_order(n, seed):
    """The sample order of ``torch.manual_seed(seed); DataLoader(ds, shuffle=True)``, as the release
    drew its sharpness batches: the loader draws a base seed first, then RandomSampler draws its own
    seed, seeds a fresh generator and takes ``randperm(n)``."""
    g = torch.Generator().manual_seed(int(seed))
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's worker base seed
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=g).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed))
