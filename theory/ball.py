"""The worst-case perturbation of the theory's sharpness: the maximum of a convex quadratic over a ball."""
from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------------------------
# The worst-case perturbation: max of a convex quadratic over a ball, solved exactly
# ----------------------------------------------------------------------------------------------

def max_quadratic_on_ball(eigvals: np.ndarray, grad_coords: np.ndarray, radius: float,
                          bisection_steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Exact max of  h(ε) = gᵀε + ½εᵀBε  over ‖ε‖ ≤ radius, B ⪰ 0 given by its eigenbasis.

    Arguments are in B's eigenbasis: `eigvals` λ (..., d) and `grad_coords` g̃ = Vᵀg (..., d);
    leading dimensions are a batch. Returns (max value (...,), maximiser in the eigenbasis
    (..., d)).

    Why this is exact: h is convex, so its max over the ball is on the sphere ‖ε‖ = radius. The
    Lagrange condition g + Bε = με together with the second-order condition for a *global* max
    on the sphere (μI − B ⪰ 0, the trust-region characterisation) gives ε(μ) = (μI − B)⁻¹g with
    μ ≥ λ_max. Writing μ = λ_max + t, the norm ‖ε‖² = Σ g̃_i²/(t + λ_max − λ_i)² decreases in t,
    so the secular equation ‖ε‖ = radius has one root on (0, ‖g‖/radius]; bisection finds it to
    machine precision. Hard case: if g has no component along the top eigenspace and the limit
    t → 0⁺ already gives ‖ε‖ ≤ radius, then μ = λ_max and the missing norm is put along the top
    eigenvector (either sign gives the same value).
    """
    lam = np.asarray(eigvals, dtype=float)
    g = np.asarray(grad_coords, dtype=float)
    lam, g = np.broadcast_arrays(lam, g)
    gaps = lam.max(axis=-1, keepdims=True) - lam                # λ_max − λ_i ≥ 0
    g_norm = np.linalg.norm(g, axis=-1, keepdims=True)
    scale = np.maximum(g_norm, np.finfo(float).tiny)
    on_top = gaps <= 1e-12 * np.maximum(lam.max(axis=-1, keepdims=True), 1.0)
    top_gradient_is_zero = np.all(np.where(on_top, np.abs(g) <= 1e-14 * scale, True), axis=-1,
                                  keepdims=True)

    # Norm of ε at t → 0⁺ using only the directions below the top (finite in the hard case).
    below = ~on_top
    with np.errstate(divide="ignore", invalid="ignore"):
        limit_sq = np.sum(np.where(below, g ** 2 / np.where(below, gaps, 1.0) ** 2, 0.0), axis=-1,
                          keepdims=True)
    hard = top_gradient_is_zero & (limit_sq <= radius ** 2)

    # Bisection on t for the regular case (vectorised over the batch).
    lo = np.zeros_like(g_norm)
    hi = g_norm / radius + 1e-300                                 # here every |t + gap| ≥ ‖g‖/r
    # (0/0 can only occur on rows with g = 0 along the top, which the hard case overwrites.)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        for _ in range(bisection_steps):
            mid = 0.5 * (lo + hi)
            norm_sq = np.sum(g ** 2 / (mid + gaps) ** 2, axis=-1, keepdims=True)
            too_long = norm_sq > radius ** 2
            lo = np.where(too_long, mid, lo)
            hi = np.where(too_long, hi, mid)
            if np.all(hi - lo <= 4 * np.finfo(float).eps * hi):
                break
        t = hi                                                    # ‖ε(hi)‖ ≤ radius: feasible
        eps = np.nan_to_num(g / (t + gaps))
    # Put the (tiny) remaining norm back so ε lies exactly on the sphere.
    eps_norm = np.linalg.norm(eps, axis=-1, keepdims=True)
    eps = np.where(eps_norm > 0, eps * (radius / np.where(eps_norm > 0, eps_norm, 1.0)), eps)

    if np.any(hard):
        with np.errstate(divide="ignore", invalid="ignore"):
            eps_hard = np.where(below, g / np.where(below, gaps, 1.0), 0.0)
        missing = np.sqrt(np.maximum(radius ** 2 - np.sum(eps_hard ** 2, axis=-1, keepdims=True),
                                     0.0))
        first_top = on_top & (np.cumsum(on_top, axis=-1) == 1)   # one top direction per row
        eps_hard = eps_hard + np.where(first_top, missing, 0.0)
        eps = np.where(hard, eps_hard, eps)

    value = np.sum(g * eps, axis=-1) + 0.5 * np.sum(lam * eps ** 2, axis=-1)
    return value, eps
