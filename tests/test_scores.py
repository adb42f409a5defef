"""SharpBalance's partition rules (training/partition.py, against hand-worked sets and a brute-force
set computation) and the per-sample squared gradient norms (training/scores.py), backends vmap and
hooks, against one backward pass per sample."""
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.references import loop_squared_grad_norms
from training.scores import squared_grad_norms
from training.partition import build_sam_masks, random_sam_masks, resolve_split_rule, sam_masks, selected_sets
from utils.errors import UserError


def as_set(mask_row):
    return set(np.flatnonzero(mask_row).tolist())


# --------------------------------------------------------------------------- worked example

WORKED_LOW_SETS = [{2, 3, 4, 5, 6, 7}, {0, 2, 4, 6, 7, 10}, {2, 3, 4, 6, 7, 11}]


def worked_scores():
    """Scores whose 6 lowest per member are exactly the worked example's L_0, L_1, L_2 (N=12)."""
    rng = np.random.RandomState(5)
    scores = np.zeros((3, 12))
    for j, low in enumerate(WORKED_LOW_SETS):
        for k in range(12):
            scores[j, k] = rng.uniform(0, 1) if k in low else rng.uniform(2, 3)
    return scores


def test_worked_example_low_sets():
    low = selected_sets(worked_scores(), 0.5)
    assert [as_set(row) for row in low] == WORKED_LOW_SETS


def test_worked_example_share():
    masks = sam_masks(worked_scores(), 0.5, rule="share")
    # A = {1, 8, 9}: A_0 = [1], A_1 = [8], A_2 = [9].
    assert as_set(masks[0]) == {0, 2, 3, 4, 6, 7, 10, 11} | {1}
    assert as_set(masks[1]) == ({2, 3, 4, 5, 6, 7} | {2, 3, 4, 6, 7, 11}) | {8}
    assert as_set(masks[2]) == ({2, 3, 4, 5, 6, 7} | {0, 2, 4, 6, 7, 10}) | {9}


def test_worked_example_boost():
    masks = sam_masks(worked_scores(), 0.5, rule="boost")
    assert as_set(masks[0]) == {0, 2, 3, 4, 6, 7, 10, 11} | {8, 9}
    assert as_set(masks[1]) == {2, 3, 4, 5, 6, 7, 11} | {1, 9}
    assert as_set(masks[2]) == {0, 2, 3, 4, 5, 6, 7, 10} | {1, 8}


def test_worked_example_through_build_and_auto_rule():
    scores = worked_scores()
    assert np.array_equal(build_sam_masks(scores, 0.5, dataset="cifar10"),
                          sam_masks(scores, 0.5, rule="boost"))
    assert np.array_equal(build_sam_masks(scores, 0.5, dataset="cifar100"),
                          sam_masks(scores, 0.5, rule="share"))
    assert np.array_equal(build_sam_masks(torch.tensor(scores), 0.5, split_rule="share", dataset="cifar10"),
                          sam_masks(scores, 0.5, rule="share"))


# --------------------------------------------------------------------------- brute force

def brute_force_masks(scores, flat_ratio, rule, select):
    m, n = scores.shape
    k = math.floor(flat_ratio * n)
    low_sets = []
    for j in range(m):
        ascending = sorted(range(n), key=lambda idx: (scores[j, idx], idx))  # stable ascending
        low_sets.append(set(ascending[:k]) if select == "flattest" else set(ascending[n - k:]))
    everybody = set().union(*low_sets)
    leftovers = sorted(set(range(n)) - everybody)
    result = []
    for i in range(m):
        others = set().union(*(low_sets[j] for j in range(m) if j != i))
        own = set(leftovers[i::m])
        result.append(others | own if rule == "share" else others | (set(leftovers) - own))
    return low_sets, result


@pytest.mark.parametrize("select", ["flattest", "sharpest"])
@pytest.mark.parametrize("rule", ["share", "boost"])
def test_split_matches_brute_force(select, rule):
    rng = np.random.RandomState(0)
    for m, n, ratio in itertools.product([1, 2, 3, 5], [1, 7, 40], [0.0, 0.3, 0.5, 0.77, 0.99]):
        for tied in (False, True):
            # Integer scores make many ties, which checks the stable tie order too.
            scores = rng.randint(0, 4, size=(m, n)).astype(float) if tied else rng.rand(m, n)
            low_sets, expected = brute_force_masks(scores, ratio, rule, select)
            low = selected_sets(scores, ratio, select=select)
            got = sam_masks(scores, ratio, rule=rule, select=select)
            assert [as_set(row) for row in low] == low_sets, (m, n, ratio, tied)
            assert [as_set(row) for row in got] == expected, (m, n, ratio, tied)
            assert got.dtype == bool and got.shape == (m, n)


def test_sam_fraction_in_expected_range():
    scores = np.random.RandomState(1).rand(3, 3000)
    share = sam_masks(scores, 0.5, rule="share").mean(axis=1)
    boost = sam_masks(scores, 0.5, rule="boost").mean(axis=1)
    # Independent random scores: P(in U_-i) = 3/4, leftovers = 1/8 of the data.
    assert np.all((share > 0.67) & (share < 0.9))
    assert np.all(np.abs(boost - (0.75 + 0.125 * 2 / 3)) < 0.03)


def test_split_validation():
    scores = np.random.rand(3, 10)
    with pytest.raises(UserError):
        sam_masks(scores, 1.5)
    with pytest.raises(UserError):
        sam_masks(scores, 0.5, rule="other")
    with pytest.raises(UserError):
        selected_sets(scores, 0.5, select="middle")
    with pytest.raises(ValueError):
        selected_sets(np.full((3, 10), np.nan), 0.5)
    with pytest.raises(ValueError):
        selected_sets(np.random.rand(10), 0.5)
    assert resolve_split_rule("auto", "CIFAR10") == "boost"
    assert resolve_split_rule("auto", "tiny_imgnet") == "share"
    assert resolve_split_rule("share", "cifar10") == "share"
    with pytest.raises(UserError):
        resolve_split_rule("nope", "cifar10")


# --------------------------------------------------------------------------- random / same

def test_random_masks_sizes_and_reproducibility():
    n, ratio, seeds = 101, 0.3, [13, 17, 27]
    masks = random_sam_masks(n, ratio, seeds)
    num_normal = math.floor((1 - ratio) * n)
    assert masks.shape == (3, n) and masks.dtype == bool
    assert np.all((~masks).sum(axis=1) == num_normal)
    assert not np.array_equal(masks[0], masks[1])
    # Member i depends only on its own seed.
    assert np.array_equal(random_sam_masks(n, ratio, [17])[0], masks[1])
    expected_normal = np.random.RandomState(27).choice(np.arange(n), num_normal, replace=False)
    assert as_set(~masks[2]) == set(expected_normal.tolist())


def test_same_masks_identical_across_members():
    n, ratio = 64, 0.5
    masks = random_sam_masks(n, ratio, [13, 17, 27], same=True)
    assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[1], masks[2])
    expected_normal = np.random.RandomState(0).choice(np.arange(n), n // 2, replace=False)
    assert as_set(~masks[0]) == set(expected_normal.tolist())
    built = build_sam_masks(np.zeros((3, n)), ratio, train_subset="same")
    assert np.array_equal(built, masks)
    built = build_sam_masks(np.zeros((3, n)), ratio, train_subset="random", seeds=[13, 17, 27])
    assert np.array_equal(built, random_sam_masks(n, ratio, [13, 17, 27]))
    with pytest.raises(ValueError):
        build_sam_masks(np.zeros((3, n)), ratio, train_subset="random", seeds=[1])


# --------------------------------------------------------------------------- squared gradient norms

class IndexedDataset(torch.utils.data.Dataset):
    def __init__(self, images, targets):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index], index


def small_bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))


def bn_net_with_statistics(images):
    torch.manual_seed(0)
    model = small_bn_net()
    model.train()
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        for _ in range(3):
            model(images[:8] * 2 + 0.5)
    return model


def reference_scores(model, images, targets):
    """Per sample in natural order, by plain autograd, in eval mode."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    scores = []
    for k in range(len(targets)):
        loss = nn.functional.cross_entropy(model(images[k:k + 1]), targets[k:k + 1])
        scores.append(sum(float(g.pow(2).sum()) for g in torch.autograd.grad(loss, params)))
    return torch.tensor(scores)


@pytest.mark.parametrize("train_mode_at_entry", [True, False])
def test_squared_grad_norms_match_the_loop(train_mode_at_entry):
    torch.manual_seed(1)
    images, targets = torch.randn(23, 3, 6, 6), torch.randint(0, 5, (23,))
    model = bn_net_with_statistics(images)
    expected = reference_scores(model, images, targets)
    generator = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(IndexedDataset(images, targets), batch_size=8, shuffle=True,
                                         generator=generator)
    assert next(iter(loader))[2].tolist() != list(range(8))  # the index order really is shuffled

    model.train(train_mode_at_entry)
    scores = squared_grad_norms(model, loader, "cpu", chunk_size=3)
    assert model.training == train_mode_at_entry
    assert scores.dtype == torch.float32 and scores.shape == (23,) and scores.device.type == "cpu"
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=0)

    looped = loop_squared_grad_norms(model, loader)
    assert model.training == train_mode_at_entry
    torch.testing.assert_close(looped, expected.float(), rtol=1e-4, atol=0)


def test_squared_grad_norms_skip_frozen_parameters_and_check_coverage():
    torch.manual_seed(2)
    images, targets = torch.randn(10, 3, 6, 6), torch.randint(0, 5, (10,))
    model = bn_net_with_statistics(images)
    model[0].weight.requires_grad_(False)
    loader = torch.utils.data.DataLoader(IndexedDataset(images, targets), batch_size=4)
    expected = reference_scores(model, images, targets)
    torch.testing.assert_close(squared_grad_norms(model, loader, "cpu"), expected.float(),
                               rtol=1e-4, atol=0)
    partial = torch.utils.data.DataLoader(torch.utils.data.Subset(IndexedDataset(images, targets),
                                                                  range(6)), batch_size=4)
    with pytest.raises(ValueError):
        squared_grad_norms(model, partial, "cpu", num_samples=10)


# --------------------------------------------------------------------------- backends (func, hooks)

def loader_over(images, targets, batch_size=8, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(IndexedDataset(images, targets), batch_size=batch_size, shuffle=True,
                                       generator=generator)


def with_running_statistics(model, images):
    model.train()
    with torch.no_grad():  # running statistics far from (0, 1), so eval mode is really exercised
        for _ in range(3):
            model(images[:8] * 2 + 0.5)
    return model


@pytest.mark.parametrize("backend", ["func", "hooks", "auto"])
def test_backends_match_loop_on_bn_net(backend):
    torch.manual_seed(1)
    images, targets = torch.randn(23, 3, 6, 6), torch.randint(0, 5, (23,))
    model = bn_net_with_statistics(images)
    expected = reference_scores(model, images, targets)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback may happen on a plain conv/bn/linear net
        scores = squared_grad_norms(model, loader_over(images, targets), "cpu", chunk_size=3, backend=backend)
    assert model.training
    assert scores.dtype == torch.float32 and scores.shape == (23,)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=0)


class Residual(nn.Module):
    """In-place ops after hooked layers, as torchvision's ResNet has them."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return self.relu(out)


class TokenHead(nn.Module):
    """A Linear over positions (B, T, F), a LayerNorm (not hooked: func scores it) and a module
    called twice (its per-sample gradient is the sum over both calls)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.mix = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)
        self.twice = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, classes)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)             # (B, T, C)
        tokens = self.norm(torch.tanh(self.mix(tokens)))
        pooled = tokens.mean(dim=1)
        pooled = torch.tanh(self.twice(torch.tanh(self.twice(pooled))))
        return self.out(pooled)


def mixed_net():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=True),          # many positions: materialised
        nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        Residual(6),
        nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2),  # grouped, strided, dilated
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),        # few positions, wide: Gram form
        TokenHead(16, 5))


def test_hooks_exact_on_layers_of_every_kind():
    torch.manual_seed(5)
    images, targets = torch.randn(13, 3, 6, 6), torch.randint(0, 5, (13,))
    model = with_running_statistics(mixed_net(), images)
    model[3].bn.weight.requires_grad_(False)  # a frozen weight next to trainable ones
    model[4].bias.requires_grad_(False)       # a frozen bias
    expected = reference_scores(model, images, targets)
    for backend in ("hooks", "func"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scores = squared_grad_norms(model, loader_over(images, targets, batch_size=5), "cpu",
                                          chunk_size=4, backend=backend)
        torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=0)


def test_gram_and_materialised_forms_agree():
    from training.scores import _layer_grads, _layer_squared_norm, _use_gram
    torch.manual_seed(6)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x, g = torch.randn(4, 32, 2, 2), torch.randn(4, 32, 2, 2)
    assert _use_gram(4, 32 * 9, 32)                   # this layer takes the Gram path ...
    direct = sum(t.pow(2).flatten(1).sum(1) for t in _layer_grads("conv2d", conv, x, g))
    torch.testing.assert_close(_layer_squared_norm("conv2d", conv, x, g), direct, rtol=1e-5, atol=0)
    # ... and both equal autograd, one sample at a time.
    for b in range(4):
        weight_grad, bias_grad = torch.autograd.grad(conv(x[b:b + 1]), (conv.weight, conv.bias), g[b:b + 1])
        torch.testing.assert_close(direct[b], weight_grad.pow(2).sum() + bias_grad.pow(2).sum(), rtol=1e-5, atol=0)
    # Linear: flat features (Gram with one position), few wide positions (Gram), many narrow
    # positions (materialised).
    for shape_in, shape_out, gram in [((5, 7), (5, 3), True), ((3, 2, 30), (3, 2, 30), True),
                                      ((3, 40, 4), (3, 40, 2), False)]:
        linear = nn.Linear(shape_in[-1], shape_out[-1])
        x, g = torch.randn(shape_in), torch.randn(shape_out)
        positions = x[0].numel() // x.shape[-1]
        assert _use_gram(positions, x.shape[-1], g.shape[-1]) == gram
        expected = torch.stack([sum(t.pow(2).sum() for t in torch.autograd.grad(
            linear(x[b:b + 1]), (linear.weight, linear.bias), g[b:b + 1])) for b in range(x.shape[0])])
        torch.testing.assert_close(_layer_squared_norm("linear", linear, x, g), expected, rtol=1e-5, atol=0)
        direct = sum(t.pow(2).flatten(1).sum(1) for t in _layer_grads("linear", linear, x, g))
        torch.testing.assert_close(direct, expected, rtol=1e-5, atol=0)


def test_hooks_on_resnet18_match_loop():
    from models import create_model
    torch.manual_seed(7)
    images, targets = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    model = with_running_statistics(create_model("resnet18", 10, width=4), images)
    expected = reference_scores(model, images, targets)
    for backend in ("hooks", "func"):
        scores = squared_grad_norms(model, loader_over(images, targets, batch_size=4), "cpu", backend=backend)
        torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=0)


class SharedWeights(nn.Module):
    """``tied`` reuses ``first``'s weight: neither layer can be scored by hooks alone."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(12, 12)
        self.tied = nn.Linear(12, 12)
        self.tied.weight = self.first.weight
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = x.flatten(1)[:, :12]
        return self.head(torch.tanh(self.tied(torch.tanh(self.first(x)))))


class WeightUsedOutsideForward(nn.Module):
    """Uses ``fc.weight`` directly as well as through ``fc``: only the run-time check can tell."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = x.flatten(1)[:, :12]
        return self.fc(x) + 0.5 * F.linear(torch.tanh(x), self.fc.weight)


def test_hooks_fall_back_where_they_cannot_be_exact():
    torch.manual_seed(8)
    images, targets = torch.randn(9, 3, 6, 6), torch.randint(0, 5, (9,))
    # Tied weights: routed to func statically, no warning.
    model = SharedWeights()
    expected = reference_scores(model, images, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=0)

    # A weight used outside its layer: hooks would be wrong; auto notices, warns and uses func.
    model = WeightUsedOutsideForward()
    expected = reference_scores(model, images, targets)
    with pytest.warns(UserWarning, match="falling back"):
        scores = squared_grad_norms(model, loader_over(images, targets), "cpu", backend="auto")
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=0)
    with pytest.raises(RuntimeError, match="hooks backend"):
        squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")

    # BatchNorm without running statistics couples the samples of a batch even in eval mode.
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 5))
    expected = reference_scores(model, images, targets)
    torch.testing.assert_close(squared_grad_norms(model, loader_over(images, targets), "cpu"),
                               expected.float(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="batch statistics"):
        squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")


def test_backend_validation_and_positional_signature():
    torch.manual_seed(10)
    images, targets = torch.randn(5, 3, 6, 6), torch.randint(0, 5, (5,))
    model = bn_net_with_statistics(images)
    loader = loader_over(images, targets)
    with pytest.raises(ValueError, match="backend"):
        squared_grad_norms(model, loader, "cpu", backend="jax")
    # The call training/trainer.py makes (positional device, chunk_size/progress/num_samples keywords).
    scores = squared_grad_norms(model, loader, "cpu", chunk_size=2, progress=False, num_samples=5)
    torch.testing.assert_close(scores, reference_scores(model, images, targets).float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (4, 3, 2, 5)])
def test_batchnorm_per_sample_gradients_in_eval_mode(shape):
    from training.scores import _layer_grads, _layer_squared_norm
    torch.manual_seed(11)
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.2, 3.0)
    bn.eval()
    x, g = torch.randn(shape) * 2, torch.randn(shape)
    weight_grads, bias_grads = _layer_grads("batchnorm", bn, x, g)
    for b in range(shape[0]):
        expected_w, expected_b = torch.autograd.grad(bn(x[b:b + 1]), (bn.weight, bn.bias), g[b:b + 1])
        torch.testing.assert_close(weight_grads[b], expected_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias_grads[b], expected_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_layer_squared_norm("batchnorm", bn, x, g),
                               weight_grads.pow(2).sum(1) + bias_grads.pow(2).sum(1), rtol=1e-5, atol=0)
