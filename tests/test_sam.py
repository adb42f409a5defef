"""The SAM optimizer (training/sam.py), against hand computations with plain autograd.

The helpers here (tiny models, SGD written out) are shared with tests/test_steps.py."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from training.sam import SAM
from training.steps import mixed_step

LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.1, 0.9, 5e-4, 0.2


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))


def make_sam(model, rho=RHO, **kwargs):
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM,
               weight_decay=WEIGHT_DECAY, **kwargs)


def batch(size=10, shape=(3, 2, 2), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def mean_loss(model, params, images, targets):
    names = [name for name, _ in model.named_parameters()]
    return F.cross_entropy(functional_call(model, dict(zip(names, params)), (images,)), targets)


def sgd_by_hand(params, direction, buffers=None):
    """torch.optim.SGD with momentum and coupled weight decay, written out."""
    new_params, new_buffers = [], []
    for k, (p, g) in enumerate(zip(params, direction)):
        d_p = g + WEIGHT_DECAY * p
        buf = d_p.clone() if buffers is None else MOMENTUM * buffers[k] + d_p
        new_params.append(p - LR * buf)
        new_buffers.append(buf)
    return new_params, new_buffers


def current(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params(model, expected):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- SAM optimizer

def test_rho_must_be_non_negative():
    with pytest.raises(ValueError):
        make_sam(mlp(), rho=-0.1)


def test_first_step_perturbs_by_rho_times_unit_global_gradient():
    model = mlp()
    optimizer = make_sam(model)
    images, targets = batch()
    theta = current(model)
    F.cross_entropy(model(images), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    global_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    optimizer.first_step()
    for p, p0, g in zip(model.parameters(), theta, grads):
        torch.testing.assert_close(p.detach(), p0 + RHO * g / global_norm)
    optimizer.restore()
    assert_params(model, theta)


def test_adaptive_perturbation():
    model = mlp()
    optimizer = make_sam(model, adaptive=True)
    images, targets = batch()
    theta = current(model)
    F.cross_entropy(model(images), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaled_norm = torch.sqrt(sum((p.abs() * g).pow(2).sum() for p, g in zip(theta, grads)))
    optimizer.first_step()
    for p, p0, g in zip(model.parameters(), theta, grads):
        torch.testing.assert_close(p.detach(), p0 + RHO * p0.pow(2) * g / scaled_norm)


def test_two_sam_steps_match_hand_computation():
    model = mlp()
    optimizer = make_sam(model)
    params, buffers = current(model), None
    for seed in (1, 2):
        images, targets = batch(seed=seed)
        # By hand: gradient at θ + rho·g/‖g‖, then SGD with momentum and weight decay at θ.
        leaves = [p.clone().requires_grad_(True) for p in params]
        g = torch.autograd.grad(mean_loss(model, leaves, images, targets), leaves)
        norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
        perturbed = [(p + RHO * x / norm).requires_grad_(True) for p, x in zip(params, g)]
        g_adv = torch.autograd.grad(mean_loss(model, perturbed, images, targets), perturbed)
        params, buffers = sgd_by_hand(params, g_adv, buffers)

        optimizer.zero_grad()
        F.cross_entropy(model(images), targets).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(images), targets).backward()
        optimizer.second_step(zero_grad=True)
        assert_params(model, params)


def test_closure_step_equals_two_half_steps():
    model_a, model_b = mlp(), mlp()
    opt_a, opt_b = make_sam(model_a), make_sam(model_b)
    images, targets = batch()

    def closure():
        F.cross_entropy(model_a(images), targets).backward()

    opt_a.zero_grad()
    closure()
    opt_a.step(closure)
    mixed_step(model_b, opt_b, images, targets, torch.ones(10, dtype=torch.bool))  # plain SAM
    assert_params(model_a, current(model_b))


def run_steps(model, optimizer, seeds):
    for seed in seeds:
        images, targets = batch(seed=seed)
        mask = torch.arange(10) % 3 == 0
        mixed_step(model, optimizer, images, targets, mask)


def test_state_dict_round_trip_gives_identical_steps():
    model = mlp()
    optimizer = make_sam(model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer.base_optimizer, milestones=[1], gamma=0.1)
    run_steps(model, optimizer, [1, 2])
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.1)  # scheduler seen through SAM
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    assert all("momentum_buffer" in state for state in saved_optimizer["state"].values())
    run_steps(model, optimizer, [3, 4])

    resumed_model = mlp()
    resumed_model.load_state_dict(saved_model)
    resumed = make_sam(resumed_model, rho=0.9)  # rho comes back from the state dict
    resumed.load_state_dict(saved_optimizer)
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["rho"] == RHO
    assert resumed.param_groups[0]["lr"] == pytest.approx(LR * 0.1)
    run_steps(resumed_model, resumed, [3, 4])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
