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


def init_distributed(device):
    """Start the process group when launched by torchrun (nccl on CUDA, gloo otherwise)."""
    rank, world_size, _ = dist_env()
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            # NCCL binds each rank to the current device; make it this rank's GPU, not cuda:0.
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size


def gather_member_rows(rows, num_members, length, world_size, device):
    """Assemble the full (M, N) matrix from each rank's own rows.

    ``rows`` maps member position -> 1-D tensor of ``length`` values for the members this rank owns
    (possibly none, when there are more ranks than members). Every rank sends a
    full (M, N) tensor with its rows filled; after ``all_gather`` row m is taken from its owner, so
    every rank ends with identical bytes and computes the identical split.
    """
    local = torch.zeros(num_members, length, dtype=torch.float32)
    for member, values in rows.items():
        local[member] = values.float().cpu()
    if world_size == 1:
        return local
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
