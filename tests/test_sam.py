"""The SAM optimizer (training/sam.py), against hand computations with plain autograd: the
perturbation (plain and adaptive, whatever the loss scale), two full steps, the closure form and a
state-dict round trip."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures import LR, RHO, assert_params, batch, current, make_sam, mlp
from tests.references import mean_loss, sgd_by_hand
from training.sam import SAM
from training.steps import mixed_step

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


def test_adaptive_perturbation_scales_the_gradient_by_the_squared_weights():
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


def test_perturbation_is_invariant_to_the_loss_scale():
    results = []
    for scale in (1.0, 2.0 ** 16):
        model = mlp(hidden=16)
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
        images, targets = batch(seed=3)
        (F.cross_entropy(model(images), targets) * scale).backward()
        optimizer.first_step()
        results.append(current(model))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


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
