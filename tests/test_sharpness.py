"""Worst-case (APGD), average-case and Fisher sharpness (measure/sharpness.py)."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from measure import sharpness as sh


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():  # non-trivial running statistics so eval mode differs from train mode
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _batches(n_batches=3, size=5, seed=1, shape=(3, 6, 6), classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((size,) + shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n_batches)]


def test_checkpoint_schedule_for_20_iterations():
    assert sh.apgd_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_rho_zero_gives_zero(norm):
    net = _tiny_net()
    out = sh.worst_case_sharpness(net, _batches(2), rhos=[0.0], norms=[norm], n_iters=5)
    assert out[sh.sharpness_key(norm, 0.0)]["sharpness"] == 0.0
    avg = sh.average_case_sharpness(net, _batches(2), rhos=[0.0], norms=[norm], n_draws=3)
    assert avg[sh.sharpness_key(norm, 0.0)]["sharpness"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("norm,adaptive", [("l2", True), ("l2", False), ("linf", True), ("linf", False)])
def test_iterates_stay_in_the_set_and_sharpness_is_nonnegative(norm, adaptive):
    net = _tiny_net()
    flat = sh.FlatModel(net)
    before = flat.w0.clone()
    scale = sh.weight_scale(flat.w0, adaptive)
    rho = 0.5 if adaptive else 0.05
    for x, y in _batches(2):
        trace = []
        init_loss, _, worst_loss, _, _, _ = sh.apgd_batch(flat, x, y, rho, norm, adaptive, 20, trace=trace)
        assert len(trace) == 20
        assert all(sh.in_set(d, scale, rho, norm) for d in trace)
        assert worst_loss >= init_loss
        # at least one iterate reaches the boundary region of the set (the search moves)
        assert max(sh.weighted_norm(d, scale).item() for d in trace) > 0
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), before)


def test_ellipsoid_projection_is_the_euclidean_projection():
    torch.manual_seed(0)
    scale = torch.rand(6) + 0.1
    v = torch.randn(6) * 3
    rho = 0.5
    proj = sh.project_l2_ellipsoid(v, scale, rho)
    assert sh.weighted_norm(proj, scale).item() == pytest.approx(rho, rel=1e-5)
    # no feasible point sampled at random is closer to v
    samples = torch.randn(200000, 6)
    samples = samples / samples.norm(dim=1, keepdim=True) * torch.rand(200000, 1) ** (1 / 6)
    samples = samples * scale * rho
    assert (samples - v).norm(dim=1).min().item() >= (proj - v).norm().item() - 1e-6


def test_zero_weights_are_excluded_from_the_adaptive_projection():
    net = _tiny_net()
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[5].bias.zero_()
    flat = sh.FlatModel(net)
    zero = flat.w0 == 0
    assert zero.sum() > 0
    for norm in ("l2", "linf"):
        trace = []
        out = sh.apgd_batch(flat, *_batches(1)[0], 0.5, norm, True, 20, trace=trace)
        assert all(np.isfinite(v) for v in out)
        assert all(torch.isfinite(d).all() and (d[zero] == 0).all() for d in trace)
    v = torch.randn_like(flat.w0)
    proj = sh.project_l2_ellipsoid(v, flat.w0.abs(), 0.1)
    assert torch.isfinite(proj).all() and (proj[zero] == 0).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_worst_case_beats_average_case_on_the_same_batches(norm):
    # linf: uniform noise lies inside the box, so its mean loss is at most the maximum. l2: the
    # released average case draws rho·|w|·N(0,1), whose norm exceeds rho, so compare at a small rho
    # where the worst case (first order in rho) dominates the noise (second order).
    net = _tiny_net()
    batches = _batches(3)
    rho = 0.5 if norm == "linf" else 0.01
    worst = sh.worst_case_sharpness(net, batches, rhos=[rho], norms=[norm])[sh.sharpness_key(norm, rho)]
    avg = sh.average_case_sharpness(net, batches, rhos=[rho], norms=[norm], n_draws=50)[sh.sharpness_key(norm, rho)]
    assert worst["sharpness"] >= avg["sharpness"]
    assert all(w >= 0 for w in worst["per_batch_sharpness"])


def _linear_problem():
    torch.manual_seed(3)
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.2, -0.7], [0.4, 0.9]]))
    x = torch.randn(5, 2)
    y = torch.tensor([0, 1, 1, 0, 1])
    return model.eval(), x, y


def _grid_losses(w0, x, y, deltas):
    weights = w0.reshape(1, 2, 2) + deltas.reshape(-1, 2, 2)
    logits = torch.einsum("bi,koi->kbo", x, weights)
    return F.cross_entropy(logits.reshape(-1, 2), y.repeat(len(deltas)), reduction="none").reshape(len(deltas), -1).mean(1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_matches_a_dense_grid_search_on_a_linear_model(norm):
    model, x, y = _linear_problem()
    rho = 0.5
    flat = sh.FlatModel(model)
    init_loss, _, worst_loss, _, _, _ = sh.apgd_batch(flat, x, y, rho, norm, True, 20)
    scale = flat.w0.abs()
    axis = torch.linspace(-1, 1, 33)
    u = torch.tensor(list(itertools.product(axis.tolist(), repeat=4)))
    if norm == "l2":
        u = u[u.norm(dim=1) > 0]
        u = torch.cat([u[u.norm(dim=1) <= 1], u / u.norm(dim=1, keepdim=True)])  # interior + sphere
    deltas = u * rho * scale
    with torch.no_grad():
        grid_best = _grid_losses(flat.w0, x, y, deltas).max().item()
    grid_sharpness = grid_best - init_loss
    apgd_sharpness = worst_loss - init_loss
    assert grid_sharpness > 0
    assert apgd_sharpness == pytest.approx(grid_sharpness, rel=0.05)


def test_fisher_matches_a_per_sample_loop():
    net = _tiny_net()
    batches = _batches(2)
    out = sh.fisher_sharpness(net, batches)
    values = []
    for x, y in batches:
        for i in range(len(x)):
            loss = F.cross_entropy(net(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, list(net.parameters()))
            values.append(sum(g.pow(2).sum().item() for g in grads))
    assert out["n"] == 10
    assert out["fisher"] == pytest.approx(np.mean(values), rel=1e-4)


def test_logit_normalisation():
    net = sh.LogitNormalization(_tiny_net())
    out = net(torch.randn(4, 3, 6, 6))
    assert torch.allclose(out.mean(dim=1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_release_shuffle_order_matches_a_seeded_dataloader():
    dataset = torch.utils.data.TensorDataset(torch.arange(97))
    torch.manual_seed(13)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    from_loader = torch.cat([b[0] for b in loader])
    assert torch.equal(sh.release_shuffle_order(97, 13), from_loader)


# ----------------------------------------------------------------------------- the ellipsoid, exactly
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
    projection = sh.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    d, _ = projection(v)
    d64, gap = d.double(), projection.take_gap().item()
    assert sh.weighted_norm(d64, scale.double()).item() <= rho * (1 + 1e-6), name          # feasible
    assert bool((d[scale == 0] == 0).all()), name
    # the host search goes on until its certificate is at most HOST_GAP_TARGET
    assert gap <= (sh.HOST_GAP_TARGET if host_scalars else 1e-4), name
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
    projection = sh.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
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
    projection = sh.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
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
    projection = sh.EllipsoidProjection(scale, rho, host_scalars=host_scalars)
    broken = outside.clone()
    broken[scale > 0] = float("nan")
    _, mu = projection(broken)
    projection(outside, mu)
    assert math.isnan(projection.take_gap().item())


@pytest.mark.parametrize("host_scalars", [True, False], ids=["host", "device"])
def test_ellipsoid_projection_of_every_apgd_step_matches_the_float64_solution(host_scalars):
    # In the loop each projection starts from the previous one's multiplier (on the device: 3
    # steps, 4 cold; on the host: until the certificate is at most HOST_GAP_TARGET).
    net = _tiny_net()
    flat = sh.FlatModel(net)
    scale = flat.w0.abs()
    ellipsoid = sh.EllipsoidProjection(scale, 0.5, host_scalars=host_scalars)
    seen = []

    def recording(v, start=None):
        out = ellipsoid(v, start)
        seen.append((v.clone(), out[0].clone(), ellipsoid.take_gap().item()))
        return out
    recording.take_gap = ellipsoid.take_gap
    for x, y in _batches(2):
        sh.apgd_batch(flat, x, y, 0.5, "l2", True, 20, projection=recording)
    assert len(seen) == 40
    for v, d, gap in seen:
        exact = _ellipsoid_solution(v, scale, 0.5)
        assert gap <= 1e-4
        assert (d.double() - exact).norm().item() <= 2e-6 * max(exact.norm().item(), 1e-12)
        # the earlier bisection lands on the same point, to its looser tolerance
        before = sh.project_l2_ellipsoid_bisection(v, scale, 0.5)
        assert (before - d).norm().item() <= 1e-5 * d.norm().item()


# ----------------------------------------------------------------------------- APGD's step halving
def test_worst_restart_is_the_code_before_the_rewrite():
    from tests.apgd_before import apgd_batch_before
    net = _tiny_net()
    flat = sh.FlatModel(net)
    for norm, adaptive in [("l2", True), ("l2", False), ("linf", True)]:
        rho = 0.5 if adaptive else 0.05
        for x, y in _batches(2):
            new_trace, old_trace = [], []
            new = sh.apgd_batch(flat, x, y, rho, norm, adaptive, 20, restart="worst", trace=new_trace)
            old = apgd_batch_before(flat, x, y, rho, norm, adaptive, 20, trace=old_trace)
            assert new[:5] == pytest.approx(old, rel=1e-5, abs=1e-7), (norm, adaptive)
            # iterate by iterate, to the earlier bisection's tolerance
            assert all((a - b).norm() <= 1e-5 * b.norm() + 1e-9 for a, b in zip(new_trace, old_trace))


def _hand_apgd(w0, x, y, rho, norm, n_iters, restart):
    """APGD on a 2x2 linear softmax model, by hand in float64, written the way the release keeps its
    state: the weights in the model (where every gradient is taken), delta and its momentum partner
    prev; on halving the model gets the worst weights back (its load_state_dict), and ``worst``
    also puts delta and prev there. Gradient of mean CE: (softmax − onehot)ᵀ x / B."""
    def loss_grad(w):
        z = x @ w.reshape(2, 2).T
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -log_p[np.arange(len(y)), y].mean(), ((np.exp(log_p) - np.eye(2)[y]).T @ x / len(y)).ravel()

    def project(v):
        if norm == "linf":
            return np.clip(v, -rho * s, rho * s)
        if np.linalg.norm(v / s) <= rho:
            return v
        lo, hi = 0.0, 1e3
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.linalg.norm(v * s / (s * s + mid)) > rho else (lo, mid)
        return v * s * s / (s * s + hi)

    s = np.abs(w0)
    model_w, delta, prev = w0.copy(), np.zeros(4), np.zeros(4)
    worst_loss = prev_worst = loss_grad(w0)[0]
    worst_w, worst_delta = w0.copy(), np.zeros(4)
    step = prev_step = 2 * rho
    prev_cp, n_up, trace, halved = 0, 0, [], []
    # ceil(8·p) for p = 0.22, 0.41, 0.57, 0.70, 0.80 (then 0.87·8 = 6.96 gives 7 again: the end)
    checkpoints = {2, 4, 5, 6, 7}
    for i in range(n_iters):
        backup = delta.copy()
        g = loss_grad(model_w)[1]
        delta = delta + step * (g / (np.linalg.norm(g) + 1e-12) if norm == "l2" else np.sign(g)) * s
        delta = 0.75 * project(delta) + 0.25 * prev
        model_w, prev = w0 + delta, backup
        trace.append(delta.copy())
        loss = loss_grad(model_w)[0]
        if loss > worst_loss:
            worst_loss, worst_w, worst_delta, n_up = loss, model_w.copy(), delta.copy(), n_up + 1
        if i in checkpoints:
            halve = n_up < 0.75 * (i - prev_cp) or (prev_step == step and prev_worst == worst_loss)
            prev_step, prev_worst, prev_cp, n_up = step, worst_loss, i, 0
            if halve:
                halved.append(i)
                step, model_w = step / 2, worst_w.copy()
                if restart == "worst":
                    delta, prev = worst_delta.copy(), worst_delta.copy()
    return worst_loss, np.array(trace), halved


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_both_restarts_follow_a_hand_computed_iteration(norm):
    assert set(sh.apgd_checkpoints(8)) == {2, 4, 5, 6, 7}
    w0 = np.array([1.2, -0.7, 0.4, 0.9])
    x = np.random.RandomState(3).randn(5, 2)
    y = np.array([0, 1, 1, 0, 1])
    rho = 1.0 if norm == "l2" else 0.5
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w0.reshape(2, 2), dtype=torch.float32))
    flat = sh.FlatModel(model.eval())
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    hand = {}
    for restart in sh.APGD_RESTARTS:
        worst_loss, trace, halved = _hand_apgd(w0, x, y, rho, norm, 8, restart)
        hand[restart] = trace
        assert halved  # the step is halved at least once, so the two rules are exercised
        got = []
        out = sh.apgd_batch(flat, xt, yt, rho, norm, True, 8, restart=restart, trace=got)
        assert out[2] == pytest.approx(worst_loss, rel=1e-5)
        assert np.allclose(np.stack([d.double().numpy() for d in got]), trace, rtol=1e-4, atol=1e-6)
    # the two rules do part ways on this problem
    assert np.abs(hand["release"] - hand["worst"]).max() > 1e-3


# ----------------------------------------------------------------------------- no host reads in the loop
def test_an_apgd_batch_reads_the_host_once_whatever_its_length():
    # One read per batch (its six results, copied together); none per iteration: 4 and 8
    # iterations read the same. Both norms, the ball and the ellipsoid, both restarts; also the
    # average case's draws.
    from tests.host_reads import count_host_reads
    net = _tiny_net()
    flat = sh.FlatModel(net)
    x, y = _batches(1)[0]
    scale = flat.w0.abs()
    for norm, adaptive in [("l2", True), ("l2", False), ("linf", True)]:
        for restart in sh.APGD_RESTARTS:
            counts = []
            for n_iters in (4, 8):
                # the ellipsoid's search as on a GPU (a CPU's default reads its sums: see below)
                projection = sh.make_projection(scale, 0.5, norm, adaptive, host_scalars=False)
                with count_host_reads() as reads:
                    sh.apgd_batch(flat, x, y, 0.5, norm, adaptive, n_iters, restart=restart,
                                  projection=projection)
                counts.append(reads.total)
            assert counts == [1, 1], (norm, adaptive, restart, reads.summary())
    for draws in (3, 6):
        with count_host_reads() as reads:
            sh.average_batch(flat, x, y, 0.5, "l2", True, draws, torch.Generator().manual_seed(0))
        assert reads.total == 1, reads.summary()


def test_the_ellipsoid_search_reads_its_sums_on_a_cpu_only_and_both_searches_agree():
    # A CPU tensor's number is in host memory: the default there is the host search (Python
    # floats, an adaptive number of passes). Both searches give the same APGD result to float32's
    # floor, on both restart rules.
    net = _tiny_net()
    flat = sh.FlatModel(net)
    scale = flat.w0.abs()
    assert sh.make_projection(scale, 0.5, "l2", True).host
    assert not sh.make_projection(scale, 0.5, "l2", True, host_scalars=False).host
    for restart in sh.APGD_RESTARTS:
        for x, y in _batches(2):
            rows = [sh.apgd_batch(flat, x, y, 0.5, "l2", True, 20, restart=restart,
                                  projection=sh.make_projection(scale, 0.5, "l2", True, host_scalars=host))
                    for host in (True, False)]
            (_, _, worst_host, _, norm_host, gap_host), (_, _, worst_device, _, norm_device, gap_device) = rows
            assert worst_host == pytest.approx(worst_device, rel=1e-5)
            assert norm_host == pytest.approx(norm_device, rel=1e-5)
            assert gap_host <= sh.HOST_GAP_TARGET and gap_device <= 1e-4


def test_measure_sharpness_records_the_restart(tmp_path):
    import json

    import measure_sharpness
    from models import create_model
    torch.manual_seed(0)
    member = tmp_path / "member.pth.tar"
    torch.save({"state_dict": create_model("resnet18", 10, width=4).state_dict(), "model": "resnet18",
                "width": 4, "dataset": "digits", "num_classes": 10}, member)
    common = ["--dataset", "digits", "--resume", str(member), "--mode", "APGD_worst", "--batch-num", "1",
              "--eval-batch-size", "2", "--n_iters", "3", "--norm", "l2", "--device", "cpu"]
    assert measure_sharpness.get_parser().parse_args(common).apgd_restart == "release"
    measure_sharpness.main(common + ["--apgd_restart", "worst", "--save", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "APGD_worst.json").read_text())
    assert result["meta"]["apgd_restart"] == "worst"
    assert result["meta"]["ellipsoid_search"] == "host scalars"      # a CPU's default
    assert 0 <= result["individual_sharpness"][0]["l2_0.5"]["projection_gap"] <= 1e-4
