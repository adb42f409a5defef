"""Projections onto the perturbation sets of the sharpness measurement: the certified ellipsoid
projection (adaptive l2) and the closed-form box (linf) and ball (plain l2).

A projection is an object: ``project(v, start) -> (P(v), start for the next call)`` and
``project.take_gap()``, the largest certified relative error of the calls since the last take_gap
(a 0-dim tensor on the vector's device; None where the projection is exact). ``make_projection``
picks the one for a (norm, adaptive) setting; measure/sharpness.py's APGD search calls it once per
step. The adaptive l2 set is the ellipsoid E = {d : Σ (d/s)² ≤ rho², d = 0 where s = 0} with
s = |w0|; ``EllipsoidProjection`` has the method and its certificate.
"""
import math

import torch

from utils.device import float64_on

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
    - on a CPU (``host_scalars=True``, the default there) the sums are in host memory already, and
      an operation on a Python float is far cheaper than one on a 0-dim tensor (each of which is a
      dispatched kernel; the GPU search does dozens per call), so the numbers are Python floats
      and the search stops as soon as its certificate is at most HOST_GAP_TARGET: warm calls start
      at the previous μ, take a model step, evaluate r (pairwise) and the slope there, and take
      another step only when the certificate asks for it (at most max(steps, 12)), which touches
      the vector fewer times than the fixed search (benchmarks/README.md has the counts and costs).

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
    try:
        power = (r2 / (rho * rho)) ** inv_k
    except OverflowError:  # a Python float raises where a tensor gives inf; the caller clamps μ to its bracket
        power = math.inf
    return mu + 0.5 * c / inv_k * (power - 1)


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
        return v * (self.rho / v.norm().to(float64_on(v.device))).clamp(max=1), None

    def take_gap(self):
        return None


def make_projection(scale, rho, norm, adaptive, steps=3, host_scalars=None):
    """The projection onto the (adaptive) l2 ball or linf box of radius rho (see above)."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"unknown norm '{norm}' (l2 or linf)")
    if norm == "l2" and adaptive:
        return EllipsoidProjection(scale, rho, steps, host_scalars)
    return ClosedFormProjection(scale, rho, norm)


def project_l2_ellipsoid_bisection(v, scale, rho, tol=1e-6, max_iter=200):
    """The earlier projection, the reference benchmarks/bench_sharpness.py and the tests compare with:
    the same KKT point found by bisection on λ = μ/2 with one host read per step (it stops when the
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
