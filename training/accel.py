"""The opt-in fast path: mixed precision, channels_last and torch.compile.

The default (``--amp off``, no ``--channels_last``, no ``--compile``) is the faithful fp32 eager
model, untouched. Each option is one switch on the model, applied once by ``FastPath.prepare``:

``--amp bf16|fp16``  the model's forward runs under ``torch.autocast`` and returns float32 logits,
                     so the loss, its backward pass and the optimizer step are what they were.
                     fp16 needs a loss scale against underflow: ``FastPath.scaler`` (a torch
                     GradScaler) is handed to the steps (training/steps.py), which scale each backward
                     pass of SGD, SAM and the mixed step and skip a step whose gradient
                     overflowed. bf16 has fp32's range and needs none.
``--channels_last``  parameters and activations in NHWC order (faster convolutions on tensor
                     cores); the arithmetic is the same up to the order of additions.
``--compile``        the forward is compiled with ``torch.compile`` (the backend comes from
                     ``$SHARPBALANCE_COMPILE_BACKEND``, default inductor; the tests use a cheap
                     one). Where it cannot compile, one line says why and the eager forward is used.

The forward is replaced on the instance (``model.forward``), so parameter names, the state_dict
and attributes such as ``model.linear`` stay the same; ``plain_forward(model)`` gives the eager
fp32 forward back for a block, and ``plain_copy(model)`` is a copy with that forward in the
default memory format (the per-sample scores are computed on it, so the partition does not depend
on the fast path). Apply ``prepare`` to the model that trains, not to a copy of it.

main.py has two more fast-path flags, for training only (``add_training_fast_path_args``):
``--cuda_graphs`` replays each training step from CUDA graphs (training/graphs.py) and
``--lockstep`` trains the members of a process step by step side by side, each on a CUDA stream of
its own (training/lockstep.py). Neither changes what is computed: a graph replays the eager step's
kernels, and lockstep only interleaves the members. They are recorded in args.json but are not
part of what a resume must match (METHOD_KEYS in training/trainer.py): a run may be continued
with or without them.
"""
import contextlib
import copy
import os
import shutil
import sys

import torch
import torch.nn as nn

from utils.errors import UserError

AMP_CHOICES = ("off", "bf16", "fp16")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_BACKEND_ENV = "SHARPBALANCE_COMPILE_BACKEND"


def add_fast_path_args(parser):
    group = parser.add_argument_group("fast path (opt-in; the default is the faithful fp32 eager model)")
    group.add_argument("--amp", default="off", choices=AMP_CHOICES,
                       help="mixed precision: bf16 (Ampere or newer GPUs, also CPUs) or fp16 (GPUs, with a "
                            "loss scale); the per-sample scores stay fp32")
    group.add_argument("--channels_last", action="store_true", help="NHWC memory format for the convolutions")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (falls back to eager with one line where it cannot)")
    return group


def add_training_fast_path_args(group):
    """main.py's training-only fast-path flags, added to the group ``add_fast_path_args`` returns."""
    group.add_argument("--cuda_graphs", action="store_true",
                       help="replay each training step (SGD, SAM, the mixed step per pair of sub-batch sizes) from "
                            "CUDA graphs: same arithmetic, far fewer kernel launches; CUDA only (one warning line and "
                            "eager steps elsewhere), not with --compile or --amp fp16")
    group.add_argument("--lockstep", action="store_true",
                       help="train this process's members side by side, step i of every member before step i+1, each "
                            "on its own CUDA stream, so one GPU overlaps them; each member's numbers are unchanged")
    return group


def check_fast_path(args, device):
    """Refuse a fast-path option this machine or model cannot use, with one line, before any work."""
    amp = getattr(args, "amp", "off")
    if amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU (fp16 kernels on a CPU are slow or missing); "
                        "use --amp bf16 or --amp off on a CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp fp16")
    if getattr(args, "compile", False) and not callable(getattr(torch, "compile", None)):
        raise UserError(f"--compile needs torch.compile (torch 2.0 or newer); this is torch {torch.__version__}")
    if device.type == "cpu":
        flag = cpu_unsafe_flag(args)
        if flag:
            raise UserError(f"{flag} is a GPU option: on a CPU it runs oneDNN's channels_last convolution "
                            "backward, which corrupts memory on AVX2 CPUs (torch 2.14: the run aborts), and it "
                            "brings no speed-up there; drop the flag on a CPU")
    if getattr(args, "channels_last", False) and getattr(args, "model", None):
        # The architecture alone decides; building it on the meta device allocates nothing.
        from models import create_model
        with torch.device("meta"):
            model = create_model(args.model, 10, width=args.width or 64, dataset=getattr(args, "data", None)
                                 or getattr(args, "dataset", None))
        _check_channels_last(model, args.model)
    if getattr(args, "cuda_graphs", False):
        if getattr(args, "compile", False):
            raise UserError("--cuda_graphs with --compile: a compiled forward is not captured in the step's graphs "
                            "(it recompiles for new sub-batch sizes, which a capture cannot do); use one of them")
        if amp == "fp16":
            raise UserError("--cuda_graphs with --amp fp16: the fp16 loss scale is read on the host every step, which "
                            "a CUDA graph cannot replay; use --amp bf16 (no loss scale) or drop --cuda_graphs")
        if device.type != "cuda":
            print(f"warning: --cuda_graphs needs a CUDA GPU and this run is on {device.type}: every step runs "
                  "eagerly", file=sys.stderr, flush=True)


def cpu_unsafe_flag(args):
    """The fast-path flag that must not run on a CPU, or None.

    Both hand the convolutions to oneDNN in NHWC order: ``--channels_last`` directly, ``--compile``
    because inductor picks channels_last for convolutions on its own. torch 2.14.1's oneDNN
    channels_last convolution backward corrupts the heap on AVX2-only CPUs (reproduced with one
    1x1 stride-2 convolution and one thread), and a CPU gains nothing from either flag. A compile
    backend other than inductor (``$SHARPBALANCE_COMPILE_BACKEND``, used by the tests) keeps the
    eager kernels and is allowed.
    """
    if getattr(args, "channels_last", False):
        return "--channels_last"
    if getattr(args, "compile", False) and os.environ.get(COMPILE_BACKEND_ENV, "inductor") == "inductor":
        return "--compile"
    return None


def _check_channels_last(model, name):
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise UserError(f"--channels_last: model '{name}' has no 2-D convolutions, so the memory format "
                        "changes nothing; drop the flag")


def compile_unavailable(device, backend):
    """Why torch.compile with ``backend`` cannot work here (a short reason), or None."""
    if not callable(getattr(torch, "compile", None)):
        return f"torch {torch.__version__} has no torch.compile"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            return "inductor needs Triton for CUDA and it is not installed"
    elif device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("clang++"):
        return "inductor needs a C++ compiler on the CPU and none was found"
    return None


def _say_eager(reason):
    print(f"warning: --compile: {reason}; running the model eagerly", file=sys.stderr, flush=True)


class _FastForward:
    """The model's forward under autocast and/or torch.compile; ``eager`` is the original one."""

    def __init__(self, eager, device_type, amp_dtype, compile_backend):
        self.eager, self.device_type, self.amp_dtype = eager, device_type, amp_dtype
        self.compiled = None
        if compile_backend:
            try:
                self.compiled = torch.compile(self._forward, backend=compile_backend)
            except Exception as err:  # noqa: BLE001 - e.g. an unknown backend or an unsupported Python
                _say_eager(f"torch.compile failed ({_reason(err)})")

    def _forward(self, *args, **kwargs):
        if self.amp_dtype is None:
            return self.eager(*args, **kwargs)
        # No autocast cache: it would keep the low-precision copies of the weights made while a
        # CUDA graph is captured (training/graphs.py), and it saves nothing here, where every weight
        # is cast once per forward pass anyway (the cast itself is the same either way).
        with torch.autocast(self.device_type, dtype=self.amp_dtype, cache_enabled=False):
            out = self.eager(*args, **kwargs)
        # float32 logits: the loss and everything after it are computed as in the fp32 path.
        return out.float()

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:
                # Raised while tracing or compiling, before the graph ran: nothing was computed, so
                # the same call in eager mode is the step the compiled one would have been.
                _say_eager(f"compiling failed ({_reason(err)})")
                self.compiled = None
        return self._forward(*args, **kwargs)


def _reason(err):
    """'Type: first line' of the error that made compiling fail (dynamo wraps the compiler's own)."""
    inner = getattr(err, "inner_exception", None) or err.__cause__ or err
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {(text[0] if text else '')[:160]}"


class FastPath:
    """The fast-path settings of one model: ``prepare(model)``, ``scaler``, ``state_dict()``."""

    def __init__(self, amp="off", channels_last=False, compile=False, device="cpu"):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
        self.amp, self.channels_last, self.device = amp, bool(channels_last), torch.device(device)
        self.amp_dtype = AMP_DTYPES[amp]
        self.compile_backend = None
        if compile:
            backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
            reason = compile_unavailable(self.device, backend)
            if reason:
                _say_eager(reason)
            else:
                self.compile_backend = backend
        # A GradScaler for fp16 only: bf16 and fp32 gradients do not underflow.
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    @classmethod
    def from_args(cls, args, device):
        return cls(getattr(args, "amp", "off"), getattr(args, "channels_last", False),
                   getattr(args, "compile", False), device)

    @property
    def enabled(self):
        return self.amp != "off" or self.channels_last or self.compile_backend is not None

    def prepare(self, model):
        """Apply the options to ``model`` in place and return it (unchanged when none is on)."""
        if self.channels_last:
            _check_channels_last(model, type(model).__name__)
            model.to(memory_format=torch.channels_last)
        if self.amp_dtype is not None or self.compile_backend is not None:
            model.forward = _FastForward(model.forward, self.device.type, self.amp_dtype, self.compile_backend)
        return model

    def state_dict(self):
        """What an exact resume needs besides the model and optimizer: the fp16 loss scale."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state):
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def amp_tag(model):
    """'' for an fp32 forward, else the autocast dtype's name (e.g. for naming cached logits)."""
    forward = model.__dict__.get("forward")
    dtype = getattr(forward, "amp_dtype", None)
    return "" if dtype is None else str(dtype).replace("torch.", "")


def plain_copy(model):
    """A copy of ``model`` with its plain eager fp32 forward, in the default memory format, without
    gradients: what the per-sample scores are computed on when the fast path changed the model.

    channels_last changes only the order of additions, but the hooks check of the scores compares
    two computations that each round in their own order; on the copy both run the faithful path.
    The copy costs one model's memory for the duration of a scoring pass.
    """
    with plain_forward(model):
        twin = copy.deepcopy(model)  # deepcopy leaves .grad behind
    return twin.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def plain_forward(model):
    """Inside the block ``model`` runs its own eager fp32 forward, whatever ``prepare`` did."""
    fast = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if fast is not None:
            model.forward = fast
