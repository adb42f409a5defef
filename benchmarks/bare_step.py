"""The bare reference step for gpu_check: how fast this device trains the project's model when
nothing but the arithmetic is left.

The project's own step (training/) loads and augments each batch, splits it by the SAM mask, keeps
per-step sums on the device and goes through torch.optim; on a big GPU at batch 128 the host's
time to queue those kernels, not the GPU, sets the pace. The reference removes all of that: the
same model (``create_model("resnet18", ...)``), one static random batch already on the device, and
a step written with foreach operations,

    SGD  forward, cross-entropy, backward, then momentum SGD with coupled weight decay
         (buf = momentum * buf + (g + wd * p); p -= lr * buf, torch.optim.SGD's arithmetic);
    SAM  backward at θ; e = rho * g / ||g||2 (per-parameter norms, then their norm); θ kept; θ + e;
         gradients dropped; backward at θ + e; θ restored; the SGD update with the second gradient,

captured once in a CUDA graph and replayed, so that one replay is one launch. Several members are
several graphs replayed on their own CUDA streams, so the GPU can overlap them.

On a device without CUDA graphs (a CPU in the tests) ``graphed`` returns the step itself: the same
code runs eagerly, and gpu_check labels such rows as eager.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BareMember:
    """One member's model, static batch, momentum buffers and the two steps (``sgd``, ``sam``)."""

    def __init__(self, device, width=64, batch=128, classes=10, image_side=32, amp=None, channels_last=False,
                 seed=0, lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05):
        self.device = torch.device(device)
        self.amp_dtype = AMP_DTYPES[amp]
        self.lr, self.momentum, self.weight_decay, self.rho = lr, momentum, weight_decay, rho
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = create_model("resnet18", classes, width=width).to(self.device)
        images = torch.randn(batch, 3, image_side, image_side, generator=generator)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        self.images = images.to(self.device)
        self.labels = torch.randint(0, classes, (batch,), generator=generator).to(self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.momentum_buffers = [torch.zeros_like(p) for p in self.params]
        self.kept = [torch.empty_like(p) for p in self.params]  # θ while SAM is at θ + e

    def loss(self):
        # The autocast cache would hold bf16 copies of the weights made during capture: off.
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            logits = self.model(self.images)
        return F.cross_entropy(logits.float(), self.labels)

    def _gradients(self):
        for p in self.params:
            p.grad = None
        self.loss().backward()
        return [p.grad for p in self.params]

    def _update(self, grads):
        """torch.optim.SGD (momentum, dampening 0, coupled weight decay) on every parameter at once."""
        with torch.no_grad():
            steps = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
            torch._foreach_mul_(self.momentum_buffers, self.momentum)
            torch._foreach_add_(self.momentum_buffers, steps)
            torch._foreach_add_(self.params, self.momentum_buffers, alpha=-self.lr)

    def sgd(self):
        self._update(self._gradients())

    def sam(self):
        grads = self._gradients()
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            scale = self.rho / (norm + 1e-12)
            torch._foreach_copy_(self.kept, self.params)
            torch._foreach_add_(self.params, torch._foreach_mul(grads, scale))
        grads = self._gradients()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.kept)
        self._update(grads)


def graphed(step, device, warmup=3):
    """``(run, how)``: ``run()`` performs one ``step``. On CUDA, ``step`` runs ``warmup`` times on a
    side stream (cuDNN picks its algorithms, gradients get their memory), is captured once in a CUDA
    graph, and ``run`` replays it; elsewhere ``run`` is ``step`` itself."""
    device = torch.device(device)
    if device.type != "cuda":
        return step, "eager (no CUDA graph on this device)"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay, "CUDA graph"


def time_members(runs, device, warm=3, timed=40):
    """Seconds for ``timed`` rounds in which every ``run`` in ``runs`` (one per member) goes once,
    after ``warm`` untimed rounds. On CUDA with several members each member has its own stream,
    so their replays can overlap; on other devices they run one after another."""
    device = torch.device(device)
    streams = [torch.cuda.Stream(device) for _ in runs] if device.type == "cuda" and len(runs) > 1 else None

    def round_of_steps():
        if streams is None:
            for run in runs:
                run()
            return
        main = torch.cuda.current_stream(device)
        for run, stream in zip(runs, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                run()
        for stream in streams:
            main.wait_stream(stream)

    for _ in range(warm):
        round_of_steps()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        round_of_steps()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def training_flops_per_image(model, image_shape):
    """Floating-point operations to train on one image: 3 x (2 x the multiply-adds of every
    convolution and linear layer in one forward pass); the backward pass costs twice the forward
    (gradients of the inputs and of the weights). Element-wise layers are left out."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            macs.append(output.numel() * kernel)
        else:
            macs.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    parameter = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return 3 * 2 * sum(macs)
