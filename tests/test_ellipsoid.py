"""The projections onto the perturbation sets (measure/ellipsoid.py): the certified ellipsoid
projection against an exact float64 solution and a random search, alone and inside APGD, on a
GPU's search (device scalars) and a CPU's (host scalars), cold and warm, at 0 and with a NaN."""
import math

import pytest
import torch

from measure import ellipsoid
from measure import sharpness as sh
from tests.fixtures import random_batches, tiny_bn_net
from tests.references import project_l2_ellipsoid, weighted_norm


def test_ellipsoid_projection_is_the_euclidean_projection():
    torch.manual_seed(0)
    scale = torch.rand(6) + 0.1
    v = torch.randn(6) * 3
    rho = 0.5
    proj = project_l2_ellipsoid(v, scale, rho)
    assert weighted_norm(proj, scale).item() == pytest.approx(rho, rel=1e-5)
    # no feasible point sampled at random is closer to v
    samples = torch.randn(200000, 6)
    samples = samples / samples.norm(dim=1, keepdim=True) * torch.rand(200000, 1) ** (1 / 6)
    samples = samples * scale * rho
    assert (samples - v).norm(dim=1).min().item() >= (proj - v).norm().item() - 1e-6


# ----------------------------------------------------------------------------- against the exact projection
def _ellipsoid_solution(v, scale, rho):
    """The exact projection in float64, independently: bisection on μ in d = v·s²/(s² + μ) to the
    last bit (entries with s = 0 are 0)."""
    v, s = v.double(), scale.double()
    on = s > 0
    v = torch.where(on, v, 0)
    a = s * s

    def norm_at(mu):
        return torch.where(on, v * s / (a + mu), 0).norm().item()

    if norm_at(0.0) <= rho:
        return v
    lo, hi = 0.0, 1.0
    while norm_at(hi) > rho:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm_at(mid) > rho else (lo, mid)
    return v * a / (a + hi)


def _projection_cases():
    g = torch.Generator().manual_seed(7)
    # ResNet-like: most weights small, a few BatchNorm-sized ones, exact zeros, a 1e-9 one
    scale = torch.randn(60_000, generator=g).abs() * 0.05
    scale[:100] = 1 + torch.rand(100, generator=g)
    scale[100:300] = 0
    scale[300] = 1e-9
    ascent = torch.randn(60_000, generator=g)
    first = 1.0 * ascent / ascent.norm() * scale            # APGD's first step, rho 0.5: twice outside
    cases = [("first APGD step", first, scale, 0.5),
             ("far outside", 40 * first + 0.01 * torch.randn(60_000, generator=g) * scale, scale, 0.5),
             ("just outside", first * 0.2501, scale, 0.05),
             ("inside", first * 0.1, scale, 0.5),
             ("equal scales", torch.randn(1000, generator=g), torch.full((1000,), 0.3), 0.2)]
    return cases


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("case", range(5))
def test_ellipsoid_projection_is_feasible_and_within_its_certified_gap(case, host_scalars):
    name, v, scale, rho = _projection_cases()[case]
    exact = _ellipsoid_solution(v, scale, rho)
    projection = ellipsoid.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    d, _ = projection(v)
    d64, gap = d.double(), projection.take_gap().item()
    assert weighted_norm(d64, scale.double()).item() <= rho * (1 + 1e-6), name          # feasible
    assert bool((d[scale == 0] == 0).all()), name
    # the host search goes on until its certificate is at most HOST_GAP_TARGET
    assert gap <= (ellipsoid.HOST_GAP_TARGET if host_scalars else 1e-4), name
    # certified: each coordinate between (1 - gap) and 1 times the exact one (plus float32 rounding)
    assert bool(((d64 - exact).abs() <= (gap + 2e-6) * exact.abs() + 1e-30).all()), name
    assert (d64 - exact).norm().item() <= 2e-6 * exact.norm().item(), name
    if name == "inside":
        assert torch.allclose(d, torch.where(scale > 0, v, 0), rtol=1e-6, atol=0) and gap == 0
    if name == "equal scales":  # closed form: the ball of radius 0.2·0.3, a radial scaling
        assert torch.allclose(d, v * (0.06 / v.norm()), rtol=1e-6)


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
def test_a_warm_projection_inside_the_set_returns_the_point(host_scalars):
    _, outside, scale, rho = _projection_cases()[0]
    projection = ellipsoid.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    _, mu = projection(outside)
    inside = outside * 0.3
    d, mu_next = projection(inside, mu)                  # starts at the outside point's μ
    assert torch.allclose(d, torch.where(scale > 0, inside, 0), rtol=1e-6, atol=0)
    assert float(mu_next) == float(mu) > 0                # the hint is kept for the next call
    assert projection.take_gap().item() <= 1e-4


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
def test_the_projection_of_zero_is_zero_cold_and_warm(host_scalars):
    # v = 0 on the set (APGD's first step when the gradient is exactly 0): P(0) = 0 with gap 0;
    # the device search once divided 0 by 0 there and returned NaN.
    _, outside, scale, rho = _projection_cases()[0]
    projection = ellipsoid.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    zero = torch.where(scale > 0, 0.0, outside)          # entries off the set are ignored
    d, mu = projection(zero)
    assert bool((d == 0).all()) and float(mu) == 0 and projection.take_gap().item() == 0
    _, warm = projection(outside)
    projection.take_gap()
    d, mu = projection(zero, warm)
    assert bool((d == 0).all()) and float(mu) == float(warm) and projection.take_gap().item() == 0


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
def test_a_nan_in_the_vector_shows_in_the_gap(host_scalars):
    # A NaN gradient must not pass for a certified projection: the batch's gap is NaN, whichever
    # call of the batch met it (Python's max() would have hidden it behind a later number).
    _, outside, scale, rho = _projection_cases()[0]
    projection = ellipsoid.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    broken = outside.clone()
    broken[scale > 0] = float("nan")
    _, mu = projection(broken)
    projection(outside, mu)
    assert math.isnan(projection.take_gap().item())


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
def test_ellipsoid_projection_of_every_apgd_step_matches_the_float64_solution(host_scalars):
    # In the loop each projection starts from the previous one's multiplier (on the device: 3
    # steps, 4 cold; on the host: until the certificate is at most HOST_GAP_TARGET).
    net = tiny_bn_net()
    flat = sh.FlatModel(net)
    scale = flat.w0.abs()
    search = ellipsoid.EllipsoidProjection(scale, 0.5, host_scalars=host_scalars)
    seen = []

    def recording(v, start=None):
        out = search(v, start)
        seen.append((v.clone(), out[0].clone(), search.take_gap().item()))
        return out
    recording.take_gap = search.take_gap
    for x, y in random_batches(2):
        sh.apgd_batch(flat, x, y, 0.5, "l2", True, 20, projection=recording)
    assert len(seen) == 40
    for v, d, gap in seen:
        exact = _ellipsoid_solution(v, scale, 0.5)
        assert gap <= 1e-4
        assert (d.double() - exact).norm().item() <= 2e-6 * max(exact.norm().item(), 1e-12)
        # the earlier bisection lands on the same point, to its looser tolerance
        before = ellipsoid.project_l2_ellipsoid_bisection(v, scale, 0.5)
        assert (before - d).norm().item() <= 1e-5 * d.norm().item()


def test_the_ellipsoid_search_reads_its_sums_on_a_cpu_only_and_both_searches_agree():
    # A CPU tensor's number is in host memory: the default there is the host search (Python
    # floats, an adaptive number of passes). Both searches give the same APGD result to float32's
    # floor, on both restart rules.
    net = tiny_bn_net()
    flat = sh.FlatModel(net)
    scale = flat.w0.abs()
    assert ellipsoid.make_projection(scale, 0.5, "l2", True).host
    assert not ellipsoid.make_projection(scale, 0.5, "l2", True, host_scalars=False).host
    for restart in sh.APGD_RESTARTS:
        for x, y in random_batches(2):
            rows = [sh.apgd_batch(flat, x, y, 0.5, "l2", True, 20, restart=restart,
                                  projection=ellipsoid.make_projection(scale, 0.5, "l2", True, host_scalars=host))
                    for host in (True, False)]
            (_, _, worst_host, _, norm_host, gap_host), (_, _, worst_device, _, norm_device, gap_device) = rows
            assert worst_host == pytest.approx(worst_device, rel=1e-5)
            assert norm_host == pytest.approx(norm_device, rel=1e-5)
            assert gap_host <= ellipsoid.HOST_GAP_TARGET and gap_device <= 1e-4


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
def test_a_model_step_whose_power_overflows_a_float_is_clamped_to_the_bracket(host_scalars):
    """Scales spread over 11 decades (as in a width-2 network's |w|): the model's exponent 1/k
    reaches ~800 on the first step, so (r²/ρ²)^(1/k) overflows a Python float (a tensor gives inf).
    The step then lands on its bracket's bound and the search goes on; the result is still the
    exact projection within its certificate (found by a random search over such cases)."""
    scale = torch.tensor([557.5374145507812, 4.439583335624775e-06, 0.2024906873703003, 82.72029876708984,
                          1.389667669826622e-08])
    v = torch.tensor([-0.008954939432442188, -73.81475067138672, -0.010521544143557549, 1222.9720458984375,
                      -8.385499000549316])
    rho = 0.5
    assert math.isinf(ellipsoid._model_root(0.004973703155464949, 218.5853729248047, 0.9514824151992798,
                                            176.50546264648438, rho))
    exact = _ellipsoid_solution(v, scale, rho)
    projection = ellipsoid.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    d, _ = projection(v)
    gap = float(projection.take_gap())
    assert gap <= 1e-4
    assert weighted_norm(d.double(), scale.double()).item() <= rho * (1 + 1e-6)
    assert bool(((d.double() - exact).abs() <= (gap + 2e-6) * exact.abs() + 1e-30).all())
