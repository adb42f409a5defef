"""CUDA-graph training steps (``--cuda_graphs``): SGD, SAM and the mixed step replayed from graphs.

Why: at batch 128 an eager step of ResNet18 is launch-bound on a large GPU: the host takes longer
to queue the step's kernels one by one than the GPU takes to run them. A CUDA graph records the
step's kernels once and replays all of them with one launch.

What a capture needs, and how ``StepGraphs`` meets it:

* Static shapes and addresses. A graph reads its batch from a static input buffer (one per batch
  size) that the loader's batch is copied into before each replay: one gather that puts the
  batch's normal rows first and its SAM rows after them (the mask -> rows computation stays on the
  host, ``steps.partition_rows``), so the sub-batches are fixed slices of the buffer. The mixed
  step's sub-batch sizes change from step to step, so there is one graph per key
  ``(kind, normal size, SAM size)``: ``("sgd", B, 0)`` for a plain step on B samples (the deep
  ensemble's step, and a mixed-phase batch without SAM samples, which the eager mixed step also
  hands to ``sgd_step``), ``("mixed", n, s)`` otherwise (plain SAM is n = 0). A graph records
  exactly the eager step's code (``steps.sgd_step``, ``steps.mixed_update``) on its slices, so
  BatchNorm sees each sub-batch's own statistics and updates its running statistics as in the eager
  step.
* No host reads inside the step: the steps have none (tests/test_engine.py).
* Whatever outlives the step exists before the capture. The first step of each key runs eagerly:
  it creates SGD's momentum buffers, initialises the CUDA libraries and lets cuDNN choose (with
  ``cudnn.benchmark``, time) its kernels for these shapes, none of which may happen during a
  capture. torch's examples warm up with extra iterations on a side stream; here an extra
  iteration would be an extra training step, so the key's first real step is the warm-up. Its
  second step is captured and replayed, every later one replayed.
* Hyperparameters are constants inside a graph: torch's SGD reads lr as a Python number (a tensor
  lr is read with ``.item()``, which a capture refuses). Before every step the optimizer's
  hyperparameters (Python values: no device read) are compared with those the graphs were captured
  with; when the scheduler has changed lr, every graph is dropped and each key is captured again
  at its next use: at the two milestones of the multistep schedule, every epoch with
  ``--lrsche cosine``.
* Memory: a member's graphs share one memory pool. What a replay leaves behind is its two outputs
  (the loss sum and the correct count), which the engine adds to its running sums right after the
  replay, on the same stream, so a graph replayed later may reuse their memory; gradients are set
  to None at the end of the recorded step, so they are temporaries of the graph like the
  activations. Sharing a pool requires that its graphs never run at the same time: one member's
  steps are queued on one stream; members in lockstep (training/lockstep.py) have a pool each.
* A bound: at most ``limit`` graphs (default ``DEFAULT_LIMIT`` = 128). At batch 128 and f = 0.8 the
  SAM count of a batch takes a few dozen values, and the last partial batch about as many again.
  Past the bound a new key runs eagerly, and one line says so once.

Where a graph cannot be used the step runs eagerly and nothing is lost: on a device other than
CUDA (main.py says so in one line and builds no ``StepGraphs``), with the fp16 loss scale (its
GradScaler reads an overflow flag on the host every step: main.py refuses ``--cuda_graphs --amp
fp16`` in one line; bf16 is the GPU fast path and needs no scale), for the first step of a key,
past the bound, and after a capture fails (an op that synchronises, a data-dependent shape): one
``warning:`` line, and every later step of this member runs eagerly. A capture records kernels
without running them, so after a failed capture the step runs eagerly from the same state.

On a CPU (tests only) ``capture`` is ``run_on_static``: capturing keeps the function and replaying
runs it on the static buffers. Tests check the keys, the cache, the bound, the recapture on a new
lr, the static-buffer copy (bit for bit equal to the eager step) and the fallback without a GPU.
That real CUDA graphs replay the eager step's arithmetic can only be checked on a GPU
(training/README.md says what has been).
"""
import sys

import numpy as np
import torch

from training.sam import SAM
from training.steps import host_mask, mixed_step, mixed_update, partition_rows, sgd_step
from utils.device import host_to_device

DEFAULT_LIMIT = 128


def _warn(message):
    print(f"warning: --cuda_graphs: {message}", file=sys.stderr, flush=True)


def cuda_capture(function, pool):
    """Record ``function``'s kernels in a CUDA graph (nothing runs); returns ``replay``, which runs
    them and returns the tensors ``function`` returned (overwritten by each replay)."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    # Capturing on the legacy default stream is not allowed: there torch.cuda.graph uses a side
    # stream of its own. A member's own stream (lockstep) is captured on directly.
    stream = None if current == torch.cuda.default_stream(current.device) else current
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs = function()
    except BaseException:
        # torch.cuda.graph leaves its capture stream current when ending the capture fails; the
        # eager steps that follow belong on the stream they were queued on before.
        torch.cuda.set_stream(current)
        raise

    def replay():
        graph.replay()
        return outputs
    return replay


def run_on_static(function, pool):
    """The CPU stand-in for ``cuda_capture`` (tests only): nothing is recorded; each replay runs
    ``function`` on the static buffers it closes over."""
    return function


def _reason(err):
    """'Type: first line' of the error that started it (ending a broken capture raises a second one)."""
    while err.__context__ is not None:
        err = err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {(text[0] if text else '')[:160]}"


class StepGraphs:
    """The training steps of one model and optimizer, replayed from CUDA graphs where possible.

    ``sgd_step(images, targets)`` and ``mixed_step(images, targets, sam_mask)`` take the arguments
    and return what ``training.steps.sgd_step`` / ``mixed_step`` do (no criterion, no scaler),
    with the same arithmetic. ``capture(function, pool)`` records a function and returns its
    replay (default: ``cuda_capture`` on CUDA, ``run_on_static`` elsewhere); ``limit`` bounds the
    number of graphs. ``counts`` says how many steps ran eagerly, were captured and were replayed
    (a captured step is also replayed once).

    The optimizer's state must not be replaced (``load_state_dict``) while graphs exist: they
    hold its momentum buffers. The trainer loads state before the first step only; ``reset()``
    drops every graph.
    """

    def __init__(self, model, optimizer, device, freeze_bn_on_perturbed=False, limit=DEFAULT_LIMIT, capture=None):
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self.freeze_bn_on_perturbed = freeze_bn_on_perturbed
        self.limit = int(limit)
        self.capture = capture or (cuda_capture if self.device.type == "cuda" else run_on_static)
        self.graphs = {}     # key -> replay
        self.inputs = {}     # batch size -> (images, targets) static buffers
        self.warmed = set()  # keys whose first step ran eagerly
        self.settings = None
        self.pool = None
        self.enabled = True
        self.full_noted = False
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    # ------------------------------------------------------------------------------ the steps
    def sgd_step(self, images, targets):
        batch_size = targets.shape[0]
        return self._step(("sgd", batch_size, 0), images, targets, None,
                          lambda: sgd_step(self.model, self.optimizer, images, targets))

    def mixed_step(self, images, targets, sam_mask):
        batch_size = targets.shape[0]
        mask = host_mask(sam_mask, batch_size)
        num_sam = int(mask.sum())
        key = ("sgd", batch_size, 0) if num_sam == 0 else ("mixed", batch_size - num_sam, num_sam)

        def eager():
            return mixed_step(self.model, self.optimizer, images, targets, mask,
                              freeze_bn_on_perturbed=self.freeze_bn_on_perturbed)
        return self._step(key, images, targets, mask, eager)

    # ----------------------------------------------------------------------------- machinery
    def reset(self):
        """Drop every graph (their memory goes with them); keys are captured again on next use."""
        self.graphs.clear()
        self.pool = None

    def _step(self, key, images, targets, mask, eager):
        if not self.enabled or key[1] + key[2] == 0:
            return self._eager(eager)
        settings = self._settings()
        if settings != self.settings:
            self.reset()  # a new lr (or any other hyperparameter): the graphs hold the old one
            self.settings = settings
        replay = self.graphs.get(key)
        if replay is None:
            if key not in self.warmed or not self._state_ready():
                self.warmed.add(key)
                return self._eager(eager)
            if len(self.graphs) >= self.limit:
                if not self.full_noted:
                    _warn(f"{self.limit} step graphs exist (the bound); steps with other sub-batch sizes "
                          "run eagerly")
                    self.full_noted = True
                return self._eager(eager)
            replay = self._capture(key, images, targets)
            if replay is None:
                return self._eager(eager)
            self.counts["captured"] += 1
        self._fill(key, images, targets, mask)
        self.counts["replayed"] += 1
        return replay()

    def _eager(self, eager):
        self.counts["eager"] += 1
        return eager()

    def _settings(self):
        """The optimizer's hyperparameters as Python values (lr, momentum, rho, ...), per group."""
        return tuple(tuple(sorted((name, value) for name, value in group.items() if name != "params"))
                     for group in self.optimizer.param_groups)

    def _state_ready(self):
        """Whether every buffer the optimizer keeps across steps exists (SGD creates its momentum
        buffers in its first step; a capture would create them inside the graph's pool, unfilled)."""
        base = getattr(self.optimizer, "base_optimizer", self.optimizer)
        return all(group.get("momentum", 0) == 0 or "momentum_buffer" in base.state.get(p, {})
                   for group in base.param_groups for p in group["params"] if p.requires_grad)

    def _static_inputs(self, batch_size, images, targets):
        if batch_size not in self.inputs:
            self.inputs[batch_size] = (torch.empty((batch_size,) + tuple(images.shape[1:]), dtype=images.dtype,
                                                   device=images.device),
                                       torch.empty(batch_size, dtype=targets.dtype, device=targets.device))
        return self.inputs[batch_size]

    def _fill(self, key, images, targets, mask):
        """Copy the batch into its static buffers: normal rows first, then SAM rows (no host read)."""
        static_images, static_targets = self._static_inputs(key[1] + key[2], images, targets)
        if mask is None or key[0] == "sgd" or key[1] == 0:
            static_images.copy_(images)
            static_targets.copy_(targets)
            return
        rows = host_to_device(torch.from_numpy(np.concatenate(partition_rows(mask))), images.device)
        torch.index_select(images, 0, rows, out=static_images)
        torch.index_select(targets, 0, rows, out=static_targets)

    def _capture(self, key, batch_images, batch_targets):
        """The key's replay, or None after one line when the capture fails (then every step is eager)."""
        kind, num_normal, num_sam = key
        if kind == "mixed" and not isinstance(self.optimizer, SAM):
            raise TypeError("mixed_step with SAM samples needs a SAM optimizer")
        images, targets = self._static_inputs(num_normal + num_sam, batch_images, batch_targets)
        model, optimizer = self.model, self.optimizer

        def step():
            if kind == "sgd":
                outputs = sgd_step(model, optimizer, images, targets)
            else:
                normal = None if num_normal == 0 else (images[:num_normal], targets[:num_normal])
                outputs = mixed_update(model, optimizer, normal, (images[num_normal:], targets[num_normal:]),
                                       freeze_bn_on_perturbed=self.freeze_bn_on_perturbed)
            # The gradients become temporaries of the graph: nothing reads them after the step.
            optimizer.zero_grad(set_to_none=True)
            return outputs

        if self.pool is None and self.device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        optimizer.zero_grad(set_to_none=True)  # the eager step's gradients are not the graph's
        try:
            replay = self.capture(step, self.pool)
        except Exception as err:  # noqa: BLE001 - any failure to capture: the eager step is always right
            self.enabled = False
            self.reset()
            optimizer.zero_grad(set_to_none=True)
            for state in optimizer.state.values():
                state.pop("old_p", None)  # a SAM step cut off inside the capture
            _warn(f"capturing a {kind} step ({num_normal} normal, {num_sam} SAM samples) failed "
                  f"({_reason(err)}); every step of this member runs eagerly from here")
            return None
        self.graphs[key] = replay
        return replay


def member_graphs(args, model, optimizer, device):
    """A member's ``StepGraphs`` when the command asks for ``--cuda_graphs`` and trains on CUDA, else
    None (main.py has said in one line that a CPU runs every step eagerly)."""
    if not getattr(args, "cuda_graphs", False) or torch.device(device).type != "cuda":
        return None
    return StepGraphs(model, optimizer, device, freeze_bn_on_perturbed=args.freeze_bn_on_perturbed)
