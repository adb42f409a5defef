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
iterate stays feasible), and at the checkpoints of ``apgd_checkpoints`` the step is halved when fewer
than 75% of the steps since the last checkpoint improved the loss, or when neither the step nor the
worst loss changed since then. What a halving does besides is ``restart``:
- ``release`` (default, the published numbers): the release loads the worst weights into the model
  but keeps its perturbation variables, so the next gradient is taken at the worst point and added
  to the *current* delta, whose momentum partner is still the previous iterate;
- ``worst``: delta and its momentum partner both return to the worst point.

Nothing inside a search on a GPU is read back to the host: losses, the worst point and the halving
rule are device tensors applied with ``torch.where``, the ellipsoid projection takes a fixed number
of steps, and each batch's results are copied to the host once, at its end. The host can then
queue a whole batch of iterations without waiting for one. On a CPU, where there is nothing to
wait for, the ellipsoid projection works with Python floats instead (see EllipsoidProjection).
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
# Largest certified relative error of an ellipsoid projection a measurement accepts (see
# EllipsoidProjection); the old bisection stopped within 1e-6 of the boundary, which bounds the
# error of the point itself only by ~1e-3.
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


def weighted_norm(delta, scale):
    """‖delta / scale‖₂ over entries with scale > 0 (entries with scale = 0 are excluded)."""
    inside = scale > 0
    return torch.where(inside, delta / torch.where(inside, scale, 1), 0).norm()


def _float64(t):
    """``t`` in float64, as the host arithmetic of the earlier code (Python floats) had it; MPS has
    no float64 and keeps its dtype."""
    return t if t.device.type == "mps" else t.double()


# ----------------------------------------------------------------------------- projections
# A projection is an object: ``project(v, start) -> (P(v), start for the next call)`` and
# ``project.take_gap()``, the largest certified relative error of the calls since the last
# take_gap (a 0-dim tensor on the vector's device; None where the projection is exact).
HOST_GAP_TARGET = 1e-5  # the host search takes model steps until its certificate is this small


def default_host_scalars(device):
    """Whether the ellipsoid search on ``device`` keeps its numbers on the host by default: on a CPU
    (where they are in host memory already), not on a GPU (see EllipsoidProjection)."""
    return torch.device(device).type == "cpu"


def ellipsoid_search(device):
    """The name of the ellipsoid search ``device`` runs by default, as results record it."""
    return "host scalars" if default_host_scalars(device) else "device scalars"


class EllipsoidProjection:
    """Euclidean projection onto E = {d : Σ (d/s)² ≤ rho², d = 0 where s = 0} for a fixed scale s.

    KKT: P(v) = v·a/(a + μ) with a = s² and μ ≥ 0 (twice the Lagrange multiplier) the root of
    r(μ) = rho, where r(μ)² = Σ g²/(a + μ)² and g = v·s; r falls from ‖v/s‖ at μ = 0 towards 0.

    Model step. From a point μ, evaluate r², its slope and its curvature (three passes over the
    vector, three dot products) and move to the root of the model r² ≈ c·(b + μ)^(−k) that matches
    all three (exact when the a's with weight are all equal, k = 2; Cauchy–Schwarz keeps
    0 < k ≤ 2), a hair (1e-6) above it so that the next point lands on the feasible side, clamped
    to the bracket of (3) below. The cold start is the exact root for equal a's,
    μ₀ = ā(‖v/s‖/rho − 1) with ā = Σv²/Σ(v/s)² (0 inside the set).

    Two searches, one per kind of device, with the same answer to float32's floor (the tests check
    both against a float64 solution):
    - on a GPU (``host_scalars=False``) every number stays a 0-dim device tensor and nothing is read
      back: a fixed ``steps`` evaluations (one more cold), warm calls starting at the geometric
      mean of μ₀ and the previous call's μ, the certificate worked out for a whole batch in
      ``take_gap``;
    - on a CPU (``host_scalars=True``, the default there) the sums are in host memory already and a
      float operation costs ~0.1 µs where a 0-dim tensor operation costs ~5 µs (the GPU search's
      ~50 of them cost as much as four passes over the demo's width-8 ResNet18), so the numbers are
      Python floats and the search stops as soon as its certificate is at most HOST_GAP_TARGET:
      warm calls start at the previous μ, take a model step, evaluate r (pairwise) and the slope
      there, and take another step only when the certificate asks for it (at most
      max(steps, 12)). On the release's problems that is 1.6 model steps per call and about 19
      passes over the vector (element-wise and sums) instead of 26.

    Certificate. Three facts about ψ = 1/r for μ ≥ 0:
      (1) ψ(μ) = (Σ g² (a + μ)⁻²)^(−1/2) is a power mean of exponent −2 of the a_i + μ: concave and
          increasing, so a Newton step on ψ = 1/rho from *any* point whose slope is known lands at
          or below the root μ*;
      (2) a power mean is 1-homogeneous, hence superadditive: ψ(μ + t) ≥ ψ(μ) + t/‖g‖; from a point
          with r > rho, μ + (1/rho − ψ(μ))·‖g‖ is at or above μ*;
      (3) ‖g‖/(a_max + μ) ≤ r(μ) ≤ ‖g‖/(a_min + μ), so μ* lies in [‖g‖/rho − a_max, ‖g‖/rho − a_min].
    They give lo ≤ μ* ≤ hi. The answer is c·P(μ) at the last point, c = min(1, rho/r(μ)):
    feasible, each coordinate with the sign of the exact projection's and, as (a + μ*)/(a + μ)
    lies between (a + lo)/(a + μ) and (a + hi)/(a + μ), a size within a factor 1 ± gap of it,
    gap = max(1 − c·(a_min + lo)/(a_min + μ), c·(a_min + hi)/(a_min + μ) − 1) (for μ ≥ μ*: c = 1 and
    gap = (μ − lo)/(a_min + μ)). Float32 sums round too: the norm that decides is summed pairwise
    (torch.sum, ~1e-8 relative here), the dot products (~1e-6) only steer.
    """

    def __init__(self, scale, rho, steps=3, host_scalars=None):
        on = scale > 0
        self.scale, self.rho, self.steps = scale, float(rho), steps
        self.host = default_host_scalars(scale.device) if host_scalars is None else bool(host_scalars)
        self.a = torch.where(on, scale * scale, 1)             # g = 0 off the set, any a > 0 will do
        self.a_min = torch.where(on, self.a, math.inf).amin()
        self.a_max = torch.where(on, self.a, 0).amax()
        if self.host:
            self.a_min, self.a_max = self.a_min.item(), self.a_max.item()
        # Work vectors, reused: a fresh tensor of this size per pass costs as much as the pass
        # itself on a CPU (the memory comes back from the system zeroed). The passes are bound by
        # memory traffic, so the search touches as few vectors as it can: s, a, v and these.
        self._g, self._x, self._p, self._t = (torch.empty_like(scale) for _ in range(4))
        self._certificates = []

    def __call__(self, v, start=None):
        """(P(v), μ); μ (a 0-dim tensor, a float on the host) is the next call's ``start`` (0 when
        v was inside the set, which means no hint)."""
        if self.rho <= 0:
            return torch.zeros_like(v), (0.0 if self.host else v.new_zeros(()))
        g = torch.mul(v, self.scale, out=self._g)
        return self._search_on_host(g, start) if self.host else self._search_on_device(g, start)

    def _search_on_device(self, g, start):
        rho, x, p, t = self.rho, self._x, self._p, self._t
        g_norm = torch.dot(g, g).sqrt()
        # (3); a negative upper end means v is inside the set (r(0) ≤ ‖g‖/a_min < rho): μ = 0
        lo, hi = (g_norm / rho - self.a_max).clamp_min(0), (g_norm / rho - self.a_min).clamp_min(0)
        u = torch.div(g, self.a, out=t)                        # v/s on the set, 0 off it
        r0sq, m1 = torch.dot(u, u), torch.dot(u, g)            # Σ(v/s)², Σv²
        mu = torch.where(r0sq > rho * rho, m1 / r0sq * (r0sq.sqrt() / rho - 1), 0)
        if start is not None:  # a start of 0 (the last calls were inside the set) says nothing
            mu = torch.where(start > 0, (mu * start).sqrt(), mu)
        mu = mu.clamp(lo, hi)
        steps = self.steps if start is not None else self.steps + 1
        for step in range(steps):
            torch.add(self.a, mu, out=x)
            torch.div(g, x, out=p)
            torch.div(p, x, out=t)
            q = torch.dot(p, t)                                # −½ d(r²)/dμ
            # r² summed pairwise where it decides (the last two points), by a dot product before
            r2 = torch.mul(p, p, out=x).sum() if step + 2 >= steps else torch.dot(p, p)
            if step + 1 == steps:
                break
            # dot(t, t) is d²(r²)/dμ² / 6. The step before the last aims 1e-6 above the model's
            # root, so that the last point lands on the feasible side.
            stepped = _model_root(mu, r2, q, torch.dot(t, t), rho)
            mu = torch.where(q > 0, stepped, mu)               # q = 0 only when v = 0 on the set
            if step + 2 == steps:
                mu = mu * (1 + 1e-6)
            mu = mu.clamp(lo, hi)
        r = r2.sqrt()
        c = (rho / r).clamp(max=1)
        self._certificates.append((mu, r, q, g_norm, lo, hi))  # the gaps: in take_gap
        # the next call starts here, or where the last call outside the set ended
        return torch.mul(p, self.scale).mul_(c), mu if start is None else torch.where(mu > 0, mu, start)

    def _search_on_host(self, g, start):
        rho, x, p, t = self.rho, self._x, self._p, self._t
        g_norm = math.sqrt(torch.dot(g, g).item())
        lo, hi = max(g_norm / rho - self.a_max, 0.0), max(g_norm / rho - self.a_min, 0.0)   # (3)
        if start and hi > 0:  # a start of 0 or None says nothing (the last calls were inside the set)
            mu = min(max(start, lo), hi)
        else:
            u = torch.div(g, self.a, out=t)                    # v/s on the set, 0 off it
            r0sq = torch.dot(u, u).item()                      # Σ(v/s)²
            if r0sq <= rho * rho:                              # inside: P(v) = v, exactly
                self._certificates.append(0.0)
                return torch.mul(u, self.scale), (start or 0.0)
            mu = min(max(torch.dot(u, g).item() / r0sq * (math.sqrt(r0sq) / rho - 1), lo), hi)
        torch.add(self.a, mu, out=x)
        torch.div(g, x, out=p)
        torch.div(p, x, out=t)
        q, r2, tt = torch.dot(p, t).item(), torch.dot(p, p).item(), torch.dot(t, t).item()
        for _ in range(max(self.steps, 12)):
            mu = min(max(_model_root(mu, r2, q, tt, rho) * (1 + 1e-6), lo), hi)
            torch.add(self.a, mu, out=x)
            torch.div(g, x, out=p)
            r2 = torch.mul(p, p, out=t).sum().item()          # summed pairwise: it decides
            r = math.sqrt(r2)
            torch.div(p, x, out=t)
            q = torch.dot(p, t).item()                         # −½ d(r²)/dμ
            gap = _certified_gap(_HOST_MATH, self.a_min, rho, mu, r, q, g_norm, lo, hi)
            if gap <= HOST_GAP_TARGET:
                break
            tt = torch.dot(t, t).item()                        # d²(r²)/dμ² / 6, for one more step
        self._certificates.append(gap)
        out = torch.mul(p, self.scale)
        c = min(rho / r, 1.0)
        if c < 1:
            out.mul_(c)
        return out, (mu if mu > 0 else (start or 0.0))

    def take_gap(self):
        if not self._certificates:
            return None
        if self.host:
            gap = self.scale.new_tensor(self._certificates).max()   # a NaN shows, as on the device
        else:
            columns = (torch.stack(column) for column in zip(*self._certificates))
            gap = _certified_gap(_DEVICE_MATH, self.a_min, self.rho, *columns).max()
        self._certificates = []
        return gap


def _model_root(mu, r2, q, tt, rho):
    """Root of the model r² ≈ c·(b + μ)^(−k) through r², slope −2q and curvature 6·tt at μ:
    1/k = 1.5·r²·tt/q² − 1, b + μ = k·r²/(2q) (floats or 0-dim tensors alike)."""
    c = r2 / q
    inv_k = 1.5 * tt * c / q - 1
    return mu + 0.5 * c / inv_k * ((r2 / (rho * rho)) ** inv_k - 1)


_HOST_MATH = (max, min, lambda condition, a, b: a if condition else b)
_DEVICE_MATH = (torch.maximum, torch.minimum, torch.where)


def _certified_gap(math_ops, a_min, rho, mu, r, q, g_norm, lo, hi):
    """The certificate of EllipsoidProjection at its last point (μ, r, q), floats or tensors alike."""
    maximum, minimum, where = math_ops
    zero = 0 * r
    c = minimum(rho / r, 1 + zero)
    newton = mu - (1 / r - 1 / rho) * r ** 3 / q                                        # (1): ψ' = q/r³
    lo = where(q > 0, maximum(lo, newton), lo)             # q = 0: v = 0 on the set, μ = 0, gap 0
    hi = minimum(hi, mu + maximum(1 / rho - 1 / r, zero) * g_norm)                      # (2), or μ itself
    # Inside the set P(v) = v is the μ = 0 end and the same bounds hold with lo = 0 (at μ = 0 the
    # gap is 0); hi from (2) means nothing there, but r ≤ rho makes it μ itself.
    low, high = (a_min + lo) / (a_min + mu), (a_min + hi) / (a_min + mu)
    return maximum(1 - c * low, c * high - 1)


class ClosedFormProjection:
    """The linf box |d| ≤ rho·s and the plain l2 ball ‖d‖ ≤ rho: one pass, exact."""

    def __init__(self, scale, rho, norm):
        self.bound, self.rho, self.norm = rho * scale, rho, norm

    def __call__(self, v, start=None):
        if self.norm == "linf":
            return torch.maximum(torch.minimum(v, self.bound), -self.bound), None
        # scale by min(1, rho/‖v‖) without asking the host which case it is
        return v * (self.rho / _float64(v.norm())).clamp(max=1), None

    def take_gap(self):
        return None


def make_projection(scale, rho, norm, adaptive, steps=3, host_scalars=None):
    """The projection onto the (adaptive) l2 ball or linf box of radius rho (see above)."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"unknown norm '{norm}' (l2 or linf)")
    if norm == "l2" and adaptive:
        return EllipsoidProjection(scale, rho, steps, host_scalars)
    return ClosedFormProjection(scale, rho, norm)


def project(v, scale, rho, norm, adaptive):
    return make_projection(scale, rho, norm, adaptive)(v)[0]


def project_l2_ellipsoid(v, scale, rho):
    return EllipsoidProjection(scale, rho)(v)[0]


def project_l2_ellipsoid_bisection(v, scale, rho, tol=1e-6, max_iter=200):
    """The earlier projection, kept as a reference for tests and benchmarks/bench_sharpness.py: the
    same KKT point found by bisection on λ = μ/2 with one host read per step (it stops when the
    weighted norm is within ``tol`` of rho or the bracket within ``tol`` relative)."""
    s2 = scale * scale
    v = torch.where(s2 > 0, v, torch.zeros_like(v))
    if rho <= 0:
        return torch.zeros_like(v)

    def norm_at(lmbd):
        return torch.sqrt((v * v * s2 / (s2 + 2 * lmbd) ** 2).sum()).item()

    mask = s2 > 0
    if torch.sqrt(((v[mask] / scale[mask]) ** 2).sum()).item() <= rho:
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


def in_set(delta, scale, rho, norm, rtol=1e-5):
    """True if delta lies in the (adaptive) l2 ellipsoid / linf box of radius rho (a test helper)."""
    if bool((delta[scale == 0] != 0).any()):
        return False
    if norm == "linf":
        return bool((delta.abs() <= rho * scale * (1 + rtol) + 1e-12).all())
    return weighted_norm(delta, scale).item() <= rho * (1 + rtol) + 1e-12


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
    mean_loss, mean_err = _float64(torch.stack(losses)).mean(), _float64(torch.stack(errs)).mean()
    return _read(_float64(init_loss), _float64(init_err), mean_loss, mean_err)


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
                         n_iters=20, restart="release", desc="APGD_worst"):
    """{``<norm>_<rho>``: summary} of worst-case sharpness over ``batches`` [(x, y), ...]. The
    summary's ``projection_gap`` is the largest certified relative tolerance of any ellipsoid
    projection in the search (0 for the linf box and the plain ball)."""
    model.eval()
    flat = FlatModel(model)
    scale = weight_scale(flat.w0, adaptive)
    results = {}
    for norm, rho in _norms_and_rhos(norms, rhos):
        projection = make_projection(scale, rho, norm, adaptive)
        rows = []
        for x, y in tqdm(batches, desc=f"{desc} {sharpness_key(norm, rho)}", leave=False):
            row = apgd_batch(flat, x, y, rho, norm, adaptive, n_iters, restart, projection=projection)
            if row[5] > PROJECTION_TOLERANCE:  # not seen in practice; redo the batch, converged
                row = apgd_batch(flat, x, y, rho, norm, adaptive, n_iters, restart,
                                 projection=make_projection(scale, rho, norm, adaptive, steps=12))
            rows.append(row)
        init_l, init_e, worst_l, worst_e, dn, gaps = (list(c) for c in zip(*rows))
        results[sharpness_key(norm, rho)] = dict(_summary(init_l, init_e, worst_l, worst_e, dn),
                                                 projection_gap=float(np.max(gaps)))  # np.max: a NaN shows
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
