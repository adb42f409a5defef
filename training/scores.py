"""The per-sample squared gradient norm s(x) = ‖∇_θ CE(f_θ(x), y)‖²₂, in one implementation.

It is SharpBalance's per-sample score (README: "What SharpBalance does", step 2: every training sample,
every member, before the partition) and, averaged over fixed batches, the ``fisher`` measurement of
measure_sharpness.py (the mean is the trace of the empirical Fisher, hence the mode's name). The norm
is over all trainable parameters, in eval mode (BatchNorm on running statistics, so a sample's
gradient does not depend on the other samples of its batch). ``squared_grad_norms`` computes it for
every sample a loader yields, with one of two exact backends:

``func``  torch.func: vmap over grad of one sample's loss; each per-sample gradient is reduced
          to its squared norm inside the vmapped function. Works for any model torch.func can
          trace. Its cost is dominated by the batching rule of the convolution weight gradient.
``hooks`` one ordinary forward and backward pass over the chunk. Forward hooks keep each
          layer's input, tensor hooks its output gradient; from those two the per-sample
          gradient of the layer's weight and bias follows in closed form:
            Linear / Conv2d: weight grad of sample b = Σ_p g_bp a_bpᵀ over output positions p
              (a = the input patch seen at p). Its squared norm comes either from the
              materialised per-sample gradient (convolutions: one weight-gradient convolution
              with a group per sample; Linear: one bmm) or, when the layer has few positions,
              from Gram matrices: ‖Σ_p g_p a_pᵀ‖² = Σ_pq (g_p·g_q)(a_p·a_q) (unfold for
              convolutions; a Linear on flat features gives ‖g‖²·‖a‖²). Bias grad = Σ_p g_bp.
            BatchNorm (eval): weight grad = Σ_p g_bp · x̂_bp with x̂ normalised by the running
              statistics, bias grad = Σ_p g_bp, per channel.
          Parameters of any other layer (or shared between layers) are scored by ``func`` on the
          same chunk, restricted to those parameters; squared norms add over parameters.
``auto``  ``hooks`` when the model allows it, checked once against a plain backward pass on
          the first sample; otherwise, or if that check fails, ``func``.
"""
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from training.accel import plain_copy
from utils.progress import progress_bar

SCORE_BACKENDS = ("auto", "func", "hooks")  # --score_backend


def _split_parameters(model, names=None):
    """(trainable, frozen, buffers) as name -> detached tensor; ``names`` narrows "trainable"."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        wanted = p.requires_grad and (names is None or name in names)
        (trainable if wanted else frozen)[name] = p.detach()
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return trainable, frozen, buffers


def _rowwise_squared_norm(t):
    """(B, ...) -> (B,) float32 sum of squares of each row."""
    return torch.linalg.vector_norm(t.float().reshape(t.shape[0], -1), dim=1).square()


class _FuncNorms:
    """Squared gradient norms of a batch's samples by ``vmap(grad(...))`` (optionally over some parameters)."""

    def __init__(self, model, names=None):
        params, frozen, buffers = _split_parameters(model, names)
        self.params = params

        def sample_loss(trainable, image, target):
            logits = functional_call(model, (trainable, frozen, buffers), (image.unsqueeze(0),))
            return F.cross_entropy(logits, target.unsqueeze(0))

        def sample_squared_norm(trainable, image, target):
            # Reduced here, inside vmap: what leaves the transform is one number per sample. A sum
            # of squares per parameter, added in parameter order.
            total = torch.zeros((), dtype=torch.float32, device=image.device)
            for g in grad(sample_loss)(trainable, image, target).values():
                total = total + g.float().reshape(-1).pow(2).sum()
            return total

        # Built once; every chunk reuses the same transformed function.
        self._batched = vmap(sample_squared_norm, in_dims=(None, 0, 0))

    def __call__(self, images, targets):
        if not self.params:
            return torch.zeros(targets.shape[0], dtype=torch.float32, device=images.device)
        with torch.no_grad():  # torch.func.grad still differentiates; nothing else needs a graph
            return self._batched(self.params, images, targets)


class _HookUnsupported(Exception):
    """The hooks backend cannot score this model exactly (the reason is the message)."""


def _hook_kind(module):
    """'conv2d', 'linear', 'batchnorm' for layers with a closed-form per-sample gradient, else None.

    Only the stock ``forward`` qualifies: a subclass that changes how the weight is used does not.
    """
    forward = type(module).forward
    if forward is nn.Conv2d.forward:
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return "conv2d"
        return None
    if forward is nn.Linear.forward:
        return "linear"
    if forward is _BatchNorm.forward and module.affine:
        return "batchnorm"
    return None


def _use_gram(positions, inputs, outputs):
    """Whether the Gram form beats materialising the (outputs × inputs) per-sample weight gradient.

    Gram: positions²·(inputs + outputs) multiply-adds per sample, materialised:
    positions·inputs·outputs. The factor 2 favours the Gram form because the materialised path
    (a convolution with one group per sample) runs well below peak once positions are few.
    """
    return positions * (inputs + outputs) < 2 * inputs * outputs


def _conv_weight_grads(module, x, g):
    """Per-sample Conv2d weight gradients (B, *weight.shape): one convolution, a group per sample."""
    batch = x.shape[0]
    out_channels = module.weight.shape[0]
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]), (batch * out_channels,) + tuple(module.weight.shape[1:]),
        g.reshape(1, -1, *g.shape[2:]), stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=batch * module.groups)
    return grads.reshape(batch, *module.weight.shape)


def _linear_patches(x, g):
    """Linear inputs and output gradients as (B, in, P) and (B, out, P); P = positions per sample
    (every leading dimension after the batch shares the weight; P = 1 for flat features)."""
    batch = x.shape[0]
    return (x.reshape(batch, -1, x.shape[-1]).transpose(1, 2),
            g.reshape(batch, -1, g.shape[-1]).transpose(1, 2))


def _gram_squared_norm(a, g):
    """‖Σ_p g_p a_pᵀ‖² per sample from (B, K, P) inputs and (B, C, P) output gradients."""
    if a.shape[2] == 1:
        return _rowwise_squared_norm(a) * _rowwise_squared_norm(g)
    return (torch.bmm(g.transpose(1, 2), g) * torch.bmm(a.transpose(1, 2), a)).sum(dim=(1, 2))


def _batchnorm_grads(module, x, g):
    """Per-sample (B, C) gradients of a BatchNorm's weight and bias, eval mode."""
    batch, channels = x.shape[0], x.shape[1]
    shape = (1, channels) + (1,) * (x.dim() - 2)
    normalised = (x - module.running_mean.float().view(shape)) * torch.rsqrt(
        module.running_var.float().view(shape) + module.eps)
    weight = (g * normalised).reshape(batch, channels, -1).sum(dim=2)
    bias = g.reshape(batch, channels, -1).sum(dim=2)
    return weight, bias


def _check_batched(kind, x):
    if kind == "conv2d" and x.dim() != 4:
        raise _HookUnsupported("Conv2d called without a batch dimension")
    if kind == "linear" and x.dim() < 2:
        raise _HookUnsupported("Linear called without a batch dimension")


def _layer_grads(kind, module, x, g):
    """Per-sample gradients (B, ...) of the layer's trainable weight and bias, for one call."""
    _check_batched(kind, x)
    want_weight = module.weight.requires_grad
    want_bias = module.bias is not None and module.bias.requires_grad
    if kind == "batchnorm":
        weight, bias = _batchnorm_grads(module, x, g)
    elif kind == "conv2d":
        weight = _conv_weight_grads(module, x, g) if want_weight else None
        bias = g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2) if want_bias else None
    else:
        a, g = _linear_patches(x, g)
        weight = torch.bmm(g, a.transpose(1, 2)) if want_weight else None
        bias = g.sum(dim=2) if want_bias else None
    return [t for t, wanted in ((weight, want_weight), (bias, want_bias)) if wanted]


def _layer_squared_norm(kind, module, x, g):
    """(B,) squared norm of the layer's per-sample gradient, for a layer called once."""
    _check_batched(kind, x)
    if kind == "batchnorm":
        return sum(_rowwise_squared_norm(t) for t in _layer_grads(kind, module, x, g))
    total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    if module.bias is not None and module.bias.requires_grad:
        total += _rowwise_squared_norm(g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2) if kind == "conv2d"
                                       else _linear_patches(x, g)[1].sum(dim=2))
    if not module.weight.requires_grad:
        return total
    if kind == "conv2d":
        positions = g[0, 0].numel()
        inputs, outputs = module.weight[0].numel(), module.weight.shape[0]
        if module.groups == 1 and _use_gram(positions, inputs, outputs):
            a = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                         stride=module.stride)
            total += _gram_squared_norm(a, g.reshape(g.shape[0], outputs, -1))
        else:
            total += _rowwise_squared_norm(_conv_weight_grads(module, x, g))
    else:
        a, g = _linear_patches(x, g)
        if _use_gram(a.shape[2], a.shape[1], g.shape[1]):
            total += _gram_squared_norm(a, g)
        else:
            total += _rowwise_squared_norm(torch.bmm(g, a.transpose(1, 2)))
    return total


class _HookNorms:
    """Squared gradient norms of a batch's samples from one batched forward/backward pass and layer hooks."""

    def __init__(self, model):
        self.model = model
        for module in model.modules():
            if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None
                                                   or module.running_var is None):
                raise _HookUnsupported(
                    f"{type(module).__name__} normalises with batch statistics in eval mode, so the "
                    "samples of a batch are not independent")
        holders = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                holders[id(p)] = holders.get(id(p), 0) + 1
        self.layers, hooked = {}, set()
        for module_name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not any(p.requires_grad for p in own.values()):
                continue
            kind = _hook_kind(module)
            if kind is None or set(own) - {"weight", "bias"} or any(holders[id(p)] > 1 for p in own.values()):
                continue  # left to the func backend
            self.layers[module] = kind
            hooked.update(f"{module_name}.{name}" if module_name else name for name in own)
        rest = {name for name, p in model.named_parameters() if p.requires_grad and name not in hooked}
        self.rest = _FuncNorms(model, rest) if rest else None
        if not self.layers and self.rest is None:
            self.rest = _FuncNorms(model)  # nothing trainable: zeros either way

    def __call__(self, images, targets):
        batch = targets.shape[0]
        calls = {module: [] for module in self.layers}
        totals = {}
        accumulated = {}

        def on_gradient(module, call):
            def hook(g):
                kind, x = self.layers[module], call.pop("x")
                g = g.detach().float()
                if len(calls[module]) == 1:
                    totals[module] = _layer_squared_norm(kind, module, x, g)
                else:  # a layer used several times: its per-sample gradient is the sum over calls
                    parts = _layer_grads(kind, module, x, g)
                    previous = accumulated.get(module)
                    accumulated[module] = parts if previous is None else [p + q for p, q in zip(previous, parts)]
                call["done"] = True
            return hook

        def on_forward(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor) \
                    or not output.requires_grad:
                raise _HookUnsupported(f"cannot follow the inputs/outputs of {type(module).__name__}")
            call = {"x": inputs[0].detach().float()}
            calls[module].append(call)
            output.register_hook(on_gradient(module, call))

        if not images.is_floating_point():
            raise _HookUnsupported("the backward pass starts from the inputs, which are not floating point")
        handles = [module.register_forward_hook(on_forward) for module in self.layers]
        try:
            with torch.enable_grad():
                x = images.detach().requires_grad_(True)
                logits = self.model(x)
                # A sum, not a mean: each sample's output gradient is then that of its own loss.
                loss = F.cross_entropy(logits.float(), targets, reduction="sum")
                torch.autograd.grad(loss, x, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()

        total = torch.zeros(batch, dtype=torch.float32, device=images.device)
        for module, module_calls in calls.items():
            if not module_calls or not all(call.get("done") for call in module_calls):
                raise _HookUnsupported(f"no gradient reached a {type(module).__name__} through the "
                                       "layer's own forward (its parameters are used elsewhere?)")
            if module in totals:
                total += totals[module]
            else:
                total += sum(_rowwise_squared_norm(t) for t in accumulated[module])
        if self.rest is not None:
            total += self.rest(images, targets)
        return total


def _loop_squared_norms(model, images, targets):
    """(B,) float32 by one plain forward and backward per sample (what the hooks are checked against)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.zeros(targets.shape[0], dtype=torch.float32)
    with torch.enable_grad():
        for k in range(targets.shape[0]):
            loss = F.cross_entropy(model(images[k:k + 1]), targets[k:k + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out[k] = float(sum(g.float().pow(2).sum() for g in grads if g is not None))
    return out


# How closely the hooks must agree with a plain backward pass on one sample (``_check_hooks``). In
# fp32 the two differ by the order of additions only. With TF32 (torch's default for cuDNN
# convolutions on Ampere and later GPUs, as in the authors' runs) every convolution rounds its inputs
# to 10 mantissa bits (2^-11 ≈ 4.9e-4 relative), in different kernels for the two computations and
# through every layer of the backward pass: 1.2e-3 was seen on trained ResNet18 weights, so the
# check allows 2e-2 there. A hooks error the check exists for (a weight also used outside its
# layer) is of the order of the gradient itself.
FP32_RTOL, TF32_RTOL = 1e-3, 2e-2
IN_CHUNK_RTOL = 5e-2


def tf32_in_effect(device):
    """Whether convolutions or matmuls on ``device`` may round their inputs to TF32."""
    return torch.device(device).type == "cuda" and bool(torch.backends.cudnn.allow_tf32
                                                        or torch.backends.cuda.matmul.allow_tf32)


def _check_hooks(norms, model, images, targets, squared_norm):
    """Raise ``_HookUnsupported`` unless the hooks agree with plain autograd on the first sample.

    Guards the assumptions no static check covers: every parameter is used only through its own
    layer's forward, and samples do not interact in eval mode. The first sample alone, by hooks and
    by one plain backward pass, must agree to float rounding (``FP32_RTOL``, or ``TF32_RTOL`` where
    TF32 is in effect); its score inside the chunk must agree with that loosely (batched and
    single-sample kernels round differently, and a ReLU input that rounds to the other side of
    zero changes a gradient by more than rounding).
    """
    rtol = TF32_RTOL if tf32_in_effect(images.device) else FP32_RTOL
    alone = norms(images[:1], targets[:1]).float().cpu()
    reference = _loop_squared_norms(model, images[:1], targets[:1])
    in_chunk = squared_norm[:1].float().cpu()
    if not torch.allclose(alone, reference, rtol=rtol, atol=1e-12):
        raise _HookUnsupported(f"hooks gave {float(alone[0]):.6g}, a plain backward pass "
                               f"{float(reference[0]):.6g} for the same sample (relative tolerance {rtol:g})")
    if not torch.allclose(in_chunk, reference, rtol=max(IN_CHUNK_RTOL, rtol), atol=1e-12):
        raise _HookUnsupported(f"a sample scored {float(in_chunk[0]):.6g} in its batch but "
                               f"{float(reference[0]):.6g} alone: samples interact in eval mode")


def _needs_plain_copy(model):
    """Whether the fast path changed ``model`` (a fast forward, or channels_last weights)."""
    return "forward" in model.__dict__ or any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())


def squared_grad_norms(model, loader, device, chunk_size=64, progress=False, num_samples=None, backend="func",
                       print_freq=1, desc="squared gradient norms", fallback=None):
    """‖∇_θ CE(f_θ(x), y)‖² of every sample of ``loader``, as float32 (N,) on the CPU.

    ``loader`` yields ``(images, targets, indices)``; ``indices`` are positions in the dataset (the
    training split, for the partition) and say where each norm is written (N = ``len(loader.dataset)``
    unless ``num_samples``; every position must be yielded). The model is put in eval mode, so BatchNorm uses its running
    statistics and a sample's gradient does not depend on the other samples of its batch; its
    previous mode is restored afterwards. Samples are taken ``chunk_size`` at a time, so memory
    stays at one chunk of per-sample gradients. ``backend``: ``func``, ``hooks`` or ``auto`` (module
    docstring); all three give the same numbers up to float rounding. A model prepared by the fast
    path (``training.accel``) is scored as a copy with the plain fp32 eager forward in the default
    memory format (``accel.plain_copy``), so the partition does not depend on ``--amp``,
    ``--compile`` or ``--channels_last``. The norms stay on the device until one copy at the end.
    ``progress`` shows a bar (``desc``) redrawn every ``print_freq`` batches.

    Where the hooks cannot score the model exactly (a static reason, or the check on the first
    chunk): with ``fallback=None``, ``hooks`` raises and ``auto`` warns (UserWarning) and uses
    ``func``; with a callable ``fallback``, both call it with one line saying why and use ``func``
    (the trainer: the partition never stops on it).
    """
    return _squared_grad_norms(model, loader, device, chunk_size, progress, num_samples, backend, print_freq, desc,
                               fallback)[0]


def check_score_backend(model, loader, device, backend="auto", chunk_size=64):
    """Score the first chunk of ``loader`` as the partition will; returns ``(backend, reason)``.

    ``backend`` is what scores the partition: ``hooks`` where they are exact on this model (checked
    against a plain backward pass, as ``squared_grad_norms`` does), else ``func``; ``reason`` says
    why the hooks were not taken (None when they were, or when ``func`` was asked for). Cheap (one
    chunk), so the trainer runs it before the first epoch: a model the chosen backend cannot score,
    or a chunk that does not fit in memory, shows before any training, not at the partition.
    """
    images, targets, _ = next(iter(loader))
    count = min(chunk_size, targets.shape[0])
    one_chunk = [(images[:count], targets[:count], torch.arange(count))]
    reasons = []
    used = _squared_grad_norms(model, one_chunk, device, chunk_size, False, count, backend, 1, "", reasons.append)[1]
    return used, (reasons[0] if reasons else None)


def _squared_grad_norms(model, loader, device, chunk_size, progress, num_samples, backend, print_freq, desc, fallback):
    """``squared_grad_norms`` and the backend that computed them ("hooks" or "func")."""
    if _needs_plain_copy(model):
        return _squared_grad_norms(plain_copy(model), loader, device, chunk_size, progress, num_samples, backend,
                                   print_freq, desc, fallback)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if backend not in SCORE_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SCORE_BACKENDS)}, got '{backend}'")

    def hooks_unusable(error, checked_on_data):
        if fallback is not None:
            where = " (checked on the first chunk)" if checked_on_data else ""
            fallback(f"the hooks backend cannot score this model{where}: {error}; scoring with torch.func")
        elif backend == "hooks":
            raise (RuntimeError if checked_on_data else ValueError)(
                f"the hooks backend cannot score this model: {error}") from None
        else:
            warnings.warn(f"squared gradient norms: falling back to torch.func ({error})")

    was_training = model.training
    model.eval()
    try:
        norms, checked, used = None, True, "func"
        if backend in ("auto", "hooks"):
            try:
                norms, checked, used = _HookNorms(model), False, "hooks"
            except _HookUnsupported as error:
                if backend == "hooks":
                    hooks_unusable(error, False)
        if norms is None:
            norms = _FuncNorms(model)
        n = len(loader.dataset) if num_samples is None else num_samples
        # The norms stay on the device, in loader order, and come back in one copy at the end; the
        # positions they belong to are known on the host (the loader's indices).
        parts, positions = [], []
        for images, targets, indices in progress_bar(loader, desc, every=print_freq, enabled=progress):
            images, targets = images.to(device), targets.to(device)
            for start in range(0, targets.shape[0], chunk_size):
                chunk_images = images[start:start + chunk_size]
                chunk_targets = targets[start:start + chunk_size]
                try:
                    squared_norm = norms(chunk_images, chunk_targets)
                    if not checked:
                        _check_hooks(norms, model, chunk_images, chunk_targets, squared_norm)
                        checked = True
                except _HookUnsupported as error:
                    hooks_unusable(error, True)
                    norms, checked, used = _FuncNorms(model), True, "func"
                    squared_norm = norms(chunk_images, chunk_targets)
                parts.append(squared_norm.float())
                positions.append(np.asarray(indices[start:start + chunk_size], dtype=np.int64).reshape(-1))
    finally:
        model.train(was_training)
    return _assemble(parts, positions, n), used


def _assemble(parts, positions, n):
    """(N,) float32 CPU norms from per-chunk device norms and their host-side positions."""
    positions = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    covered = np.zeros(n, dtype=bool)
    covered[positions] = True
    if not covered.all():
        raise ValueError(f"the loader did not yield {int((~covered).sum())} of {n} sample indices; "
                         "squared_grad_norms needs every sample exactly once")
    norms = torch.zeros(n, dtype=torch.float32)
    if parts:
        norms[torch.from_numpy(positions)] = torch.cat(parts).to("cpu", copy=True)  # the pass's one read
    return norms
