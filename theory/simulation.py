"""Seeded simulations of SAM and SharpBalance members (one eigendecomposition per data set)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from theory.ball import max_quadratic_on_ball

# ----------------------------------------------------------------------------------------------
# Simulations (spectral: one eigendecomposition per data set, reused for every ρ and k)
# ----------------------------------------------------------------------------------------------

class SingleBlasThread:
    """Run the small (d ≈ 150) linear algebra on one BLAS thread.

    Multi-threaded OpenBLAS on 150×150 matrices spends its time synchronising rather than
    computing, worse still on a machine shared with other jobs. threadpoolctl is optional.
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
