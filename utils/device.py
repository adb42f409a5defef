"""Device selection (``auto`` picks cuda, then mps, then cpu; anything else is taken as given) and
the process-wide cuDNN flags of ``--cudnn``, and the processor's name for the records that say where a
number was measured."""
import os
import platform

import torch

from utils.errors import UserError


def select_device(name="auto", local_rank=None):
    """Return a ``torch.device`` for ``name`` (auto, cpu, cuda, cuda:N, mps).

    With ``local_rank`` (torchrun) and a CUDA device, each rank takes ``cuda:<local_rank>``.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device '{name}' ({err}); use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA but no CUDA GPU is visible; use --device cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name} asked for MPS but it is not available; use --device cpu")
    return device


def host_to_device(tensor, device):
    """Copy a CPU tensor to ``device`` without making the host wait for the device.

    A plain ``.to("cuda")`` from pageable memory waits until the copy is done, which means until
    every kernel queued before it has run; from pinned memory with ``non_blocking`` the copy is
    queued like a kernel. torch's pinned-memory cache keeps the source alive until the copy ran.
    On the CPU (or MPS) this is an ordinary ``.to``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --cudnn: how cuDNN chooses its convolution algorithms. Each setting is the complete set of
# process-wide flags it stands for, so applying one undoes whatever another set before it.
#   name: (cudnn.benchmark, cudnn.deterministic, torch.use_deterministic_algorithms, what it means)
CUDNN_SETTINGS = {
    "benchmark": (True, False, False,
                  "cuDNN times its algorithms once per new input shape and keeps the fastest"),
    "deterministic": (False, True, True,
                      "deterministic algorithms chosen without timing, plus torch.use_deterministic_algorithms: "
                      "bit-reproducible runs and resumes on one GPU"),
    "released": (True, True, False,
                 "the released main.py's flags (benchmark + deterministic): timing restricted to "
                 "deterministic algorithms, slow for every new sub-batch size"),
    "torch": (False, False, False, "PyTorch's defaults: cuDNN's heuristics, no timing"),
}
DEFAULT_CUDNN = "benchmark"
# cuBLAS reproducibility needs a fixed workspace layout (NVIDIA's documented values); torch refuses a
# matmul under use_deterministic_algorithms on CUDA without one.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def cudnn_help():
    """--help text for --cudnn: every setting and what it does."""
    return "; ".join(f"{name} = {meaning}" for name, (*_, meaning) in CUDNN_SETTINGS.items())


def apply_cudnn(setting):
    """Set torch's process-wide algorithm flags for ``setting`` (a ``--cudnn`` choice); returns
    ``(benchmark, deterministic, use_deterministic_algorithms)``.

    The flags are global to the process, so main.py and the measure scripts call this once, before
    any model exists. ``deterministic`` also fixes cuBLAS's workspace (``CUBLAS_WORKSPACE_CONFIG``,
    read when cuBLAS first runs) unless the user chose one of NVIDIA's deterministic values, and
    refuses another value with one line. Operations with no deterministic implementation warn
    (``warn_only``) instead of raising: a run must not stop at the split epoch for an operation met
    only there; the warning names it, and such a run is not bit-reproducible.
    On a CPU the cuDNN flags do nothing; ``deterministic`` still selects torch's deterministic CPU
    kernels (CPU runs are reproducible under every setting).
    """
    if setting not in CUDNN_SETTINGS:
        raise UserError(f"unknown --cudnn setting '{setting}'; choose one of {', '.join(CUDNN_SETTINGS)}")
    benchmark, deterministic, algorithms, _ = CUDNN_SETTINGS[setting]
    if algorithms:
        workspace = os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_DETERMINISTIC_WORKSPACES[0])
        if workspace not in CUBLAS_DETERMINISTIC_WORKSPACES:
            raise UserError(f"--cudnn deterministic: {CUBLAS_WORKSPACE_ENV}={workspace} makes cuBLAS "
                            f"non-deterministic; unset it or set it to {' or '.join(CUBLAS_DETERMINISTIC_WORKSPACES)}")
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(algorithms, warn_only=True)
    return benchmark, deterministic, algorithms


def float64_on(device):
    """The widest float dtype ``device`` has: float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The processor, named closely enough to tell two machines apart: Linux's model name, and the
    family, model and widest vector extension when present (virtual machines often report only
    "AMD EPYC", and kernels differ between an AVX2 and an AVX-512 part); else what platform knows."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key and fields:  # the first processor's block is enough
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    details = [f"{key} {fields[label]}" for key, label in (("family", "cpu family"), ("model", "model"))
               if fields.get(label)]
    flags = fields.get("flags", "").split()
    if flags:
        details.append("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{name} ({', '.join(details)})" if details else name
