"""Tests for theory/ and theoretical_verification.ipynb (the paper's theory).

Each closed form is checked against a computation that does not share its algebra: Monte-Carlo
traces of random Gram matrices, numerical integration of the Marchenko–Pastur density, literal SAM
steps, projected gradient ascent, brute-force ensembles. Statistical comparisons use "within three
standard errors of the simulated mean"; where the paper's claim does not hold at the paper's settings,
the test says so (strict xfail with the measured numbers) instead of widening its tolerance.
"""
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate

import theory
from tests.references import max_quadratic_on_ball_pga, mp_density, sam_steps_reference

S = theory.SPEC_SETTINGS
N, D, P, SPLITS = S["n"], S["d"], S["p"], S["s"]
SIGMA2, ETA, RHO0, K = S["sigma2"], S["eta"], S["rho0"], S["k"]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool():
    """20 paper-sized data sets × 100 inits and a teacher, shared by the statistical tests."""
    rng = np.random.default_rng(20240601)
    w_hat = theory.draw_teacher(D, SIGMA2, rng)
    return w_hat, theory.draw_datasets(20, N, D, P, SPLITS, 100, rng)


def spectra(n, d, draws, rng):
    """Eigenvalues of AᵀA for `draws` independent A (n×d) with N(0, 1/d) entries."""
    with theory.SingleBlasThread():
        out = []
        for _ in range(draws):
            A = rng.standard_normal((n, d)) / math.sqrt(d)
            out.append(np.linalg.eigvalsh(A.T @ A))
    return np.array(out)


def mean_and_stderr(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------

def test_narayana_rows_sum_to_catalan_numbers_and_are_symmetric():
    assert [theory.narayana(4, l) for l in range(1, 5)] == [1, 6, 6, 1]
    for m in range(1, 15):
        row = [theory.narayana(m, l) for l in range(1, m + 1)]
        assert sum(row) == math.comb(2 * m, m) // (m + 1)      # Catalan number
        assert row == row[::-1]
    with pytest.raises(ValueError):
        theory.narayana(3, 4)


@pytest.mark.parametrize("n, d", [(3000, 150), (300, 150)])   # SAM ratio 20, member ratio 2
def test_mp_moments_match_monte_carlo_traces(n, d):
    eigvals = spectra(n, d, 200, np.random.default_rng(7))
    ratio = n / d
    for m in range(1, 5):
        mc_mean, mc_se = mean_and_stderr(np.mean(eigvals ** m, axis=1))
        closed = theory.mp_moment(m, ratio)
        if m == 1:      # exact at every d: E (1/d) tr AᵀA = n/d
            assert abs(mc_mean - closed) <= 3 * mc_se
        if m == 2:      # exact at every d: r² + r + r/d, i.e. the limit plus r/d
            assert abs(mc_mean - (closed + ratio / d)) <= 3 * mc_se
        # The Narayana form is the d → ∞ limit. Real-Gaussian moments carry O(1/d) corrections:
        # for m = 2 exactly 1/(d(1+r)) relative; allow that per pair of factors, m(m−1)/2 times
        # (measured: ratio 2 → 0.25%, 0.59%, 1.00% for m = 2, 3, 4; ratio 20 → 0.04–0.18%).
        finite_size = m * (m - 1) / 2 / (d * (1 + ratio))
        assert abs(mc_mean / closed - 1) <= finite_size + 3 * mc_se / closed, (m, mc_mean, closed)


@pytest.mark.parametrize("i, j, ratio, rho", [(6, 0, 20, 0.3), (3, 1, 20, 0.3), (12, 4, 20, 0.25),
                                              (10, 2, 2, 0.4), (5, 0, 2, 1.0), (0, 3, 2, 0.4)])
def test_phi_equals_integral_against_marchenko_pastur_density(i, j, ratio, rho):
    lo, hi = theory.mp_edges(ratio)
    integrand = lambda x: ((1 - ETA * x - ETA * rho * x * x) ** i * x ** j
                           * mp_density(np.array([x]), ratio)[0])
    quadrature, _ = integrate.quad(integrand, lo, hi, limit=200, epsabs=0, epsrel=1e-12)
    assert theory.phi(i, j, ratio, ETA, rho) == pytest.approx(quadrature, rel=1e-8)


def test_spectral_sam_map_matches_literal_sam_steps():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((60, 10)) / math.sqrt(10)
    w_hat, w0 = rng.standard_normal(10), rng.standard_normal(10)
    lam, V = np.linalg.eigh(A.T @ A)
    for k, rho in [(1, 0.0), (3, 0.3), (5, 1.0)]:
        literal = sam_steps_reference(A, A @ w_hat, w0, k, ETA, rho)
        spectral = w_hat + V @ (theory.sam_error_map(lam, k, ETA, rho) * (V.T @ (w0 - w_hat)))
        np.testing.assert_allclose(spectral, literal, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The exact ball-constrained maximiser
# ----------------------------------------------------------------------------------------------

def test_exact_ball_maximiser_agrees_with_projected_gradient_ascent():
    rng = np.random.default_rng(11)
    # A SAM instance at the paper's size, in both the contracting and the expanding regime.
    A = rng.standard_normal((N, D)) / math.sqrt(D)
    B = A.T @ A
    lam, V = np.linalg.eigh(B)
    w_hat = rng.normal(0, math.sqrt(SIGMA2), D)
    for rho in (0.01, 0.25, 0.5):
        gradient = B @ (-V @ (theory.sam_error_map(lam, K, ETA, rho) * (V.T @ w_hat)))
        exact, eps = theory.max_quadratic_on_ball(lam, V.T @ gradient, RHO0)
        ascent, eps_ascent = max_quadratic_on_ball_pga(B, gradient, RHO0)
        assert float(exact) == pytest.approx(ascent, rel=1e-10)
        np.testing.assert_allclose(V @ eps, eps_ascent, atol=1e-9 * RHO0)
        assert np.linalg.norm(eps) == pytest.approx(RHO0, rel=1e-12)
    # Small random problems with a large radius, where the maximiser is far from g's direction.
    for _ in range(20):
        M = rng.standard_normal((6, 6))
        B = M @ M.T
        lam, V = np.linalg.eigh(B)
        g = rng.standard_normal(6)
        exact, _ = theory.max_quadratic_on_ball(lam, V.T @ g, 2.0)
        ascent, _ = max_quadratic_on_ball_pga(B, g, 2.0)
        assert float(exact) == pytest.approx(ascent, rel=1e-9)


def test_exact_ball_maximiser_handles_the_hard_case():
    # B = diag(1, 2, 3), g = (0.1, 0, 0), radius 1: g has no top component and (μ − B)⁻¹g stays
    # inside the ball at μ = λ_max, so ε = (0.1/2, 0, ±√(1 − 0.05²)) and
    # h = 0.1·0.05 + ½(1·0.05² + 3·(1 − 0.05²)) = 1.5025.
    value, eps = theory.max_quadratic_on_ball(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0, 0]), 1.0)
    assert float(value) == pytest.approx(1.5025, rel=1e-14)
    np.testing.assert_allclose(np.abs(eps), [0.05, 0.0, math.sqrt(1 - 0.05 ** 2)], atol=1e-14)
    # g = 0: the answer is ½·radius²·λ_max along the top eigenvector.
    value, _ = theory.max_quadratic_on_ball(np.array([0.5, 4.0]), np.zeros(2), 0.3)
    assert float(value) == pytest.approx(0.5 * 0.09 * 4.0, rel=1e-14)


# ----------------------------------------------------------------------------------------------
# Simulators against brute force
# ----------------------------------------------------------------------------------------------

def test_simulators_match_brute_force_ensembles():
    """End-to-end on a tiny problem: literal SAM steps per (init, member), averages, PGA."""
    rng = np.random.default_rng(5)
    n, d, p, s, m, k, rho = 40, 8, 30, 4, 6, 3, 0.7
    A = rng.standard_normal((n, d)) / math.sqrt(d)
    T = rng.standard_normal((p, d)) / math.sqrt(d)
    noise = rng.standard_normal((d, m))
    w_hat = rng.normal(0, math.sqrt(SIGMA2), d)
    dataset = theory.spectral_dataset(A, T, noise, s)
    inits = math.sqrt(SIGMA2) * noise.T
    B = A.T @ A

    def brute_force(member_designs):
        # The step map is affine in w₀, so the mean over inits is the run from E w₀ = 0.
        mean = np.mean([sam_steps_reference(X, X @ w_hat, np.zeros(d), k, ETA, rho)
                        for X in member_designs], axis=0)
        spread = [np.sum((T @ (sam_steps_reference(X, X @ w_hat, w0, k, ETA, rho) - mean)) ** 2) / p
                  for X in member_designs for w0 in inits]
        sharpness, _ = max_quadratic_on_ball_pga(B, B @ (mean - w_hat), RHO0)
        return sharpness, np.mean(spread)

    kwargs = dict(k=k, eta=ETA, rho=rho, rho0=RHO0, sigma2=SIGMA2, p=p)
    sam = theory.simulate_sam([dataset], w_hat, **kwargs)
    sharpness, diversity = brute_force([A])
    assert sam.sharpness[0] == pytest.approx(sharpness, rel=1e-9)
    assert sam.diversity[0] == pytest.approx(diversity, rel=1e-10)

    sharpbalance = theory.simulate_sharpbalance([dataset], w_hat, **kwargs)
    sharpness, diversity = brute_force(np.split(A, s))
    assert sharpbalance.sharpness[0] == pytest.approx(sharpness, rel=1e-9)
    assert sharpbalance.diversity[0] == pytest.approx(diversity, rel=1e-10)


def test_seeded_runs_are_identical():
    def run(seed):
        rng = np.random.default_rng(seed)
        w_hat = theory.draw_teacher(D, SIGMA2, rng)
        datasets = theory.draw_datasets(2, N, D, P, SPLITS, 10, rng)
        kwargs = dict(k=K, eta=ETA, rho=0.3, rho0=RHO0, sigma2=SIGMA2, p=P)
        a = theory.simulate_sam(datasets, w_hat, **kwargs)
        b = theory.simulate_sharpbalance(datasets, w_hat, **kwargs)
        return np.concatenate([a.sharpness, a.diversity, b.sharpness, b.diversity])

    first, second = run(123), run(123)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, run(124))


# ----------------------------------------------------------------------------------------------
# Theorem 1 (SAM)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_sam_diversity_closed_form_matches_simulation_when_sam_contracts(pool, rho):
    # For ρ ≤ 0.1 every eigenvalue of one SAM step lies in (−1, 1) at the paper's settings.
    w_hat, datasets = pool
    result = theory.simulate_sam(datasets, w_hat, k=K, eta=ETA, rho=rho, rho0=RHO0,
                                 sigma2=SIGMA2, p=P)
    closed = theory.sam_diversity_theory(K, N, D, ETA, rho, SIGMA2)
    assert abs(result.diversity_mean - closed) <= 3 * result.diversity_stderr


@pytest.mark.xfail(strict=True, reason=(
    "Theorem 1's diversity φ(2k,0)σ² is the d→∞ limit. Over the plot-2 radii SAM's step map "
    "expands the top of the spectrum (|1−ηλ−ηρλ²| = 2.0–3.8 at λ_max), and at d=150 the "
    "finite-size excess there makes the true variance larger: +2.9%, +2.4%, +2.1% at ρ = 0.3, "
    "0.4, 0.5 (1000 data sets; ~7 standard errors with this test's 400; +0.8–1.1% at d=600)."))
def test_sam_diversity_closed_form_within_sampling_error_over_plot2_radii():
    # Given A, averaging the simulated variance over inits and T gives σ²·(1/d)tr P^{2k} exactly,
    # so eigenvalue-only draws give the simulation's expectation with small error.
    eigvals = spectra(N, D, 400, np.random.default_rng(17))
    for rho in (0.3, 0.4, 0.5):
        expected, stderr = mean_and_stderr(
            SIGMA2 * np.mean(theory.sam_error_map(eigvals, K, ETA, rho) ** 2, axis=1))
        assert abs(expected - theory.sam_diversity_theory(K, N, D, ETA, rho, SIGMA2)) <= 3 * stderr


def test_simulated_diversity_estimates_the_conditional_variance(pool):
    # Given (A, T), the exact variance over inits is σ²/p · tr(TᵀT P^{2k}); the simulator's
    # init-sampled estimate must agree with it on average.
    w_hat, datasets = pool
    result = theory.simulate_sam(datasets, w_hat, k=K, eta=ETA, rho=0.3, rho0=RHO0,
                                 sigma2=SIGMA2, p=P)
    exact = [SIGMA2 / P * np.sum(theory.sam_error_map(ds.full_eigvals, K, ETA, 0.3) ** 2
                                 * np.diag(ds.full_test_gram)) for ds in datasets]
    relative_errors = result.diversity / np.array(exact) - 1
    mean, stderr = mean_and_stderr(relative_errors)
    assert abs(mean) <= 3 * stderr


@pytest.mark.parametrize("rho", [0.3, 0.4, 0.5])
def test_sam_sharpness_lies_between_theorem1_bounds(pool, rho):
    w_hat, datasets = pool
    w_hat_norm = np.linalg.norm(w_hat)
    result = theory.simulate_sam(datasets, w_hat, k=K, eta=ETA, rho=rho, rho0=RHO0,
                                 sigma2=SIGMA2, p=P)
    lower, upper = theory.sam_sharpness_bounds_theory(K, N, D, ETA, rho, RHO0, w_hat_norm)
    # The upper bound is nearly tight (over 1000 data sets the mean sits ~1% below it), so the
    # comparison is "not above it beyond sampling error"; the lower bound is far below.
    assert result.sharpness_mean - 3 * result.sharpness_stderr <= upper
    assert result.sharpness_mean > lower
    # Per data set the maximum is sandwiched deterministically by the empirical spectrum:
    # ρ₀‖Be‖ + ½ρ₀²λ_min(B) ≤ max ≤ ρ₀‖Be‖ + ½ρ₀²λ_max(B).
    for ds, value in zip(datasets, result.sharpness):
        lam, V = ds.full_eigvals, ds.full_eigvecs
        gradient_norm = np.linalg.norm(lam * theory.sam_error_map(lam, K, ETA, rho) * (V.T @ w_hat))
        assert RHO0 * gradient_norm + 0.5 * RHO0 ** 2 * lam[0] <= value + 1e-12
        assert value <= RHO0 * gradient_norm + 0.5 * RHO0 ** 2 * lam[-1] + 1e-12


# ----------------------------------------------------------------------------------------------
# Theorem 2 (SharpBalance) and the trade-off claim
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, rho", [(5, 0.4), (5, 1.0), (1, 0.4), (15, 0.4)])
def test_sharpbalance_diversity_and_sharpness_bound_agree_with_simulation(pool, k, rho):
    w_hat, datasets = pool
    w_hat_norm = np.linalg.norm(w_hat)
    result = theory.simulate_sharpbalance(datasets, w_hat, k=k, eta=ETA, rho=rho, rho0=RHO0,
                                          sigma2=SIGMA2, p=P)
    closed = theory.sharpbalance_diversity_theory(k, N, D, SPLITS, ETA, rho, SIGMA2, w_hat_norm)
    assert abs(result.diversity_mean - closed) <= 3 * result.diversity_stderr
    upper = theory.sharpbalance_sharpness_upper_theory(k, N, D, SPLITS, ETA, rho, RHO0, w_hat_norm)
    assert result.sharpness_mean < upper


@pytest.mark.parametrize("k, rho", [(5, 0.4), (1, 0.4), (15, 0.4), (3, 1.5)])
def test_sharpbalance_gradient_moment_closed_forms_agree_with_monte_carlo(pool, k, rho):
    # E‖B e‖² with e = −(1/s)Σ_i P_i^k ŵ: the free-probability grouping reproduces it; the
    # paper's grouping overestimates it (by 2–5% here), so its sharpness bound stays an upper bound.
    w_hat, datasets = pool
    values = []
    for ds in datasets:
        V = ds.split_eigvecs
        shrink = theory.sam_error_map(ds.split_eigvals, k, ETA, rho)
        error = -np.mean(V @ (shrink[:, :, None] * (V.transpose(0, 2, 1) @ w_hat[:, None])), axis=0)
        full_gram = ds.full_eigvecs @ (ds.full_eigvals[:, None] * ds.full_eigvecs.T)
        values.append(SPLITS ** 2 * np.sum((full_gram @ error) ** 2) / np.sum(w_hat ** 2))
    mc_mean, mc_se = mean_and_stderr(values)
    free = theory.sharpbalance_gradient_moment_free(k, N, D, SPLITS, ETA, rho)
    paper = theory.sharpbalance_gradient_moment_paper(k, N, D, SPLITS, ETA, rho)
    assert abs(mc_mean - free) <= 3 * mc_se
    assert paper > mc_mean + 3 * mc_se


def test_sharpbalance_is_more_diverse_at_equal_sharpness(pool):
    """Figure 1(b): at equal sharpness SharpBalance's diversity exceeds SAM's (k = 3)."""
    w_hat, datasets = pool
    w_hat_norm = np.linalg.norm(w_hat)

    def compare(sam_points, sharpbalance_points):
        sam_points, sharpbalance_points = np.asarray(sam_points), np.asarray(sharpbalance_points)
        order = np.argsort(sharpbalance_points[:, 0])
        lo, hi = sharpbalance_points[order[0], 0], sharpbalance_points[order[-1], 0]
        overlap = (sam_points[:, 0] >= lo) & (sam_points[:, 0] <= hi)
        assert overlap.sum() >= 3, "the two sharpness ranges should overlap"
        matched = np.interp(sam_points[overlap, 0], *sharpbalance_points[order].T)
        return matched / sam_points[overlap, 1]

    # Closed forms, the plot-1 sweep.
    theory_ratio = compare(
        [(theory.sam_sharpness_bounds_theory(K, N, D, ETA, rho, RHO0, w_hat_norm)[1],
          theory.sam_diversity_theory(K, N, D, ETA, rho, SIGMA2))
         for rho in np.linspace(0.24, 0.255, 16)],
        [(theory.sharpbalance_sharpness_upper_theory(K, N, D, SPLITS, ETA, rho, RHO0, w_hat_norm),
          theory.sharpbalance_diversity_theory(K, N, D, SPLITS, ETA, rho, SIGMA2, w_hat_norm))
         for rho in np.linspace(0.01, 1.5, 16)])
    assert np.all(theory_ratio > 1)

    # Simulation: measured sharpness and diversity of both methods.
    kwargs = dict(k=K, eta=ETA, rho0=RHO0, sigma2=SIGMA2, p=P)
    sim_ratio = compare(
        [(r.sharpness_mean, r.diversity_mean) for r in
         (theory.simulate_sam(datasets, w_hat, rho=rho, **kwargs) for rho in np.linspace(0.24, 0.26, 6))],
        [(r.sharpness_mean, r.diversity_mean) for r in
         (theory.simulate_sharpbalance(datasets, w_hat, rho=rho, **kwargs)
          for rho in np.linspace(0.01, 1.5, 6))])
    assert np.all(sim_ratio > 1)


# ----------------------------------------------------------------------------------------------
# The notebook
# ----------------------------------------------------------------------------------------------

def test_notebook_executes_without_errors(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO_ROOT / "theoretical_verification.ipynb", as_version=4)
    # Figures go to a temporary folder so the test leaves assets/ untouched; the kernel
    # inherits this environment.
    monkeypatch.setenv("THEORY_ASSETS_DIR", str(tmp_path))
    client = nbclient.NotebookClient(notebook, timeout=90, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    for name in ("theory_sharpness_diversity.png", "theory_sam_bounds.png",
                 "theory_sharpbalance_rho.png", "theory_sharpbalance_k.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
