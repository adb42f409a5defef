"""Running every member over a split: one pass per split, logits shared by every mode.

``LogitCache`` runs every member over a split in one pass (each batch is read once and fed to
all members) and keeps the (M, n, C) logits until the caller drops them, so every mode of a run
reuses them; with ``--logits_dir`` they are also saved as .npy and reused by later runs.
"""
import hashlib
import os

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import atomic_write
from training.accel import amp_tag
from utils.run_folder import fingerprint


def member_forward(models, dataset, batch_size, device, desc=None):
    """Yield (logits (M, b, C) on device, labels) per batch; each batch is read once for all models."""
    from data import BatchLoader
    loader = BatchLoader(dataset, batch_size, device)
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, disable=None if desc else True):
            x, y = batch[0], batch[1]
            yield torch.stack([model(x) for model in models]), y


def split_logits(models, dataset, batch_size, device, desc=None):
    """float32 numpy (M, n, C): every model's logits on ``dataset``.

    The batches' logits are gathered on the device and copied to the host once per split: a copy
    per batch would make the host wait for each batch's forward passes before queueing the next.
    """
    chunks = [logits.float() for logits, _ in member_forward(models, dataset, batch_size, device, desc=desc)]
    return torch.cat(chunks, dim=1).to("cpu", copy=True).numpy()


class LogitCache:
    """Logits of every member on a split, computed in one pass and shared by every mode."""

    def __init__(self, members, device, batch_size, directory=None):
        self.members, self.device, self.batch_size = members, device, batch_size
        self.directory = directory
        self.store = {}
        self.passes = 0
        self._ids = [self._member_id(m.path, amp_tag(m.model)) for m in members]

    @staticmethod
    def _member_id(path, precision=""):
        """Changes when the checkpoint file is rewritten, so stale saved logits are never reused,
        and with the autocast precision (--amp), so bf16 logits never stand in for fp32 ones."""
        where, size, mtime = fingerprint(path)
        text = where + (f"|{precision}" if precision else "")
        if size is not None:
            text += f"|{size}|{mtime}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def _disk_path(self, index, key):
        return os.path.join(self.directory, f"{self._ids[index]}_{key}.npy")

    def get(self, split):
        """(logits float32 (M, n, C), labels int64 (n,)) of ``split``."""
        if split.key in self.store:
            return self.store[split.key]
        labels = np.asarray(split.dataset.labels, dtype=np.int64)
        cached = [None] * len(self.members)
        if self.directory:
            for i in range(len(self.members)):
                path = self._disk_path(i, split.key)
                if os.path.isfile(path):
                    array = np.load(path, allow_pickle=False)
                    cached[i] = array if array.shape[0] == len(labels) else None
        todo = [i for i, c in enumerate(cached) if c is None]
        if todo:
            self.passes += 1
            fresh = split_logits([self.members[i].model for i in todo], split.dataset, self.batch_size,
                                 self.device, desc=f"logits {split.key}")
            for j, i in enumerate(todo):
                cached[i] = fresh[j]
                if self.directory:
                    os.makedirs(self.directory, exist_ok=True)
                    atomic_write(self._disk_path(i, split.key), lambda f, a=fresh[j]: np.save(f, a), "wb")
        result = (np.stack(cached), labels)
        self.store[split.key] = result
        return result

    def drop(self, key):
        self.store.pop(key, None)
