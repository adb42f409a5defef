"""Checkpoint files: written atomically, read with ``weights_only=True``.

Atomic = write to a temporary file in the same directory, flush to disk, then ``os.replace``: a
crash or Ctrl-C at any moment leaves either the previous complete file or the new complete file,
never a truncated one.
"""
import os
import tempfile
import zipfile

import torch

from utils.errors import UserError


def save_checkpoint(state, path):
    """Write ``state`` (a dict of tensors and plain Python values) to ``path`` atomically.

    Any torch-serialisable object works; files read back by ``load_checkpoint`` carry ``state_dict``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp_", suffix=".pth.tar", dir=directory)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely; a missing or foreign file is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since torch 1.6; anything else is not a checkpoint
        # (or a truncated one), and torch's own message about it would only confuse.
        raise UserError(f"'{path}' is not a PyTorch checkpoint (not a torch.save archive, or truncated)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"'{path}' cannot be read as a checkpoint with weights_only=True ({reason[:160]})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project (no 'state_dict' key)")
    return state
