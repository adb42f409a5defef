"""Checkpoint and result files: written atomically with the user's umask, read with ``weights_only=True``.

Atomic = write to a temporary ``.tmp_*`` file in the same directory, flush to disk, then
``os.replace``: a crash or Ctrl-C at any moment leaves either the previous complete file or the new
complete file, never a truncated one (a kill can leave the temporary file; the trainer removes
such leftovers when it next takes the run folder's lock). A full disk or a read-only folder is a
``UserError`` naming the file, and the previous file stays as it was.
"""
import os
import shutil
import tempfile
import zipfile

import torch

from utils.errors import ENVIRONMENT_ERRNOS, UserError

TMP_PREFIX = ".tmp_"


def file_mode():
    """The mode ``open()`` would give a new file: 0o666 minus the umask (mkstemp's files are 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_failure(path, err):
    """A UserError for a failed write, or None when ``err`` looks like a bug rather than the disk."""
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        reason = err.strerror or str(err)
    elif isinstance(err, RuntimeError) and ("inline_container" in str(err) or "PytorchStreamWriter" in str(err)):
        # torch.save on a full disk: "[enforce fail at inline_container.cc:...] unexpected pos ...".
        reason = "torch.save could not write it (" + str(err).strip().splitlines()[0][:120] + ")"
    else:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = f"; {shutil.disk_usage(directory).free / 2 ** 20:.0f} MiB free there"
    except OSError:
        free = ""
    return UserError(f"cannot write '{path}': {reason}{free}; the previous version of the file, if any, is unchanged")


def atomic_write(path, write, mode="wb"):
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    The one atomic writer of the project (checkpoints, args.json, the measure results, logits,
    digits-C): ``f`` is opened with ``mode``, binary by default; pass ``mode="w"`` to write text.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    try:
        os.makedirs(directory, exist_ok=True)
        handle, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
        with os.fdopen(handle, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())
        os.replace(tmp_path, path)
    except BaseException as err:
        if tmp_path and os.path.exists(tmp_path):
            os.remove(tmp_path)
        failure = _write_failure(path, err)
        if failure is not None:
            raise failure from None
        raise


def save_checkpoint(state, path):
    """Write ``state`` (a dict of tensors and plain Python values) to ``path`` atomically.

    Any torch-serialisable object works; files read back by ``load_checkpoint`` carry ``state_dict``.
    """
    atomic_write(path, lambda f: torch.save(state, f))


def copy_checkpoint(source, path):
    """Make ``path`` a copy of ``source`` atomically (a byte copy: no second serialisation).

    A copy, not a hard link: a tool that rewrites one file in place must not change the other.
    """
    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Load a checkpoint dict safely; a missing or foreign file is a ``UserError``.

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the metadata is needed.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since torch 1.6; anything else is not a checkpoint
        # (or a truncated one), and torch's own message about it would only confuse.
        raise UserError(f"'{path}' is not a PyTorch checkpoint (not a torch.save archive, or truncated)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"'{path}' cannot be read as a checkpoint with weights_only=True ({reason[:160]})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project (no 'state_dict' key)")
    return state
