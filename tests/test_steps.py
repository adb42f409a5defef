"""The training steps (training/steps.py): plain SGD against torch's own loop, the mixed step
against hand computations with plain autograd, BatchNorm statistics against a replay by hand, and
both steps under an fp16 loss scale (an overflow skips the whole step, SAM's perturbation included)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fixtures import (LR, MOMENTUM, RHO, WEIGHT_DECAY, assert_params, batch, current, fp16_sam_member, make_sam,
                            mlp)
from tests.references import mean_loss, sgd_by_hand
from training.steps import frozen_batchnorm_statistics, mixed_step, sgd_step, sub_batches


def assert_step_outputs(loss_sum, correct, expected_loss_sum, expected_correct):
    """A step returns device tensors, not Python numbers (reading them would make the host wait for the
    step), holding the batch's summed loss and number correct before the update."""
    assert isinstance(loss_sum, torch.Tensor) and loss_sum.shape == () and loss_sum.dtype == torch.float32
    assert isinstance(correct, torch.Tensor) and correct.shape == () and correct.dtype == torch.int64
    assert float(loss_sum) == pytest.approx(expected_loss_sum, rel=1e-5)
    assert int(correct) == expected_correct


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


# --------------------------------------------------------------------------- plain SGD

def release_sgd_loop(model, optimizer, batches):
    """The released training loop's plain step, written out with torch alone."""
    for images, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("make_model", [mlp, bn_net])
def test_sgd_step_is_bit_identical_to_the_released_loop(make_model):
    shape = (3, 2, 2) if make_model is mlp else (3, 4, 4)
    batches = [batch(seed=seed, shape=shape) for seed in (1, 2, 3)]
    expected_model = make_model()
    release_sgd_loop(expected_model, torch.optim.SGD(expected_model.parameters(), lr=0.1, momentum=0.9,
                                                     weight_decay=5e-4), batches)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for images, targets in batches:
        sgd_step(model, optimizer, images, targets)
    for p, q in zip(model.state_dict().values(), expected_model.state_dict().values()):
        assert torch.equal(p, q)  # BatchNorm's running statistics included


def test_sgd_step_matches_hand_computation_and_returns_device_sums():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, targets = batch(size=7)
    leaves = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    grads = torch.autograd.grad(mean_loss(model, leaves, images, targets), leaves)
    expected = sgd_by_hand([p.detach() for p in leaves], grads)[0]
    with torch.no_grad():
        logits = model(images)
        expected_loss_sum = float(F.cross_entropy(logits, targets, reduction="sum"))
        expected_correct = int((logits.argmax(1) == targets).sum())
    loss_sum, correct = sgd_step(model, optimizer, images, targets)
    assert_params(model, expected)
    assert_step_outputs(loss_sum, correct, expected_loss_sum, expected_correct)


def fp16_mlp():
    from training.accel import FastPath
    model = mlp()
    FastPath("fp16", device="cpu").prepare(model)  # the forward under fp16 autocast
    return model


def test_sgd_step_with_an_fp16_loss_scale_skips_an_overflow_and_steps_otherwise():
    images, targets = batch()
    unscaled = fp16_mlp()
    sgd_step(unscaled, torch.optim.SGD(unscaled.parameters(), lr=0.1), images, targets)
    for init_scale, overflows in ((2.0 ** 8, False), (2.0 ** 40, True)):  # 2^40: fp16 gradients overflow
        model = fp16_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        before = current(model)
        sgd_step(model, optimizer, images, targets, scaler=scaler)
        if overflows:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            assert scaler.get_scale() == init_scale / 2
        else:  # the scale is divided out again: the unscaled step, up to fp16 rounding
            assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            assert_params(model, current(unscaled))
            assert scaler.get_scale() == init_scale


@pytest.mark.parametrize("mask", [[False] * 10, [True] * 10, [True, False] * 5])
def test_fp16_overflow_skips_the_step_and_keeps_theta(mask):
    model, optimizer, fast = fp16_sam_member(init_scale=2.0 ** 40)  # scaled gradients overflow fp16
    before = current(model)
    images, targets = batch(seed=1)
    mixed_step(model, optimizer, images, targets, torch.tensor(mask), scaler=fast.scaler)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # SAM's θ+e undone too
    assert not optimizer.base_optimizer.state  # no momentum taken from a skipped step
    assert fast.scaler.get_scale() == 2.0 ** 39  # backed off


def test_fp16_overflow_in_the_clean_sam_pass_alone_skips_the_step():
    """The clean pass only sets e; its overflow must still reach the scaler."""
    def run(blow_up_clean_pass):
        calls = []

        def criterion(logits, targets):
            calls.append(1)
            loss = F.cross_entropy(logits, targets)
            # Call 2 is the SAM sub-batch's clean pass (1: normal sub-batch, 3: perturbed pass).
            return loss * 1e38 if blow_up_clean_pass and len(calls) == 2 else loss
        model, optimizer, fast = fp16_sam_member(init_scale=2.0 ** 8)
        before = current(model)
        mask = torch.tensor([True] + [False] * 9)
        mixed_step(model, optimizer, *batch(seed=2), mask, criterion=criterion, scaler=fast.scaler)
        changed = not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        return changed, fast.scaler.get_scale()
    assert run(False) == (True, 2.0 ** 8)
    assert run(True) == (False, 2.0 ** 7)


def test_an_empty_batch_is_no_step():
    model = mlp()
    optimizer = make_sam(model)
    before = current(model)
    images, targets = batch(size=0)
    for loss_sum, correct in (sgd_step(model, optimizer, images, targets),
                              mixed_step(model, optimizer, images, targets, torch.zeros(0, dtype=torch.bool))):
        assert float(loss_sum) == 0 and int(correct) == 0
    assert_params(model, before)
    assert not optimizer.base_optimizer.state


# --------------------------------------------------------------------------- sub-batches, BatchNorm freezing

def test_sub_batches_keep_batch_order_and_pass_a_whole_batch_through():
    images, targets = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    mask = torch.tensor([True, False, False, True, True, False]).numpy()
    (normal_images, normal_targets), (sam_images, sam_targets) = sub_batches(images, targets, mask)
    assert normal_targets.tolist() == [1, 2, 5] and sam_targets.tolist() == [0, 3, 4]
    assert torch.equal(normal_images, images[[1, 2, 5]]) and torch.equal(sam_images, images[[0, 3, 4]])
    whole, none = sub_batches(images, targets, mask & False)
    assert whole[0] is images and whole[1] is targets and none is None
    none, whole = sub_batches(images, targets, mask | True)
    assert whole[0] is images and none is None


@pytest.mark.parametrize("momentum", [0.1, None])  # None: BatchNorm's cumulative average
def test_frozen_batchnorm_statistics_restore_every_buffer(momentum):
    model = bn_net()
    model[1].momentum = momentum
    images = batch(size=6, shape=(3, 4, 4))[0] * 3 + 1
    model(images)
    before = {name: b.clone() for name, b in model.named_buffers()}
    with frozen_batchnorm_statistics(model):
        F.cross_entropy(model(images * 2), torch.zeros(6, dtype=torch.long)).backward()
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])  # the pass did update
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())
    with frozen_batchnorm_statistics(model, enabled=False):
        model(images * 2)
    assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1


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
    assert_step_outputs(loss_sum, correct, expected_loss_sum, expected_correct)


def test_the_all_false_mask_is_the_plain_sgd_step():
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
