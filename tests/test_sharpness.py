"""Worst-case (APGD), average-case and Fisher sharpness (measure/sharpness.py)."""
import itertools

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
        init_loss, _, worst_loss, _, _ = sh.apgd_batch(flat, x, y, rho, norm, adaptive, 20, trace=trace)
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
    init_loss, _, worst_loss, _, _ = sh.apgd_batch(flat, x, y, rho, norm, True, 20)
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
