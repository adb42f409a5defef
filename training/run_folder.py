"""The run folder (``--save_path``): its lock, its arguments, and the checks that make a resume safe.

Before any training, ``open_run_folder`` (on rank 0; the others wait for its verdict)
1. takes the folder's lock, ``<save_path>/.lock`` (host, pid, start time of the holder): a second
   run on the same folder stops with one line naming the holder. A lock whose process is gone (same
   host) is stale and removed, and so are the ``.tmp_*`` files a kill leaves behind;
2. checks the run it is about to continue against the command: ``args.json`` and every member
   checkpoint (each records the run-defining arguments, dataset, model, width, class count and its
   SAM mask) and ``sharpbalance_split.pt`` (seeds, split rule, and a mask per member over exactly
   the training split). Any difference is one ``error:`` line listing what differs;
3. makes ``model_best.pth.tar`` agree with what ``checkpoint.pth.tar`` records as the best epoch (a
   kill between the two writes leaves it one improving epoch behind; it is copied again from the
   checkpoint, which is that epoch);
4. writes ``args.json``.
A folder in which no member completed an epoch holds no run: a new command may reuse it whatever
its arguments (a failed first attempt does not lock the folder). With ``--resume OTHER`` and a fresh
``--save_path``, OTHER's files are copied into ``--save_path`` after the checks,
so the new folder is complete on its own and rerunning the same command resumes it.
"""
import datetime
import glob
import json
import math
import os
import platform
import socket
import sys

import numpy as np
import torch

from training.partition import resolve_split_rule
from utils.checkpoint import TMP_PREFIX, atomic_write, copy_checkpoint, load_checkpoint
from utils.errors import UserError

LOCK_NAME = ".lock"
SPLIT_NAME = "sharpbalance_split.pt"
CHECKPOINT_NAME, BEST_NAME, LOG_NAME = "checkpoint.pth.tar", "model_best.pth.tar", "log.csv"


# ------------------------------------------------------------------------------------------ lock
def _process_start(pid):
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid; else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]  # a zombie has finished
    except (OSError, IndexError):
        return None


def _is_running(pid, start):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    if os.path.isdir("/proc"):
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    return True


class RunLock:
    """An exclusive lock file created with O_EXCL; removed by ``release`` (a kill leaves it stale)."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def acquire(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._remove_if_stale():
                    raise UserError(self._held_message()) from None
                continue
            except OSError as err:
                raise UserError(f"cannot write to --save_path '{os.path.dirname(self.path)}': {err.strerror}") from None
            info = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)}
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise UserError(self._held_message())

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _remove_if_stale(self):
        info = self._read()
        if not info or info.get("host") != socket.gethostname() or _is_running(info["pid"], info.get("process_start")):
            return False
        if self._read() == info:  # still the same stale lock, not one a concurrent start just took
            os.remove(self.path)
            print(f"note: removed the stale lock of pid {info['pid']} (no longer running) from '{self.path}'",
                  flush=True)
        return True

    def _held_message(self):
        info = self._read()
        if not info:
            return (f"--save_path is locked by '{self.path}', which is empty or unreadable (a run killed while "
                    f"taking it?); if no run uses this folder, delete that file")
        return (f"--save_path '{os.path.dirname(self.path)}' is in use by pid {info.get('pid')} on host "
                f"{info.get('host')} since {info.get('started')} ({info.get('command')}); wait for it, use another "
                f"--save_path, or, if that process is gone, delete '{self.path}'")

    def release(self):
        if self.held:
            self.held = False
            if os.path.exists(self.path):
                os.remove(self.path)


def remove_leftovers(directory):
    """Remove temporary files a killed writer left in the run folder; returns how many."""
    paths = glob.glob(os.path.join(directory, TMP_PREFIX + "*")) + \
        glob.glob(os.path.join(directory, "seed_*", TMP_PREFIX + "*"))
    for path in paths:
        os.remove(path)
    return len(paths)


# ------------------------------------------------------------------------------------ comparing
def same_value(a, b):
    """Equality for recorded arguments: NaN equals NaN, a list equals a tuple."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def argument_differences(record, current):
    """``key: recorded -> current`` for each key both know whose values differ (a key a record
    predates is not compared)."""
    return [f"{key}: {record[key]!r} -> {value!r}" for key, value in current.items()
            if key in record and not same_value(record[key], value)]


def member_checkpoints(directory):
    """{seed: checkpoint path} for every seed_<s>/checkpoint.pth.tar in ``directory``."""
    found = {}
    for path in glob.glob(os.path.join(directory, "seed_*", CHECKPOINT_NAME)):
        name = os.path.basename(os.path.dirname(path))[len("seed_"):]
        if name.lstrip("-").isdigit():
            found[int(name)] = path
    return dict(sorted(found.items()))


def holds_run(directory):
    """A folder holds a run once one member has completed (checkpointed) one epoch."""
    return bool(member_checkpoints(directory))


def check_split_file(path, expect, n_train):
    """Differences between a saved SharpBalance split and the command (``expect``: its settings)."""
    try:
        split = torch.load(path, weights_only=True)
        masks = split["sam_masks"]
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"'{path}' cannot be read as a SharpBalance split ({type(err).__name__}); "
                        "damaged, or not written by main.py") from None
    differences = []
    if tuple(masks.shape) != (len(expect["seeds"]), n_train):
        differences.append(f"SharpBalance split: {tuple(masks.shape)} masks (members, training samples) in "
                           f"'{path}' -> {(len(expect['seeds']), n_train)} for this command's training split")
    differences += argument_differences({k: split[k] for k in expect if k in split}, expect)
    return differences, masks


def check_folder(directory, args, run_args, n_train, num_classes, method, split_at):
    """Every way the run in ``directory`` differs from the command, as ``what: theirs -> ours``."""
    differences = []
    args_path = os.path.join(directory, "args.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            differences += argument_differences(json.load(f), run_args)
    split_path = os.path.join(directory, SPLIT_NAME)
    masks = None
    if os.path.isfile(split_path):
        if split_at is None:
            differences.append(f"method: sharpbalance ({SPLIT_NAME} present) -> {method}")
        else:
            found, masks = check_split_file(split_path, split_settings(args), n_train)
            differences += found
    seeds = list(args.seeds)
    expected = {"dataset": args.data, "model": args.model, "width": args.width, "num_classes": num_classes,
                "method": method}
    for seed, path in member_checkpoints(directory).items():
        state = load_checkpoint(path, mmap=True)
        if "run_args" in state:  # the class count follows from the data, so it is not among them
            differences += argument_differences(state["run_args"], run_args)
            differences += argument_differences(state, {"num_classes": num_classes})
        else:  # a checkpoint from before run_args were recorded: its metadata
            differences += argument_differences(state, expected)
        if seed not in seeds:
            differences.append(f"seeds: the folder has member seed_{seed}, not in --seed {' '.join(map(str, seeds))}")
        if int(state.get("epoch", 0)) > args.epochs:
            differences.append(f"epochs: seed_{seed} is at epoch {state['epoch']} -> --epochs {args.epochs}")
        mask = state.get("sam_mask")
        if mask is not None and len(mask) != n_train:
            differences.append(f"training split size: {len(mask)} (seed_{seed}'s SAM mask) -> {n_train}")
        elif mask is not None and masks is not None and seed in seeds and masks.shape[1] == n_train \
                and not torch.equal(mask.bool(), masks[seeds.index(seed)]):
            differences.append(f"seed_{seed}'s SAM mask differs from the split in {SPLIT_NAME}")
    return list(dict.fromkeys(differences))  # args.json and each checkpoint may say the same thing


def split_settings(args):
    return {"seeds": list(args.seeds), "flat_ratio": args.flat_ratio, "train_subset": args.train_subset,
            "split_rule": resolve_split_rule(args.split_rule, args.data), "select": args.select}


# ----------------------------------------------------------------------------- best and adopting
def repair_best(directory):
    """Make each member's model_best.pth.tar the epoch its checkpoint records as the best.

    Written checkpoint-first, best-second, so an interruption in between can leave model_best one
    improving epoch behind, and then the checkpoint *is* the best epoch: copy it again. A model_best
    that disagrees otherwise was changed outside training: refuse. A missing one with an older best
    epoch is handled by ``Member.resume`` (the best is tracked afresh).
    """
    for seed, path in member_checkpoints(directory).items():
        state = load_checkpoint(path, mmap=True)
        best_epoch, epoch = state.get("best_epoch"), int(state["epoch"])
        if best_epoch is None:  # a checkpoint written before best_epoch was recorded
            continue
        best_path = os.path.join(os.path.dirname(path), BEST_NAME)
        on_disk = int(load_checkpoint(best_path, mmap=True)["epoch"]) if os.path.isfile(best_path) else None
        if on_disk == best_epoch or (on_disk is None and best_epoch < epoch):
            continue
        if best_epoch == epoch:
            copy_checkpoint(path, best_path)
            print(f"[seed {seed}] {BEST_NAME} held epoch {on_disk} but the best is epoch {epoch} (interrupted "
                  f"between the two writes): rewritten from {CHECKPOINT_NAME}", flush=True)
        else:
            raise UserError(f"'{best_path}' holds epoch {on_disk}, but '{path}' records epoch {best_epoch} "
                            f"(val acc {state['best_acc']:.4f}) as the best: the file was replaced outside "
                            f"training; restore it, or delete it to track the best afresh from the next epoch")


def adopt(source, directory):
    """Copy the run in ``source`` into the fresh ``directory``: split, checkpoints, logs."""
    names = [SPLIT_NAME] + [os.path.join(f"seed_{seed}", name) for seed in member_checkpoints(source)
                            for name in (CHECKPOINT_NAME, BEST_NAME, LOG_NAME)]
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
            copy_checkpoint(os.path.join(source, name), os.path.join(directory, name))


# ------------------------------------------------------------------------------------ the entry
def _prepare(args, run_args, n_train, num_classes, method, split_at):
    save = args.save_path
    if os.path.exists(save) and not os.path.isdir(save):
        raise UserError(f"--save_path '{save}' is a file; pass a directory")
    source = save
    if args.resume and os.path.abspath(args.resume) != os.path.abspath(save):
        if not os.path.isdir(args.resume):
            raise UserError(f"--resume '{args.resume}' is not a directory")
        if not holds_run(args.resume):
            raise UserError(f"--resume '{args.resume}' holds no completed epoch (no seed_<s>/{CHECKPOINT_NAME})")
        if not holds_run(save):
            source = args.resume
        else:
            print(f"note: '{save}' already holds a run: resuming it (--resume only starts a new --save_path)")
    created = not os.path.exists(save)
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --save_path '{save}': {err.strerror}") from None
    try:
        lock = RunLock(save).acquire()
    except UserError:
        _remove_if_created(save, created)
        raise
    try:
        removed = remove_leftovers(save)
        if removed:
            print(f"note: removed {removed} temporary file(s) left by an interrupted write in '{save}'")
        if holds_run(source):
            differences = check_folder(source, args, run_args, n_train, num_classes, method, split_at)
            if differences:
                raise UserError(f"'{source}' holds a run with other arguments ({'; '.join(differences)}); "
                                "use another --save_path, or the original arguments")
            if source != save:
                adopt(source, save)
                print(f"continuing the run in '{source}' in '{save}' (files copied)", flush=True)
            repair_best(save)
        else:
            _forget_attempt(save, args, n_train, split_at)
        record = dict(vars(args))
        record["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "numpy": np.__version__}
        text = json.dumps(record, indent=2, sort_keys=True)
        atomic_write(os.path.join(save, "args.json"), lambda f: f.write(text + "\n"), mode="w")
    except BaseException:
        lock.release()
        _remove_if_created(save, created)
        raise
    return lock


def _remove_if_created(save, created):
    """A refused command leaves no trace: remove --save_path if this command created it empty."""
    if created and not os.listdir(save):
        os.rmdir(save)


def _forget_attempt(save, args, n_train, split_at):
    """A folder with no completed epoch holds no run: its args.json is rewritten, and a split that
    does not fit the command (computed at epoch 0 by a failed attempt) is removed."""
    if os.path.isfile(os.path.join(save, "args.json")):
        print(f"note: '{save}' holds no completed epoch; starting afresh", flush=True)
    split_path = os.path.join(save, SPLIT_NAME)
    if os.path.isfile(split_path) and (split_at is None or check_split_file(split_path, split_settings(args), n_train)[0]):
        os.remove(split_path)


def open_run_folder(args, run_args, n_train, num_classes, method, split_at, rank=0, world_size=1):
    """Lock, check, repair and record the run folder (see the module docstring); rank 0 does the
    work and every rank raises the same error. Returns the lock on rank 0 (release it at the end)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = _prepare(args, run_args, n_train, num_classes, method, split_at)
        except UserError as err:
            error = str(err)
    if world_size > 1:
        import torch.distributed as dist
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    return lock
