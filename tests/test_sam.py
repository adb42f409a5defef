"""SAM optimizer and the SharpBalance mixed step, against hand computations with plain autograd."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from training.sam import SAM, mixed_step, sam_step, sgd_step

LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.1, 0.9, 5e-4, 0.2


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


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
    sam_step(model_b, opt_b, images, targets)
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


# --------------------------------------------------------------------------- mixed step

def hand_mixed_update(model, params, images, targets, sam_mask):
    """g = (|B_N|/|B|)·∇L_N(θ) + (|B_S|/|B|)·∇L_S(θ+e), e from B_S only; then one SGD step."""
    n = len(targets)
    normal, sam = ~sam_mask, sam_mask
    direction = [torch.zeros_like(p) for p in params]
    if normal.any():
        leaves = [p.clone().requires_grad_(True) for p in params]
        g_n = torch.autograd.grad(mean_loss(model, leaves, images[normal], targets[normal]), leaves)
        direction = [d + normal.sum() / n * g for d, g in zip(direction, g_n)]
    if sam.any():
        leaves = [p.clone().requires_grad_(True) for p in params]
        g_s = torch.autograd.grad(mean_loss(model, leaves, images[sam], targets[sam]), leaves)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in g_s))
        perturbed = [(p + RHO * g / norm).requires_grad_(True) for p, g in zip(params, g_s)]
        g_adv = torch.autograd.grad(mean_loss(model, perturbed, images[sam], targets[sam]), perturbed)
        direction = [d + sam.sum() / n * g for d, g in zip(direction, g_adv)]
    return sgd_by_hand(params, direction)[0]


@pytest.mark.parametrize("mask_kind", ["mixed", "no_sam", "all_sam"])
def test_mixed_step_matches_hand_computation(mask_kind):
    model = mlp()
    optimizer = make_sam(model)
    images, targets = batch(size=11)
    sam_mask = {"mixed": torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool),
                "no_sam": torch.zeros(11, dtype=torch.bool),
                "all_sam": torch.ones(11, dtype=torch.bool)}[mask_kind]
    expected = hand_mixed_update(model, current(model), images, targets, sam_mask)
    with torch.no_grad():
        logits = model(images)
        expected_loss_sum = float(F.cross_entropy(logits, targets, reduction="sum"))
        expected_correct = int((logits.argmax(1) == targets).sum())

    loss_sum, correct = mixed_step(model, optimizer, images, targets, sam_mask)
    assert_params(model, expected)
    # Device tensors, not Python numbers: reading them would make the host wait for the step.
    assert isinstance(loss_sum, torch.Tensor) and loss_sum.shape == () and loss_sum.dtype == torch.float32
    assert isinstance(correct, torch.Tensor) and correct.shape == () and correct.dtype == torch.int64
    assert float(loss_sum) == pytest.approx(expected_loss_sum, rel=1e-5)
    assert int(correct) == expected_correct


def test_edge_cases_are_plain_sgd_and_plain_sam():
    images, targets = batch()
    model_a, model_b = mlp(), mlp()
    opt_a, opt_b = make_sam(model_a), make_sam(model_b)
    mixed_step(model_a, opt_a, images, targets, torch.zeros(10, dtype=torch.bool))
    sgd_step(model_b, opt_b, images, targets)
    assert_params(model_a, current(model_b))

    # sgd_step also drives a plain SGD optimizer (the non-SAM baseline).
    model_c = mlp()
    plain = torch.optim.SGD(model_c.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sgd_step(model_c, plain, images, targets)
    assert_params(model_c, current(model_b))

    model_d, model_e = mlp(), mlp()
    opt_d, opt_e = make_sam(model_d), make_sam(model_e)
    mixed_step(model_d, opt_d, images, targets, torch.ones(10, dtype=torch.bool))
    sam_step(model_e, opt_e, images, targets)
    assert_params(model_d, current(model_e))

    with pytest.raises(TypeError):
        mixed_step(model_c, plain, images, targets, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError):
        mixed_step(model_a, opt_a, images, targets, torch.ones(9, dtype=torch.bool))


def bn_state(model):
    bn = model[1]
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def replay_bn_statistics(model, images, targets, sam_mask, include_perturbed):
    """Running statistics after the released order of passes, replayed on a copy by hand."""
    replica = copy.deepcopy(model).train()
    replica(images[~sam_mask])                       # normal sub-batch at θ
    loss = F.cross_entropy(replica(images[sam_mask]), targets[sam_mask])  # SAM sub-batch at θ
    if include_perturbed:
        grads = torch.autograd.grad(loss, list(replica.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(replica.parameters(), grads):
                p.add_(RHO * g / norm)
            replica(images[sam_mask])                # SAM sub-batch at θ + e
    return bn_state(replica)


@pytest.mark.parametrize("freeze", [False, True])
def test_batchnorm_statistics_follow_every_pass_or_freeze(freeze):
    model = bn_net()
    optimizer = make_sam(model)
    images, targets = batch(size=12, shape=(3, 4, 4))
    images = images * 3 + 1  # statistics far from the initial (0, 1)
    sam_mask = torch.arange(12) % 4 != 0
    expected_mean, expected_var, expected_count = replay_bn_statistics(
        model, images, targets, sam_mask, include_perturbed=not freeze)
    mixed_step(model, optimizer, images, targets, sam_mask, freeze_bn_on_perturbed=freeze)
    mean, var, count = bn_state(model)
    assert count == expected_count == (2 if freeze else 3)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


def test_batchnorm_model_loss_sum_uses_sub_batch_statistics():
    model = bn_net()
    optimizer = make_sam(model)
    images, targets = batch(size=12, shape=(3, 4, 4))
    sam_mask = torch.arange(12) % 3 == 0
    replica = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(replica(images[m]), targets[m], reduction="sum"))
                       for m in (~sam_mask, sam_mask))
    loss_sum, _ = mixed_step(model, optimizer, images, targets, sam_mask)
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
