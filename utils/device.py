"""Device selection: ``auto`` picks cuda, then mps, then cpu; anything else is taken as given."""
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


def float64_on(device):
    """The widest float dtype ``device`` has: float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
