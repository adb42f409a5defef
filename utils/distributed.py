"""Several processes (torchrun): which rank trains which member, and sharing the score matrix.

Pure functions first (tested without processes), then thin wrappers over torch.distributed.
"""
import os

import torch
import torch.distributed as dist


def members_for_rank(num_members, rank, world_size):
    """Member positions trained by ``rank``: round-robin, so K < M ranks share the load evenly."""
    return list(range(rank, num_members, world_size))


def owner_of_member(member, world_size):
    return member % world_size


def dist_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, None) when not launched so."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, None


def gpus_in_use(device_name, local_world_size, device_count):
    """How many distinct GPUs this node's ranks train on: an explicit ``cuda:N`` puts them all on
    one, otherwise (``auto``/``cuda``) rank r takes ``cuda:<r % device_count>``, as select_device does."""
    if ":" in str(device_name):
        return 1
    return max(1, min(local_world_size, device_count))


def collective_backend(device_type, local_world_size, gpus):
    """``nccl`` when every rank of the node has a GPU of its own, else ``gloo``.

    NCCL refuses two ranks on one GPU ("duplicate GPU"), which is what several members sharing one
    GPU means; gloo works there, and the one collective of a run (the score exchange at the partition)
    then goes through host memory, which costs nothing measurable next to the training.
    """
    if device_type == "cuda" and local_world_size <= gpus:
        return "nccl"
    return "gloo"


def init_distributed(device, device_name="auto"):
    """Start the process group when launched by torchrun; the backend by ``collective_backend``.

    ``device_name`` is the ``--device`` the command gave (all ranks read the same one), so every
    rank picks the same backend.
    """
    rank, world_size, _ = dist_env()
    if world_size > 1 and not dist.is_initialized():
        backend = "gloo"
        if device.type == "cuda":
            # NCCL binds each rank to the current device; make it this rank's GPU, not cuda:0.
            torch.cuda.set_device(device)
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            gpus = gpus_in_use(device_name, local_world_size, torch.cuda.device_count())
            backend = collective_backend(device.type, local_world_size, gpus)
        dist.init_process_group(backend=backend)
    return rank, world_size


def exchange_device(device):
    """Where tensors must be for the collectives: the GPU under nccl, the host under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def gather_member_rows(rows, num_members, length, world_size, device):
    """Assemble the full (M, N) matrix from each rank's own rows.

    ``rows`` maps member position -> 1-D tensor of ``length`` values for the members this rank owns
    (possibly none, when there are more ranks than members). Every rank sends a
    full (M, N) tensor with its rows filled; after ``all_gather`` row m is taken from its owner, so
    every rank ends with identical bytes and computes the identical partition.
    """
    local = torch.zeros(num_members, length, dtype=torch.float32)
    for member, values in rows.items():
        local[member] = values.float().cpu()
    if world_size == 1:
        return local
    device = exchange_device(device)
    buffers = [torch.zeros_like(local, device=device) for _ in range(world_size)]
    dist.all_gather(buffers, local.to(device))
    full = torch.zeros_like(local)
    for member in range(num_members):
        full[member] = buffers[owner_of_member(member, world_size)][member].cpu()
    return full


def barrier(world_size):
    if world_size > 1:
        dist.barrier()


def destroy(world_size):
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
