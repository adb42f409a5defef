"""The per-sample squared gradient norms (training/scores.py), SharpBalance's scores and the fisher
sharpness: both backends (torch.func's vmap and the hooks) against one plain backward pass per
sample, layer by layer and on whole networks; the hooks' fallbacks; the backend check the trainer
runs before the first epoch (``check_score_backend``); scores of a fast-path model; one host read
per scoring pass. (How the trainer acts on the check is in tests/test_trainer.py.)"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import training.scores
from data.arrays import BatchLoader
from models import create_model
from tests.fixtures import random_image_dataset, resnet_sam_member
from tests.host_reads import count_host_reads
from tests.references import loop_squared_grad_norms
from training.accel import FastPath
from training.scores import FP32_RTOL, TF32_RTOL, check_score_backend, squared_grad_norms, tf32_in_effect


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
def test_backends_match_the_loop_on_a_batchnorm_net(backend):
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


def test_hooks_are_exact_on_layers_of_every_kind():
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


def test_hooks_on_resnet18_match_the_loop():
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


def test_an_unknown_backend_is_refused_and_the_trainers_call_works():
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
def test_batchnorm_per_sample_gradients_in_eval_mode_match_autograd(shape):
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


# --------------------------------------------------------------------------- the backend check before training

@pytest.fixture(scope="module")
def batch():
    """(images, targets): 9 random 8x8 samples over 5 classes."""
    torch.manual_seed(8)
    return torch.randn(9, 3, 8, 8), torch.randint(0, 5, (9,))


def resnet(images):
    """ResNet18 of width 4 over 5 classes with running statistics away from (0, 1)."""
    torch.manual_seed(1)
    return with_running_statistics(create_model("resnet18", 5, width=4), images)


def test_check_chooses_the_backend_and_says_why(batch):
    images, targets = batch
    model = resnet(images)
    for backend, expected in (("hooks", "hooks"), ("auto", "hooks"), ("func", "func")):
        chosen = check_score_backend(model, loader_over(images, targets), "cpu", backend, chunk_size=4)
        assert chosen == (expected, None)
    wrong = WeightUsedOutsideForward()  # hooks would be wrong: only the check on data can tell
    for backend in ("hooks", "auto"):
        chosen, reason = check_score_backend(wrong, loader_over(images, targets), "cpu", backend)
        assert chosen == "func" and reason.startswith("the hooks backend cannot score this model (checked on the "
                                                      "first chunk): hooks gave ")
    # BatchNorm on batch statistics in eval mode: hooks refused without data; asked for, one reason.
    coupled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                            nn.Flatten(), nn.Linear(144, 5))
    chosen, reason = check_score_backend(coupled, loader_over(images, targets), "cpu", "hooks")
    assert chosen == "func" and "batch statistics" in reason
    assert check_score_backend(coupled, loader_over(images, targets), "cpu", "auto") == ("func", None)


def test_a_fallback_line_replaces_the_error(batch):
    images, targets = batch
    model = WeightUsedOutsideForward()
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks", fallback=lines.append)
    torch.testing.assert_close(scores, reference_scores(model, images, targets).float(), rtol=1e-4, atol=0)
    assert len(lines) == 1 and "hooks gave" in lines[0] and lines[0].endswith("; scoring with torch.func")
    with pytest.raises(RuntimeError, match="hooks backend"):  # without a fallback, as before
        squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")


def test_the_check_tolerance_follows_tf32(batch, monkeypatch):
    """A disagreement of 5e-3 (what TF32 rounding can give) fails the fp32 tolerance, passes TF32's."""
    images, targets = batch
    model = resnet(images)
    assert FP32_RTOL < 5e-3 < TF32_RTOL and not tf32_in_effect(torch.device("cpu"))
    real_loop = training.scores._loop_squared_norms
    monkeypatch.setattr(training.scores, "_loop_squared_norms", lambda *a: real_loop(*a) * (1 + 5e-3))
    chosen, reason = check_score_backend(model, loader_over(images, targets), "cpu", "hooks")
    assert chosen == "func" and "(relative tolerance 0.001)" in reason
    monkeypatch.setattr(training.scores, "tf32_in_effect", lambda device: True)
    assert check_score_backend(model, loader_over(images, targets), "cpu", "hooks") == ("hooks", None)


def test_channels_last_weights_are_scored_on_a_contiguous_copy(batch):
    images, targets = batch
    model = resnet(images)
    expected = squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")
    # The layout alone (no channels_last convolution runs: the copy is contiguous).
    model.to(memory_format=torch.channels_last)
    weight = model.conv1.weight
    assert not weight.is_contiguous()
    assert torch.equal(squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks"), expected)
    assert model.conv1.weight is weight and not weight.is_contiguous()  # the model itself is left as it was


# --------------------------------------------------------------------------- models and the fast path

def test_per_sample_scores_cover_the_shortcut_scales():
    # The hooks backend has no closed form for the scale layer: it hands those parameters to
    # torch.func, so every backend still matches one backward pass per sample.
    torch.manual_seed(1)
    model = create_model("resnet18", 5, width=4, dataset="tiny_imgnet")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("shortcut.weight"):
                p.uniform_(0.5, 1.5)
    images, targets = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    loader = [(images, targets, torch.arange(6))]
    reference = loop_squared_grad_norms(model, loader, num_samples=6)
    for backend in ("hooks", "auto"):
        scores = squared_grad_norms(model, loader, torch.device("cpu"), chunk_size=4, num_samples=6,
                                    backend=backend)
        assert np.allclose(scores, reference, rtol=1e-4), backend


def test_scores_ignore_the_fast_path(digits):
    loader = BatchLoader(digits.train_eval, 64, "cpu", subset=np.arange(64))
    scores = []
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = FastPath(amp).prepare(create_model("resnet18", 10, width=4, dataset="digits"))
        scores.append(squared_grad_norms(model, loader, "cpu", num_samples=64)[:64])
        assert ("forward" in model.__dict__) == (amp == "bf16")  # restored after scoring
    assert torch.equal(scores[0], scores[1])


# --------------------------------------------------------------------------- host reads

@pytest.mark.parametrize("backend", ["func", "hooks"])
def test_scoring_reads_the_host_once_per_pass(backend):
    """1 and 2 batches of 8 read the same: one copy of the scores per pass (tests/host_reads.py)."""
    model, _ = resnet_sam_member()
    dataset = random_image_dataset(16, augment=False)
    counts = []
    for steps in (1, 2):
        data = BatchLoader(dataset, 8, "cpu", subset=np.arange(steps * 8))
        with count_host_reads() as reads:
            scores = squared_grad_norms(model, data, "cpu", chunk_size=4, backend=backend, num_samples=steps * 8)
        counts.append(dict(reads.counts))
        torch.testing.assert_close(scores, loop_squared_grad_norms(model, data, num_samples=steps * 8),
                                   rtol=1e-4, atol=0)
    # hooks: its one-time check of the first sample against a plain backward pass reads once more.
    one_copy = {"_to_copy[to host]": 1}
    expected = {**one_copy, "_local_scalar_dense": 1} if backend == "hooks" else one_copy
    assert counts == [expected, expected], counts
