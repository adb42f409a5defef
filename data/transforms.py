"""Batched, tensor-side augmentation and normalisation.

Training images live in memory as one uint8 tensor; each batch is cropped, flipped and normalised
with a few vectorised ops on whatever device the model is on. This is the same distribution as
torchvision's ``RandomCrop(size, padding=p)`` + ``RandomHorizontalFlip()`` + ``Normalize`` (zero
padding in pixel space, offsets uniform in [0, 2p], flip with probability 1/2), without a
per-image Python call, which is what keeps a GPU fed at ResNet18/CIFAR speeds.
"""
import torch
import torch.nn.functional as F

from utils.device import host_to_device

# (values, device) -> tensor on that device. Building a tensor from a Python list on a GPU is a
# blocking copy, so the host would wait for the queue at every batch; the per-channel constants
# are made once per device instead.
_CONSTANTS = {}


def _channel_constant(values, device):
    key = (tuple(float(v) for v in values), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = host_to_device(torch.tensor(key[0], dtype=torch.float32), device).view(1, -1, 1, 1)
    return _CONSTANTS[key]


def normalize(images_uint8, mean, std):
    """uint8 (B,C,H,W) -> float32 (B,C,H,W), scaled to [0,1] then standardised per channel."""
    mean = _channel_constant(mean, images_uint8.device)
    std = _channel_constant(std, images_uint8.device)
    return (images_uint8.float().div_(255.0) - mean) / std


def random_crop_flip(images_uint8, padding, hflip, generator):
    """Random crop with ``padding`` zero pixels on each side, then an optional horizontal flip.

    The random numbers come from ``generator`` (a CPU ``torch.Generator``) so the same seed gives
    the same augmentation on CPU and GPU. They are drawn on the CPU in a fixed order (top, left,
    flip) and sent to the device in one non-blocking copy.
    """
    batch, _, height, width = images_uint8.shape
    device = images_uint8.device
    draws = []
    if padding > 0:
        draws.append(torch.randint(0, 2 * padding + 1, (batch,), generator=generator))
        draws.append(torch.randint(0, 2 * padding + 1, (batch,), generator=generator))
    if hflip:
        draws.append((torch.rand(batch, generator=generator) < 0.5).long())
    if not draws:
        return images_uint8.contiguous()
    draws = host_to_device(torch.stack(draws), device)
    if padding > 0:
        padded = F.pad(images_uint8, (padding, padding, padding, padding))
        top, left = draws[0], draws[1]
        rows = top[:, None] + torch.arange(height, device=device)[None, :]          # (B, H)
        cols = left[:, None] + torch.arange(width, device=device)[None, :]          # (B, W)
        batch_index = torch.arange(batch, device=device)[:, None, None]
        # Advanced indexing picks padded[b, :, rows[b, i], cols[b, j]] -> (B, H, W, C).
        images_uint8 = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
        images_uint8 = images_uint8.permute(0, 3, 1, 2)
    if hflip:
        flip = draws[-1].bool()
        images_uint8 = torch.where(flip[:, None, None, None], images_uint8.flip(3), images_uint8)
    return images_uint8.contiguous()
