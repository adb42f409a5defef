"""The sharpness–diversity trade-off on a noiseless linear model: closed forms and simulations.

This module backs `theoretical_verification.ipynb` (docs/theory.md). The model:

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

# The paper's settings. The notebook and the tests read them from here so the numbers
# they print are about the same experiment.
SPEC_SETTINGS = dict(n=3000, d=150, p=1000, s=10, sigma2=0.1, eta=0.01, rho0=0.01, k=3)

from theory.ball import max_quadratic_on_ball  # noqa: E402
# The three parts of the theory, importable from the package as before.
from theory.closed_forms import (mp_edges, mp_moment, narayana, phi, sam_diversity_theory,  # noqa: E402
                                 sam_sharpness_bounds_theory, sam_step_polynomial, sharpbalance_diversity_theory,
                                 sharpbalance_gradient_moment_free, sharpbalance_gradient_moment_paper,
                                 sharpbalance_sharpness_upper_theory)
from theory.simulation import (SimulationResult, SingleBlasThread, SpectralDataset, draw_datasets,  # noqa: E402
                               draw_teacher, sam_error_map, simulate_sam, simulate_sharpbalance,
                               spectral_dataset)

__all__ = [
    "SPEC_SETTINGS", "narayana", "mp_moment", "sam_step_polynomial", "phi", "mp_edges",
    "sam_diversity_theory", "sam_sharpness_bounds_theory",
    "sharpbalance_diversity_theory", "sharpbalance_gradient_moment_paper",
    "sharpbalance_gradient_moment_free", "sharpbalance_sharpness_upper_theory",
    "max_quadratic_on_ball", "SingleBlasThread", "SpectralDataset",
    "draw_teacher", "spectral_dataset", "draw_datasets", "SimulationResult", "sam_error_map",
    "simulate_sam", "simulate_sharpbalance"]
