"""Counting the operations that make the host wait for the device, on any device (CPU included).

On a GPU, an op whose result the host must read (a Python number from a tensor, a data-dependent
output size) blocks the CPU until every queued kernel has run, so the CPU can no longer run ahead
and queue the next step. The same ops reach the dispatcher on the CPU, so counting them under a
``TorchDispatchMode`` on a CPU run shows what a GPU run would wait for:

    with count_host_reads() as reads:
        train_some_steps()
    assert reads.total == 0, reads.summary()

Counted: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``), ``is_nonzero``,
``nonzero`` / ``argwhere`` / ``where(cond)`` (output size depends on the data), ``masked_select``,
``equal``, ``unique`` variants, ``bincount`` and ``repeat_interleave`` (sizes read from the data),
and boolean-mask indexing ``x[mask]`` / ``x[mask] = v``, which runs a nonzero inside the kernel.
Explicit copies to the host made with ``.to("cpu", copy=True)`` are counted as ``_to_copy[to host]``
(the project's loops read their results that way, once per epoch or pass, so a test sees them).
Not visible on a CPU: a plain ``.cpu()``, ``.numpy()`` or ``.tolist()`` of a CPU tensor (no
dispatched op there); code under test keeps those out of loops by construction.
"""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that always read device data back to the host.
_ALWAYS = {
    "_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "argwhere", "masked_select",
    "equal", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "repeat_interleave",
}
# Indexing ops that synchronise only when one of the indices is a boolean mask.
_MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _is_bool_index(indices):
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


def _is_copy_to_host(tensor, kwargs):
    """A ``_to_copy`` onto the CPU that keeps the dtype. On a GPU that is a device-to-host copy; on
    a CPU run only an explicit ``.to("cpu", copy=True)`` dispatches it (an unchanged ``.to`` returns
    the tensor itself), while casts such as ``t.to(other)`` inside torch's decompositions change the
    dtype and are not counted."""
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    return (device is not None and torch.device(device).type == "cpu"
            and (dtype is None or dtype == tensor.dtype))


class HostReadCounter(TorchDispatchMode):
    """Counts host-reading ops by name (``counts``); ``total`` is their sum."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _ALWAYS:
            self.counts[name] += 1
        elif name in _MASK_INDEXING and _is_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
            self.counts[f"{name}[bool mask]"] += 1
        elif name == "_to_copy" and _is_copy_to_host(args[0], kwargs):
            self.counts["_to_copy[to host]"] += 1
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.counts.values())

    def summary(self):
        return ", ".join(f"{name} x{count}" for name, count in self.counts.most_common()) or "none"


@contextlib.contextmanager
def count_host_reads():
    """Context manager yielding a ``HostReadCounter`` that records every host read inside the block."""
    counter = HostReadCounter()
    with counter:
        yield counter
