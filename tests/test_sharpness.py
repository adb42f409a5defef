"""Worst-case (APGD), average-case and fisher sharpness (measure/sharpness.py): APGD against a dense
grid search, a hand-computed iteration (both restart rules) and the code before its sync-free
rewrite; iterates inside their sets; fisher against a per-sample loop; one host read per batch. The
projections themselves are tested in tests/test_ellipsoid.py, measure_sharpness.py end to end in
tests/test_measure_scripts.py."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from measure import ellipsoid
from measure import sharpness as sh
from tests.fixtures import random_batches, tiny_bn_net
from tests.references import in_set, project_l2_ellipsoid


def test_the_checkpoint_schedule_for_20_iterations_is_the_releases():
    assert sh.apgd_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_rho_zero_gives_zero(norm):
    net = tiny_bn_net()
    out = sh.worst_case_sharpness(net, random_batches(2), rhos=[0.0], norms=[norm], n_iters=5)
    assert out[sh.setting_key(norm, 0.0)]["sharpness"] == 0.0
    avg = sh.average_case_sharpness(net, random_batches(2), rhos=[0.0], norms=[norm], n_draws=3)
    assert avg[sh.setting_key(norm, 0.0)]["sharpness"] == pytest.approx(0.0, abs=1e-7)


def _loss_at(net, w, x, y):
    """Mean cross-entropy of ``net`` with its parameters replaced by the flat vector ``w`` (in
    ``parameters()`` order), by a plain functional forward pass; (loss, error rate)."""
    params, start = {}, 0
    for name, p in net.named_parameters():
        params[name] = w[start:start + p.numel()].view_as(p)
        start += p.numel()
    with torch.no_grad():
        logits = functional_call(net, params, (x,))
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()


@pytest.mark.parametrize("norm,adaptive", [("l2", True), ("l2", False), ("linf", True), ("linf", False)])
def test_iterates_stay_in_the_set_and_the_worst_loss_is_the_largest_one_seen(norm, adaptive):
    net = tiny_bn_net()
    flat = sh.FlatModel(net)
    before = flat.w0.clone()
    scale = sh.weight_scale(flat.w0, adaptive)
    rho = 0.5 if adaptive else 0.05
    for x, y in random_batches(2):
        trace = []
        init_loss, init_err, worst_loss, worst_err, worst_norm, _ = sh.apgd_batch(flat, x, y, rho, norm, adaptive,
                                                                                  20, trace=trace)
        assert len(trace) == 20
        assert all(in_set(d, scale, rho, norm) for d in trace)
        # The loss at w0 and at every iterate, evaluated apart from FlatModel: the worst is their
        # maximum (the first iterate reaching it), with that iterate's error and norm.
        seen = [_loss_at(net, before, x, y)] + [_loss_at(net, before + d, x, y) for d in trace]
        assert (init_loss, init_err) == pytest.approx(seen[0], rel=1e-6)
        best = max(range(len(seen)), key=lambda i: (seen[i][0], -i))
        assert best > 0  # the search found a higher loss than w0's
        assert (worst_loss, worst_err) == pytest.approx(seen[best], rel=1e-6)
        assert worst_norm == pytest.approx(trace[best - 1].norm().item(), rel=1e-6)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), before)


def test_zero_weights_are_excluded_from_the_adaptive_projection():
    net = tiny_bn_net()
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[5].bias.zero_()
    flat = sh.FlatModel(net)
    zero = flat.w0 == 0
    # by hand: the first filter (3 channels x 3x3), BatchNorm's 4 biases (initialised at 0), the head's 3 biases
    assert int(zero.sum()) == 3 * 3 * 3 + 4 + 3
    for norm in ("l2", "linf"):
        trace = []
        out = sh.apgd_batch(flat, *random_batches(1)[0], 0.5, norm, True, 20, trace=trace)
        assert all(np.isfinite(v) for v in out)
        assert all(torch.isfinite(d).all() and (d[zero] == 0).all() for d in trace)
    v = torch.randn_like(flat.w0)
    proj = project_l2_ellipsoid(v, flat.w0.abs(), 0.1)
    assert torch.isfinite(proj).all() and (proj[zero] == 0).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_worst_case_beats_average_case_on_the_same_batches(norm):
    # linf: uniform noise lies inside the box, so its mean loss is at most the maximum. l2: the
    # released average case draws rho·|w|·N(0,1), whose norm exceeds rho, so compare at a small rho
    # where the worst case (first order in rho) dominates the noise (second order).
    net = tiny_bn_net()
    batches = random_batches(3)
    rho = 0.5 if norm == "linf" else 0.01
    worst = sh.worst_case_sharpness(net, batches, rhos=[rho], norms=[norm])[sh.setting_key(norm, rho)]
    avg = sh.average_case_sharpness(net, batches, rhos=[rho], norms=[norm], n_draws=50)[sh.setting_key(norm, rho)]
    assert worst["sharpness"] >= avg["sharpness"]


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
    net = tiny_bn_net()
    batches = random_batches(2)
    out = sh.fisher_sharpness(net, batches)
    values = []
    for x, y in batches:
        for i in range(len(x)):
            loss = F.cross_entropy(net(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, list(net.parameters()))
            values.append(sum(g.pow(2).sum().item() for g in grads))
    assert out["n"] == 10
    assert out["fisher"] == pytest.approx(np.mean(values), rel=1e-4)


def test_logit_normalisation_centres_the_logits_and_scales_them_to_unit_norm():
    net = sh.LogitNormalization(tiny_bn_net())
    out = net(torch.randn(4, 3, 6, 6))
    assert torch.allclose(out.mean(dim=1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_release_shuffle_order_matches_a_seeded_dataloader():
    dataset = torch.utils.data.TensorDataset(torch.arange(97))
    torch.manual_seed(13)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    from_loader = torch.cat([b[0] for b in loader])
    assert torch.equal(sh.release_shuffle_order(97, 13), from_loader)


# ----------------------------------------------------------------------------- APGD's step halving
def test_worst_restart_is_the_code_before_the_rewrite():
    from tests.apgd_before import apgd_batch_before
    net = tiny_bn_net()
    flat = sh.FlatModel(net)
    for norm, adaptive in [("l2", True), ("l2", False), ("linf", True)]:
        rho = 0.5 if adaptive else 0.05
        for x, y in random_batches(2):
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
    net = tiny_bn_net()
    flat = sh.FlatModel(net)
    x, y = random_batches(1)[0]
    scale = flat.w0.abs()
    for norm, adaptive in [("l2", True), ("l2", False), ("linf", True)]:
        for restart in sh.APGD_RESTARTS:
            counts = []
            for n_iters in (4, 8):
                # the ellipsoid's search as on a GPU (a CPU's default reads its sums: see below)
                projection = ellipsoid.make_projection(scale, 0.5, norm, adaptive, host_scalars=False)
                with count_host_reads() as reads:
                    sh.apgd_batch(flat, x, y, 0.5, norm, adaptive, n_iters, restart=restart,
                                  projection=projection)
                counts.append(reads.total)
            assert counts == [1, 1], (norm, adaptive, restart, reads.summary())
    for draws in (3, 6):
        with count_host_reads() as reads:
            sh.average_batch(flat, x, y, 0.5, "l2", True, draws, torch.Generator().manual_seed(0))
        assert reads.total == 1, reads.summary()


def test_saturation_is_the_share_of_batches_whose_worst_loss_reaches_a_uniform_guess():
    """ln C for C = 3 classes, and the share of batches whose worst loss is at or above it, counted
    here from the per-batch numbers the summary reports (worst = init + per-batch sharpness)."""
    net = tiny_bn_net()
    with torch.no_grad():
        net[-1].weight.mul_(30.0)  # confident predictions ...
    batches = [(x, net(x).argmax(1)) for x, _ in random_batches(4)]  # ... that are right: losses far below ln 3
    tiny = sh.worst_case_sharpness(net, batches, rhos=[1e-4], norms=["l2"], n_iters=3)[sh.setting_key("l2", 1e-4)]
    huge = sh.worst_case_sharpness(net, batches, rhos=[50.0], norms=["linf"], n_iters=5)[sh.setting_key("linf", 50.0)]
    for summary in (tiny, huge):
        assert summary["uniform_loss"] == pytest.approx(np.log(3), abs=1e-12)
        init = [F.cross_entropy(net(x), y).item() for x, y in batches]
        worst = np.asarray(init) + np.asarray(summary["per_batch_sharpness"])
        assert summary["saturated_fraction"] == pytest.approx(float(np.mean(worst >= np.log(3) - 1e-6)))
    assert tiny["saturated_fraction"] == 0.0  # a 1e-4 neighbourhood keeps the trained losses (below ln 3)
    assert huge["saturated_fraction"] == 1.0  # weights moved by 50x their size: no better than a guess
