"""The sharpness–diversity trade-off on a noiseless linear model: closed forms and simulations.

This module backs `theoretical_verification.ipynb` (SPEC §7). The model:

    A ∈ R^{n×d} with i.i.d. N(0, 1/d) entries, teacher ŵ, labels y = Aŵ,
    loss f(w) = ½‖Aw − y‖² = ½ (w − ŵ)ᵀ B (w − ŵ)  with  B = AᵀA.

A member starts at w₀ ~ N(0, σ²I) and takes k un-normalised SAM steps
w ← w − η∇f(w + ρ∇f(w)). Because ∇f(w) = B(w − ŵ), one step maps the error
w − ŵ to (I − ηB − ηρB²)(w − ŵ), so after k steps

    w_k − ŵ = P^k (w₀ − ŵ)  with  P = p(B),  p(λ) = 1 − ηλ − ηρλ².

Everything about a member is therefore a *function of the spectrum of B*; that is what makes
both the closed forms (random-matrix moments) and the fast simulations (one eigendecomposition
per data set, reused for every ρ and k) possible.

Diversity is the prediction variance across inits on a test design T ∈ R^{p×d} (N(0, 1/d) rows),
averaged over the p test points. Sharpness is the worst loss increase in a ρ₀-ball around the
expected member, max_{‖ε‖≤ρ₀} f(E w_k + ε) − f(E w_k).

SharpBalance, in the theory, splits the n rows into s disjoint equal parts and lets each member
run SAM on its own part only (ratio n/(s·d) instead of n/d); diversity is then pooled over the
random init *and* the member, and sharpness is measured on the full loss at the ensemble mean.

All random functions take an explicit `numpy.random.Generator` (or a seed) so two runs with the
same seed give bit-identical numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import polynomial as npoly

# The paper's / SPEC §7 settings. The notebook and the tests read them from here so the numbers
# they print are about the same experiment.
SPEC_SETTINGS = dict(n=3000, d=150, p=1000, s=10, sigma2=0.1, eta=0.01, rho0=0.01, k=3)


# ----------------------------------------------------------------------------------------------
# Closed forms: Narayana numbers, Marchenko–Pastur moments, φ
# ----------------------------------------------------------------------------------------------

def narayana(m: int, l: int) -> int:
    """Narayana number N(m, l) = C(m−1, l−1)·C(m, l−1)/l (exact integer), for 1 ≤ l ≤ m.

    N(m, l) counts non-crossing partitions of {1..m} with l blocks; that is why they appear as
    the coefficients of Wishart (Marchenko–Pastur) moments below.
    """
    if not (1 <= l <= m):
        raise ValueError(f"narayana({m}, {l}): need 1 <= l <= m")
    return math.comb(m - 1, l - 1) * math.comb(m, l - 1) // l


def mp_moment(m: int, ratio: float) -> float:
    """Limit of E[(1/d) tr (AᵀA)^m] for A ∈ R^{n×d} with N(0, 1/d) entries and ratio = n/d.

    Write AᵀA = ratio · W where W = (1/n)·d·AᵀA is a sample covariance with aspect d/n; the
    Marchenko–Pastur moments of W are Σ_l N(m,l)(d/n)^{l−1}. Multiplying by ratio^m and using the
    symmetry N(m,l) = N(m, m+1−l) gives the compact form Σ_{l=1}^m N(m,l)·ratio^l.
    For SAM on all data ratio = n/d; for a SharpBalance member on one of s splits ratio = n/(s·d)
    (the entries keep their 1/d scale, only the number of rows shrinks).
    The 0-th moment is 1 (normalised trace of the identity).
    """
    if m < 0:
        raise ValueError("moment order must be >= 0")
    if m == 0:
        return 1.0
    return float(sum(narayana(m, l) * ratio ** l for l in range(1, m + 1)))


def sam_step_polynomial(eta: float, rho: float) -> np.ndarray:
    """Coefficients (increasing degree) of p(λ) = 1 − ηλ − ηρλ², the one-step SAM error map."""
    return np.array([1.0, -eta, -eta * rho])


def phi(i: int, j: int, ratio: float, eta: float, rho: float) -> float:
    """φ(i, j) = lim E[(1/d) tr( p(AᵀA)^i (AᵀA)^j )],  p(λ) = 1 − ηλ − ηρλ².

    Expanding p(λ)^i λ^j into powers of λ turns the expectation into a linear combination of
    Marchenko–Pastur moments. This is the same quantity as the paper's triple multinomial sum
    over (k1, k2, k3); we expand the polynomial directly. Unlike the released notebook we keep
    the sign (it wrapped the result in abs()): φ(i, ·) with odd i can be genuinely negative when
    p(λ) < 0 on part of the spectrum, and every φ the theorems use at the SPEC settings is either
    an even power of p or has p > 0 on the whole spectrum, so the two agree there.
    """
    if i < 0 or j < 0:
        raise ValueError("phi needs i, j >= 0")
    coefficients = npoly.polypow(sam_step_polynomial(eta, rho), i) if i > 0 else np.array([1.0])
    coefficients = np.concatenate([np.zeros(j), coefficients])  # multiply by λ^j
    terms = [c * mp_moment(m, ratio) for m, c in enumerate(coefficients) if c != 0.0]
    return math.fsum(terms)  # fsum: the alternating terms cancel heavily for large i


def mp_edges(ratio: float) -> tuple[float, float]:
    """Edges (√ratio ∓ 1)² of the limiting spectrum of AᵀA (ratio = n/d ≥ 1)."""
    return (math.sqrt(ratio) - 1.0) ** 2, (math.sqrt(ratio) + 1.0) ** 2


def mp_density(x: np.ndarray | float, ratio: float) -> np.ndarray:
    """Limiting eigenvalue density of AᵀA (N(0,1/d) entries, ratio = n/d ≥ 1).

    Used only as an independent check of the moment formula (numerical integration).
    """
    lo, hi = mp_edges(ratio)
    x = np.asarray(x, dtype=float)
    inside = (x > lo) & (x < hi)
    out = np.zeros_like(x)
    out[inside] = np.sqrt((hi - x[inside]) * (x[inside] - lo)) / (2.0 * math.pi * x[inside])
    return out


# ----------------------------------------------------------------------------------------------
# Theorem 1 (SAM) and Theorem 2 (SharpBalance)
# ----------------------------------------------------------------------------------------------

def sam_diversity_theory(k: int, n: int, d: int, eta: float, rho: float, sigma2: float) -> float:
    """Theorem 1: prediction variance of k-step SAM across inits = φ(2k, 0)·σ².

    Why: w_k − E w_k = P^k w₀, so the variance of a prediction tᵀw_k is σ² tᵀP^{2k}t; a test
    row t with N(0, 1/d) entries averages this to σ²·(1/d) tr P^{2k} → σ² φ(2k, 0).
    """
    return phi(2 * k, 0, n / d, eta, rho) * sigma2


def sam_sharpness_bounds_theory(k: int, n: int, d: int, eta: float, rho: float, rho0: float,
                                w_hat_norm: float) -> tuple[float, float]:
    """Theorem 1: (lower, upper) bounds on the expected sharpness of the expected SAM member.

    With e = E w_k − ŵ = −P^k ŵ the loss increase is  eᵀBε + ½εᵀBε,  whose max over ‖ε‖ ≤ ρ₀
    lies between ρ₀‖Be‖ + ½ρ₀²λ_min(B) (take ε along Be) and ρ₀‖Be‖ + ½ρ₀²λ_max(B)
    (Cauchy–Schwarz); the extreme eigenvalues tend to (√(n/d) ∓ 1)². Jensen bounds E‖Be‖ above by
    √(E‖Be‖²) = √φ(2k, 2)·‖ŵ‖; the lower bound subtracts the paper's Jensen-gap term
    ρ₀(φ(4k, 4) − φ(2k, 2)²)/(2‖ŵ‖φ(2k, 2)^{3/2}) (as stated in the paper and its notebook).
    """
    ratio = n / d
    lam_min, lam_max = mp_edges(ratio)
    phi_2k_2 = phi(2 * k, 2, ratio, eta, rho)
    phi_4k_4 = phi(4 * k, 4, ratio, eta, rho)
    gradient_term = rho0 * math.sqrt(phi_2k_2) * w_hat_norm
    jensen_gap = rho0 * (phi_4k_4 - phi_2k_2 ** 2) / (2.0 * w_hat_norm * phi_2k_2 ** 1.5)
    lower = 0.5 * rho0 ** 2 * lam_min + gradient_term - jensen_gap
    upper = 0.5 * rho0 ** 2 * lam_max + gradient_term
    return lower, upper


def sharpbalance_diversity_theory(k: int, n: int, d: int, s: int, eta: float, rho: float,
                                  sigma2: float, w_hat_norm: float) -> float:
    """Theorem 2: pooled prediction variance of SharpBalance members (one split each).

        φ(2k,0)σ² + (s−1)/(s·d)·(φ(2k,0) − φ(k,0)²)·‖ŵ‖²,  φ at ratio n/(s·d).

    Why: the first term is the init noise of one member (as for SAM, but on n/s rows). The second
    is new: members see different data, so their mean predictions P_i^k ŵ differ; the spread of
    those means over the s members is (s−1)/s times the spectral variance φ(2k,0) − φ(k,0)² of
    P^k, per unit ‖ŵ‖²/d. SAM on all data has no such term — this is the extra diversity.
    """
    ratio = n / (s * d)
    phi_2k_0 = phi(2 * k, 0, ratio, eta, rho)
    phi_k_0 = phi(k, 0, ratio, eta, rho)
    return phi_2k_0 * sigma2 + (s - 1) / (s * d) * (phi_2k_0 - phi_k_0 ** 2) * w_hat_norm ** 2


def sharpbalance_gradient_moment_paper(k: int, n: int, d: int, s: int, eta: float,
                                       rho: float) -> float:
    """The paper's closed form for s²·E‖B e‖²/‖ŵ‖², e = −(1/s)Σ_i P_i^k ŵ, B = Σ_j B_j.

    Expanding ‖Σ_j B_j Σ_i P_i^k ŵ‖² gives s⁴ terms ŵᵀP_{i'}^k B_{j'} B_j P_i^k ŵ, grouped by which
    of the split indices coincide. This is the grouping used by the paper's Theorem 2 (and its
    notebook), kept as published so the plotted bound is the paper's; see
    `sharpbalance_gradient_moment_free` for the grouping that free probability gives.
    """
    r = n / (s * d)
    f = {(a, b): phi(a, b, r, eta, rho) for a, b in [(2 * k, 2), (2 * k, 1), (2 * k, 0),
                                                      (k, 2), (k, 1), (k, 0)]}
    return (s * f[2 * k, 2]
            + 2 * s * (s - 1) * r * f[2 * k, 1]
            + 2 * s * (s - 1) * f[k, 2] * f[k, 0]
            + s * (s - 1) * r * (1 + r) * f[2 * k, 0]
            + 2 * s * (s - 1) * f[k, 1] ** 2
            + 1.5 * s * (s - 1) * (s - 2) * r * (1 + r) * f[k, 0] ** 2
            + 1.5 * s * (s - 1) * (s - 2) * r ** 2 * f[2 * k, 0]
            + 3 * s * (s - 1) * (s - 2) * r * f[k, 0] * f[k, 1]
            + s * (s - 1) * (s - 2) * (s - 3) * r ** 2 * f[k, 0] ** 2)


def sharpbalance_gradient_moment_free(k: int, n: int, d: int, s: int, eta: float,
                                      rho: float) -> float:
    """s²·E‖B e‖²/‖ŵ‖² from asymptotic freeness of the s independent split Gram matrices.

    Write Q = P^k and τ = lim E(1/d)tr. For a word ŵᵀQ_{i'}B_{j'}B_jQ_iŵ the expectation is
    ‖ŵ‖²τ(Q_{i'}B_{j'}B_jQ_i). Grouping the s⁴ index tuples by coincidence pattern:
      all equal (s):                 τ(Q²B²) = φ(2k,2)
      two values, 7 patterns (s(s−1) each):
        {i,i'}{j,j'}  τ(Q²)τ(B²);   {i,i',j}{j'} and {i,i',j'}{j}  τ(Q²B)τ(B);
        {i,j,j'}{i'} and {i',j,j'}{i}  τ(QB²)τ(Q);   {i,j}{i',j'}  τ(QB)²;
        {i,j'}{i',j}  alternating word, τ(QB)·2τ(Q)τ(B) − τ(Q)²τ(B)²
      three values, 6 patterns (s(s−1)(s−2) each):
        {i,i'}  τ(Q²)τ(B)²;  {j,j'}  τ(Q)²τ(B²);  the four mixed pairs  τ(QB)τ(Q)τ(B)
      four values (s(s−1)(s−2)(s−3)):  τ(Q)²τ(B)²
    with τ(B) = r, τ(B²) = r + r², r = n/(s·d). Differs from the paper's grouping in the
    alternating pattern and in how the three-value patterns are weighted.
    """
    r = n / (s * d)
    q, q2 = phi(k, 0, r, eta, rho), phi(2 * k, 0, r, eta, rho)
    qb, qbb = phi(k, 1, r, eta, rho), phi(k, 2, r, eta, rho)
    qqb, qqbb = phi(2 * k, 1, r, eta, rho), phi(2 * k, 2, r, eta, rho)
    b, bb = r, r + r * r
    two = s * (s - 1)
    three = s * (s - 1) * (s - 2)
    four = s * (s - 1) * (s - 2) * (s - 3)
    return (s * qqbb
            + two * (q2 * bb + 2 * qqb * b + 2 * qbb * q + qb ** 2 + (2 * qb * q * b - q * q * b * b))
            + three * (q2 * b * b + q * q * bb + 4 * qb * q * b)
            + four * q * q * b * b)


def sharpbalance_sharpness_upper_theory(k: int, n: int, d: int, s: int, eta: float, rho: float,
                                        rho0: float, w_hat_norm: float,
                                        grouping: str = "paper") -> float:
    """Theorem 2: upper bound on the expected sharpness of the SharpBalance ensemble mean.

    Same argument as Theorem 1's upper bound, on the full loss (λ_max → (√(n/d)+1)²) at the
    ensemble mean: ½ρ₀²λ_max + ρ₀·√(E‖Be‖²). `grouping` picks the closed form of E‖Be‖²:
    "paper" (published) or "free" (free-probability grouping, see the two functions above).
    """
    moment = {"paper": sharpbalance_gradient_moment_paper,
              "free": sharpbalance_gradient_moment_free}[grouping](k, n, d, s, eta, rho)
    return 0.5 * rho0 ** 2 * mp_edges(n / d)[1] + rho0 * math.sqrt(moment) * w_hat_norm / s


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


def max_quadratic_on_ball_pga(hessian: np.ndarray, gradient: np.ndarray, radius: float,
                              steps: int = 20000, step_size: float | None = None,
                              tol: float = 1e-13) -> tuple[float, np.ndarray]:
    """Projected gradient ascent for the same problem, in the original coordinates (a check).

    For a convex objective, each projected ascent step cannot decrease h, so the iteration
    climbs to a KKT point; started from the gradient direction it reaches the global max in
    practice. Slow (power-iteration-like) but independent of the secular-equation algebra.
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


# ----------------------------------------------------------------------------------------------
# Simulations (spectral: one eigendecomposition per data set, reused for every ρ and k)
# ----------------------------------------------------------------------------------------------

class SingleBlasThread:
    """Run the small (d ≈ 150) linear algebra on one BLAS thread.

    Multi-threaded OpenBLAS on 150×150 matrices spends its time synchronising; on a shared
    2-core machine that made eigh/matmul ~20× slower than one thread. threadpoolctl is optional.
    """

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._limit = None
        else:
            self._limit = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._limit is not None:
            self._limit.restore_original_limits()
        return False


@dataclass(frozen=True)
class SpectralDataset:
    """One random data set A (with test design T and init noise), stored in the eigenbases the
    model needs, so every ρ and k afterwards costs only elementwise powers and small products.

    full_eigvals/full_eigvecs: B = AᵀA = V diag(λ) Vᵀ (SAM trains on it; sharpness uses it).
    full_test_gram:  Vᵀ(TᵀT)V, so ‖T V x‖² = xᵀ(full_test_gram)x.
    full_init_noise: Vᵀ·Z, Z (d, n_inits) standard normal; inits are σZ.
    split_*: the same for the s disjoint equal row blocks A_i (B_i = A_iᵀA_i), stacked on axis 0;
             the same Z is rotated into each block's eigenbasis, so every init is run by every
             member.
    Reusing one set of draws for every ρ and k (common random numbers) makes the curves smooth.
    """
    full_eigvals: np.ndarray
    full_eigvecs: np.ndarray
    full_test_gram: np.ndarray
    full_init_noise: np.ndarray
    split_eigvals: np.ndarray
    split_eigvecs: np.ndarray
    split_test_gram: np.ndarray
    split_init_noise: np.ndarray


def draw_teacher(d: int, sigma2: float, rng: np.random.Generator) -> np.ndarray:
    """Teacher ŵ ~ N(0, σ²I); drawn once and shared by all data sets (the theorems fix ŵ)."""
    return rng.normal(0.0, math.sqrt(sigma2), size=d)


def spectral_dataset(A: np.ndarray, T: np.ndarray, init_noise: np.ndarray,
                     s: int) -> SpectralDataset:
    """Eigendecompose a given design A (n×d), test design T (p×d) and init noise Z (d×m).

    The s member blocks are consecutive, disjoint, equal row blocks of A.
    """
    n, d = A.shape
    if n % s:
        raise ValueError(f"n={n} rows cannot be split into s={s} equal parts")
    test_gram = T.T @ T
    lam, V = np.linalg.eigh(A.T @ A)
    blocks = A.reshape(s, n // s, d)
    split_lam, split_V = np.linalg.eigh(np.matmul(blocks.transpose(0, 2, 1), blocks))
    split_Vt = split_V.transpose(0, 2, 1)
    return SpectralDataset(
        full_eigvals=lam, full_eigvecs=V,
        full_test_gram=V.T @ test_gram @ V, full_init_noise=V.T @ init_noise,
        split_eigvals=split_lam, split_eigvecs=split_V,
        split_test_gram=split_Vt @ test_gram @ split_V, split_init_noise=split_Vt @ init_noise)


def draw_datasets(n_datasets: int, n: int, d: int, p: int, s: int, n_inits: int,
                  rng: np.random.Generator) -> list[SpectralDataset]:
    """Draw A (n×d) and T (p×d) with N(0, 1/d) entries plus init noise; keep their spectra."""
    if n % s:
        raise ValueError(f"n={n} rows cannot be split into s={s} equal parts")
    datasets = []
    with SingleBlasThread():
        for _ in range(n_datasets):
            A = rng.standard_normal((n, d)) / math.sqrt(d)
            T = rng.standard_normal((p, d)) / math.sqrt(d)
            init_noise = rng.standard_normal((d, n_inits))
            datasets.append(spectral_dataset(A, T, init_noise, s))
    return datasets


@dataclass(frozen=True)
class SimulationResult:
    """Per-data-set sharpness and diversity; `.sharpness_mean` etc. average over data sets."""
    sharpness: np.ndarray
    diversity: np.ndarray

    @property
    def sharpness_mean(self) -> float:
        return float(self.sharpness.mean())

    @property
    def diversity_mean(self) -> float:
        return float(self.diversity.mean())

    @property
    def sharpness_stderr(self) -> float:
        return float(self.sharpness.std(ddof=1) / math.sqrt(len(self.sharpness)))

    @property
    def diversity_stderr(self) -> float:
        return float(self.diversity.std(ddof=1) / math.sqrt(len(self.diversity)))


def sam_error_map(eigvals: np.ndarray, k: int, eta: float, rho: float) -> np.ndarray:
    """Eigenvalues of P^k = (I − ηB − ηρB²)^k: k un-normalised SAM steps on the error w − ŵ."""
    return (1.0 - eta * eigvals - eta * rho * eigvals ** 2) ** k


def sam_steps_reference(A: np.ndarray, y: np.ndarray, w0: np.ndarray, k: int, eta: float,
                        rho: float) -> np.ndarray:
    """k literal un-normalised SAM steps w ← w − η∇f(w + ρ∇f(w)) (a check on `sam_error_map`)."""
    w = np.array(w0, dtype=float)
    for _ in range(k):
        grad = A.T @ (A @ w - y)
        w = w - eta * (A.T @ (A @ (w + rho * grad) - y))
    return w


def _sharpness_at(eigvals: np.ndarray, eigvecs: np.ndarray, error: np.ndarray,
                  rho0: float) -> np.ndarray:
    """max_{‖ε‖≤ρ₀} f(m + ε) − f(m) for error = m − ŵ (batched over data sets).

    f(m + ε) − f(m) = gᵀε + ½εᵀBε with g = B·error; in B's eigenbasis g̃ = λ ⊙ Vᵀ·error.
    """
    error_coords = np.einsum("bji,bj->bi", eigvecs, error)
    value, _ = max_quadratic_on_ball(eigvals, eigvals * error_coords, rho0)
    return value


def simulate_sam(datasets: list[SpectralDataset], w_hat: np.ndarray, *, k: int, eta: float,
                 rho: float, rho0: float, sigma2: float, p: int) -> SimulationResult:
    """Simulated sharpness and diversity of k-step SAM on all data, one value per data set.

    Diversity: (1/(m·p))·Σ_inits ‖T(w_k − E w_k)‖², the prediction variance across the m inits
    averaged over the p test points. E w_k = ŵ − P^kŵ is known exactly (inits have mean 0), so
    deviations are taken from it (unbiased without a 1/(m−1) correction), and
    w_k − E w_k = σP^kZ does not involve ŵ.
    Sharpness: exact worst case in the ρ₀-ball at E w_k, on the same data set's loss.
    """
    with SingleBlasThread():
        lam = np.stack([ds.full_eigvals for ds in datasets])                # (D, d)
        V = np.stack([ds.full_eigvecs for ds in datasets])                  # (D, d, d)
        shrink = sam_error_map(lam, k, eta, rho)                            # eigenvalues of P^k
        error = -np.einsum("bij,bj->bi", V, shrink * np.einsum("bji,j->bi", V, w_hat))
        sharpness = _sharpness_at(lam, V, error, rho0)
        deviation = math.sqrt(sigma2) * shrink[:, :, None] * np.stack(
            [ds.full_init_noise for ds in datasets])                        # (D, d, m), eigenbasis
        gram = np.stack([ds.full_test_gram for ds in datasets])
        n_inits = deviation.shape[-1]
        diversity = np.sum(deviation * (gram @ deviation), axis=(1, 2)) / (n_inits * p)
    return SimulationResult(sharpness, diversity)


def simulate_sharpbalance(datasets: list[SpectralDataset], w_hat: np.ndarray, *, k: int,
                          eta: float, rho: float, rho0: float, sigma2: float,
                          p: int) -> SimulationResult:
    """Simulated sharpness and diversity of the theory's SharpBalance, one value per data set.

    Member i runs k SAM steps on its own row block only: w^i − ŵ = P_i^k(w₀ − ŵ). Every init is
    evaluated under every member and diversity is the prediction variance pooled over
    (init, member) — the member is part of the randomness, as in Theorem 2 — measured from the
    exact ensemble mean E w = ŵ − (1/s)Σ_i P_i^kŵ. Sharpness is the exact worst case of the
    *full* loss (all n rows) in the ρ₀-ball at that mean.
    """
    with SingleBlasThread():
        sharp_errors, diversity = [], np.empty(len(datasets))
        for index, ds in enumerate(datasets):
            s, _, n_inits = ds.split_init_noise.shape
            V = ds.split_eigvecs                                            # (s, d, d)
            shrink = sam_error_map(ds.split_eigvals, k, eta, rho)[:, :, None]  # (s, d, 1)
            member_bias = V @ (shrink * (V.transpose(0, 2, 1) @ w_hat[:, None]))  # P_i^k ŵ
            mean_bias = member_bias.mean(axis=0)                            # (1/s)Σ_i P_i^k ŵ
            # w^i − E w in member i's eigenbasis: σ·shrink⊙(V_iᵀZ) + V_iᵀ(mean − P_i^kŵ).
            deviation = (math.sqrt(sigma2) * shrink * ds.split_init_noise
                         + V.transpose(0, 2, 1) @ (mean_bias - member_bias))
            diversity[index] = (np.sum(deviation * (ds.split_test_gram @ deviation))
                                / (s * n_inits * p))
            sharp_errors.append(-mean_bias[:, 0])
        lam = np.stack([ds.full_eigvals for ds in datasets])
        U = np.stack([ds.full_eigvecs for ds in datasets])
        sharpness = _sharpness_at(lam, U, np.stack(sharp_errors), rho0)
    return SimulationResult(sharpness, diversity)
