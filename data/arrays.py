"""In-memory image datasets and a batched loader.

Every dataset here is a uint8 array of images (N, H, W, 3) plus int64 labels. ``ImageArrayDataset``
serves single items (for ``torch.utils.data.DataLoader`` users); ``BatchLoader`` slices whole batches
straight from the array (moved to the target device once) and augments them with vectorised ops,
which is what training and evaluation use.
"""
import math

import numpy as np
import torch

from data.transforms import normalize, random_crop_flip
from utils.device import host_to_device


class ImageArrayDataset(torch.utils.data.Dataset):
    """Images + labels, normalised on access; optionally augmented and returning the index.

    ``__getitem__`` returns ``(image, label)`` or, with ``return_index``, ``(image, label, index)``
    where index is the position in this split (SharpBalance's per-sample scores are indexed by it).
    """

    def __init__(self, images, labels, mean, std, augment=False, crop_padding=4, hflip=True,
                 return_index=False):
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.crop_padding, self.hflip = augment, crop_padding, hflip
        self.return_index = return_index
        self._device_cache = {}

    def __len__(self):
        return len(self.labels)

    @property
    def image_size(self):
        return self.images.shape[1]

    def __getitem__(self, index):
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)[None]
        if self.augment:
            image = random_crop_flip(image, self.crop_padding, self.hflip, generator=None)
        image = normalize(image, self.mean, self.std)[0]
        label = int(self.labels[index])
        return (image, label, index) if self.return_index else (image, label)

    def tensors_on(self, device):
        """The whole split as (uint8 NCHW images, int64 labels) on ``device``, cached."""
        key = str(device)
        if key not in self._device_cache:
            images = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).contiguous()
            self._device_cache[key] = (images.to(device), torch.from_numpy(self.labels).to(device))
        return self._device_cache[key]

    def with_options(self, **changes):
        """A view of the same arrays with other options (e.g. the un-augmented training split)."""
        options = dict(mean=self.mean, std=self.std, augment=self.augment,
                       crop_padding=self.crop_padding, hflip=self.hflip, return_index=self.return_index)
        options.update(changes)
        return ImageArrayDataset(self.images, self.labels, **options)


class BatchLoader:
    """Iterate over ``dataset`` in batches of ``(images, labels, indices)``.

    Images and labels are on ``device``; indices (positions in the split) stay on the CPU, where
    they are drawn, so looking a batch up in a CPU mask needs no device synchronisation.

    The order and the augmentation of epoch ``e`` are a pure function of ``(seed, e)``: a run
    resumed at epoch e sees exactly the batches an uninterrupted run would, with no RNG state to
    save. The last partial batch is kept (as torch's DataLoader does by default).
    """

    def __init__(self, dataset, batch_size, device, shuffle=False, seed=0, subset=None):
        self.dataset, self.batch_size, self.device = dataset, int(batch_size), torch.device(device)
        self.shuffle, self.seed = shuffle, int(seed)
        self.subset = None if subset is None else torch.as_tensor(subset, dtype=torch.long)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        count = len(self.dataset) if self.subset is None else len(self.subset)
        return math.ceil(count / self.batch_size)

    @property
    def num_samples(self):
        return len(self.dataset) if self.subset is None else len(self.subset)

    def __iter__(self):
        images, labels = self.dataset.tensors_on(self.device)
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.arange(len(self.dataset)) if self.subset is None else self.subset
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        # The epoch's order goes to the device once (non-blocking); each batch slices it there.
        order_on_device = host_to_device(order, self.device)
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            device_indices = order_on_device[start:start + self.batch_size]
            batch = images.index_select(0, device_indices)
            if self.dataset.augment:
                batch = random_crop_flip(batch, self.dataset.crop_padding, self.dataset.hflip, generator)
            yield normalize(batch, self.dataset.mean, self.dataset.std), labels.index_select(0, device_indices), indices
