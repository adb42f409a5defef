"""Batched, tensor-side augmentation and normalisation.

Training images live in memory as one uint8 tensor; each batch is cropped, flipped and normalised
with a few vectorised ops on whatever device the model is on. This is the same distribution as
torchvision's ``RandomCrop(size, padding=p)`` + ``RandomHorizontalFlip()`` + ``Normalize`` (zero
padding in pixel space, offsets uniform in [0, 2p], flip with probability 1/2), without a
per-image Python call, which is what keeps a GPU fed at ResNet18/CIFAR speeds.
"""
import torch
import torch.nn.functional as F


def normalize(images_uint8, mean, std):
    """uint8 (B,C,H,W) -> float32 (B,C,H,W), scaled to [0,1] then standardised per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).view(1, -1, 1, 1)
    return (images_uint8.float().div_(255.0) - mean) / std


def random_crop_flip(images_uint8, padding, hflip, generator):
    """Random crop with ``padding`` zero pixels on each side, then an optional horizontal flip.

    The random numbers come from ``generator`` (a CPU ``torch.Generator``) so the same seed gives
    the same augmentation on CPU and GPU.
    """
    batch, _, height, width = images_uint8.shape
    device = images_uint8.device
    if padding > 0:
        padded = F.pad(images_uint8, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
        left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
        rows = top[:, None] + torch.arange(height, device=device)[None, :]          # (B, H)
        cols = left[:, None] + torch.arange(width, device=device)[None, :]          # (B, W)
        batch_index = torch.arange(batch, device=device)[:, None, None]
        # Advanced indexing picks padded[b, :, rows[b, i], cols[b, j]] -> (B, H, W, C).
        images_uint8 = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
        images_uint8 = images_uint8.permute(0, 3, 1, 2)
    if hflip:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
        images_uint8 = torch.where(flip[:, None, None, None], images_uint8.flip(3), images_uint8)
    return images_uint8.contiguous()
