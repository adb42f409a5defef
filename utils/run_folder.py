"""The run folder of main.py (``--save_path``): its layout and every check made of it, in one place.

    <run>/args.json                    the command's arguments and software versions (each start rewrites it)
    <run>/.lock                        while a training process uses the folder: host, pid, start time, command
    <run>/sharpbalance_split.pt        SharpBalance: scores (M, N), SAM masks (M, N), split settings; written once
    <run>/seed_<s>/checkpoint.pth.tar  the member's last completed epoch: all a resume needs, its seed, the
                                       run's arguments (``run_args``) and which epoch is the best (``best_epoch``)
    <run>/seed_<s>/model_best.pth.tar  a byte copy of the checkpoint of that best epoch
    <run>/seed_<s>/log.csv             one row per completed epoch (LOG_FIELDS), appended
    <run>/seed_<s>/log.csv.damaged     lines of log.csv that could not be read, set aside by a resume

training/trainer.py writes the folder; main.py --evaluate, the measure scripts, the benchmarks and the
tests read it through this module, which answers:
* which members a folder holds (``member_folders``, ``member_checkpoints``) and what the run planned
  (``run_plan``: args.json, else the ``run_args`` every checkpoint records, so a deleted member
  folder is noticed without args.json);
* whether a checkpoint is intact (``read_checkpoint``: the zip archive's CRCs are checked before torch
  reads it; torch.load itself loads flipped bytes inside a tensor without a word);
* whether model_best is the best epoch its checkpoint names (``best_problem``);
* whether every member finished (``finished``);
* whether an input file is unchanged since it was used (``fingerprint``), for the measure scripts'
  partial results, their saved logits and their finished results.

Before any training, ``open_run_folder`` (on rank 0; the others wait for its verdict)
1. takes the folder's lock (``.lock``): a second run on the same folder stops with one line naming the
   holder. A lock whose process is gone (same host) is stale and removed, and so are the ``.tmp_*``
   files a kill leaves behind;
2. checks the run it is about to continue against the command: args.json and every member checkpoint
   (each records the run-defining arguments, dataset, model, width, class count, its seed and its SAM
   mask) and the split (seeds, split rule, one mask per member over exactly the training split; it
   must exist once a member trained past it). Any difference is one ``error:`` line listing it;
3. makes model_best agree with what the checkpoint records as the best epoch (a kill between the two
   writes leaves it one improving epoch behind; it is copied again from the checkpoint, which is
   that epoch); a model_best of another member, run or epoch is refused;
4. writes args.json.
A folder in which no member completed an epoch holds no run: a new command may reuse it whatever its
arguments (a failed first attempt does not lock the folder). With ``--resume OTHER`` and a fresh
``--save_path``, OTHER is locked too while it is checked and its files are copied into
``--save_path``, so the new folder is complete on its own and rerunning the same command resumes it.
"""
import csv
import datetime
import glob
import io
import json
import math
import os
import platform
import re
import socket
import sys
import zipfile

import numpy as np
import torch

from utils.checkpoint import TMP_PREFIX, atomic_write, copy_checkpoint, load_checkpoint
from utils.errors import UserError

ARGS_NAME, LOCK_NAME, SPLIT_NAME = "args.json", ".lock", "sharpbalance_split.pt"
CHECKPOINT_NAME, BEST_NAME, LOG_NAME = "checkpoint.pth.tar", "model_best.pth.tar", "log.csv"
DAMAGED_LOG_NAME = LOG_NAME + ".damaged"
# --checkpoint best|last of the measure scripts
CHECKPOINT_FILES = {"best": BEST_NAME, "last": CHECKPOINT_NAME}
LOG_FIELDS = ("epoch", "phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc",
              "sam_fraction", "epoch_seconds", "samples_per_second")


# ---------------------------------------------------------------------------------------- layout
def member_dir(run, seed):
    return os.path.join(run, f"seed_{seed}")


def member_file(run, seed, name=CHECKPOINT_NAME):
    return os.path.join(member_dir(run, seed), name)


def split_path(run):
    return os.path.join(run, SPLIT_NAME)


def seed_of(folder):
    """The seed of a ``seed_<s>`` member folder, else None."""
    match = re.fullmatch(r"seed_(-?\d+)", os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def member_folders(run):
    """{seed: folder} of every ``seed_<s>/`` folder in ``run``, in increasing seed order."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(run), "seed_*")):
        seed = seed_of(path)
        if seed is not None and os.path.isdir(path):
            found[seed] = path
    return dict(sorted(found.items()))


def member_checkpoints(run):
    """{seed: path} of every ``seed_<s>/checkpoint.pth.tar`` in ``run``, in increasing seed order."""
    paths = {seed: os.path.join(folder, CHECKPOINT_NAME) for seed, folder in member_folders(run).items()}
    return {seed: path for seed, path in paths.items() if os.path.isfile(path)}


def holds_run(run):
    """A folder holds a run once one member has completed (checkpointed) one epoch."""
    return bool(member_checkpoints(run))


# ------------------------------------------------------------------------------ unchanged inputs
def fingerprint(path):
    """``[absolute path, size, modification time in ns]`` of a file or folder (size and time None when
    it is missing). Files here are only ever replaced whole (atomic writes, copies, downloads), which
    changes the time: an equal fingerprint means the input a result was computed from is unchanged."""
    try:
        info = os.stat(path)
    except OSError:
        return [os.path.abspath(path), None, None]
    return [os.path.abspath(path), info.st_size, info.st_mtime_ns]


def member_inputs(path):
    """The files a measurement of the member file ``path`` depends on: the file, and beside a
    model_best the member's checkpoint (its epoch is how far the member trained)."""
    last = os.path.join(os.path.dirname(path), CHECKPOINT_NAME)
    if os.path.basename(path) == BEST_NAME and os.path.isfile(last):
        return [path, last]
    return [path]


# ------------------------------------------------------------------------------------- integrity
_INTACT = set()  # fingerprints of archives whose CRCs were checked by this process


def _damage_advice(path):
    name = os.path.basename(path)
    if name == CHECKPOINT_NAME:
        best = os.path.join(os.path.dirname(path), BEST_NAME)
        return (f"restore it from a backup, or copy '{best}' over it to resume from the best epoch, or delete it "
                "to train this member afresh")
    if name == BEST_NAME:
        return ("restore it from a backup, or delete it: training tracks the best afresh from its next epoch, "
                "and the measure scripts can take --checkpoint last")
    if name == SPLIT_NAME:
        return "restore it from a backup: a split cannot be recomputed once the members have trained past it"
    return "restore it from a backup"


def verify_archive(path):
    """Refuse a torch.save archive whose bytes changed after it was written: every entry must match
    the CRC-32 its zip header records (torch.load does not check them). Checked once per process
    for each fingerprint."""
    key = tuple(fingerprint(path))
    if key in _INTACT:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        what = f"entry '{bad}' fails its CRC check: the bytes changed after the file was written"
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        bad, what = True, f"its zip directory cannot be read: {type(err).__name__}: {str(err)[:80]}"
    if bad is not None:
        raise UserError(f"'{path}' is damaged ({what}); {_damage_advice(path)}")
    _INTACT.add(key)


def read_checkpoint(path, map_location="cpu", mmap=False):
    """``utils.checkpoint.load_checkpoint`` after the integrity check: a missing, foreign or damaged
    file is one UserError naming it and what to do."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        verify_archive(path)
    return load_checkpoint(path, map_location=map_location, mmap=mmap)


def read_split(run):
    """The saved SharpBalance split of ``run`` (scores, sam_masks, seeds and split settings)."""
    path = split_path(run)
    if zipfile.is_zipfile(path):
        verify_archive(path)
    try:
        split = torch.load(path, weights_only=True)
        split["sam_masks"]  # a file without masks is no split
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"'{path}' cannot be read as a SharpBalance split ({type(err).__name__}); "
                        "damaged, or not written by main.py") from None
    return split


def read_args(run):
    """The arguments ``<run>/args.json`` records, or None when there is no such file. A file that is
    not a JSON object is a UserError: the checks must not go on as if it said nothing."""
    path = os.path.join(run, ARGS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
        reason = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
        raise UserError(f"'{path}' cannot be read as JSON ({reason}); restore it, or delete it (every checkpoint "
                        "records the run's arguments, and the next training start writes it again)") from None
    if not isinstance(record, dict):
        raise UserError(f"'{path}' holds a JSON {type(record).__name__}, not the object of arguments main.py "
                        "writes; restore it, or delete it (every checkpoint records the run's arguments)")
    return record


def check_member_seed(path, state):
    """A checkpoint inside ``seed_<s>/`` must be member s's: refuse one copied from another member."""
    folder = seed_of(os.path.dirname(os.path.abspath(path)))
    seed = state.get("seed")
    if folder is not None and seed is not None and int(seed) != folder:
        raise UserError(f"'{path}' holds member seed {seed}, not the member of its folder seed_{folder} (copied "
                        "from another member?); restore the member's own file")


# ---------------------------------------------------------------------------------- run progress
def _plan_of(record):
    seeds, epochs = record.get("seeds"), record.get("epochs")
    seeds = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else None
    return seeds, (int(epochs) if isinstance(epochs, int) else None)


def run_plan(run):
    """(seeds, epochs) the run in ``run`` was started with, None where unknown: from args.json, and from
    the run arguments each checkpoint records, which must agree with it and with each other."""
    plans = {}
    record = read_args(run)
    if record is not None:
        plans[os.path.join(run, ARGS_NAME)] = _plan_of(record)
    for path in member_checkpoints(run).values():
        run_args = read_checkpoint(path, mmap=True).get("run_args")
        if isinstance(run_args, dict):
            plans[path] = _plan_of(run_args)
    known_seeds = {path: tuple(s) for path, (s, _) in plans.items() if s is not None}
    known_epochs = {path: e for path, (_, e) in plans.items() if e is not None}
    if len(set(known_seeds.values())) > 1 or len(set(known_epochs.values())) > 1:
        listed = "; ".join(f"'{path}': seeds {' '.join(map(str, s or []))}, {e} epochs" for path, (s, e) in plans.items())
        raise UserError(f"'{run}' mixes members of different runs ({listed}); measure the members' files "
                        "one by one, or restore the folder")
    seeds = next(iter(known_seeds.values()), None)
    return (list(seeds) if seeds is not None else None), next(iter(known_epochs.values()), None)


def best_problem(folder):
    """None when ``<folder>/model_best.pth.tar`` is the best epoch that ``checkpoint.pth.tar`` records
    (or cannot be checked: no checkpoint, one from before ``best_epoch`` was recorded, or a missing best
    older than the checkpoint, which training tracks afresh). Otherwise ``(kind, what)``:
    ``behind`` = the checkpoint is the best epoch and model_best an earlier best of the same member, or
    missing (an interruption between the two writes; copying the checkpoint again repairs it);
    ``replaced`` = model_best is another member's, another run's or another epoch's file."""
    last, best = os.path.join(folder, CHECKPOINT_NAME), os.path.join(folder, BEST_NAME)
    if not os.path.isfile(last):
        return None
    state = read_checkpoint(last, mmap=True)
    best_epoch, epoch = state.get("best_epoch"), int(state["epoch"])
    if best_epoch is None:
        return None
    if not os.path.isfile(best):
        if best_epoch < epoch:
            return None
        return "behind", f"'{best}' is missing, but '{last}' records its epoch {epoch} as the best"
    held = read_checkpoint(best, mmap=True)
    if held.get("seed") != state.get("seed") or argument_differences(held.get("run_args") or {},
                                                                      state.get("run_args") or {}):
        return "replaced", (f"'{best}' is a file of member seed {held.get('seed')} of another run or member, "
                            f"not of the member in '{last}' (seed {state.get('seed')})")
    on_disk = held.get("epoch")
    if on_disk == best_epoch and same_value(held.get("best_acc"), state.get("best_acc")):
        return None
    if on_disk is not None and on_disk < best_epoch == epoch:
        return "behind", f"'{best}' holds epoch {on_disk}, but '{last}' records epoch {best_epoch} as the best"
    acc = state.get("best_acc")
    acc = f" (val acc {acc:.4f})" if isinstance(acc, float) else ""
    return "replaced", f"'{best}' holds epoch {on_disk}, but '{last}' records epoch {best_epoch}{acc} as the best"


def finished(run, seeds, epochs):
    """Every member in ``seeds`` has a checkpoint of epoch ``epochs``."""
    for seed in seeds:
        path = member_file(run, seed)
        if not os.path.isfile(path) or int(read_checkpoint(path, mmap=True).get("epoch", -1)) != epochs:
            return False
    return True


# ------------------------------------------------------------------------------------------- log
def read_log(path):
    """(rows, damaged, header_ok): the rows of a log.csv (dicts of strings over LOG_FIELDS, in file
    order) and the lines that are no row, as bytes: a line a crash cut short, NUL bytes a crash left
    on some file systems, an edit."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    rows, damaged, header_ok = [], [], False
    for number, raw in enumerate(lines):
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if number == 0 and text == ",".join(LOG_FIELDS):
            header_ok = True
            continue
        fields = None
        if text and "\x00" not in text and "\ufffd" not in text:
            try:
                fields = next(csv.reader([text]))
            except csv.Error:
                fields = None
        if fields is None or len(fields) != len(LOG_FIELDS) or not fields[0].isdigit():
            damaged.append(raw)
        else:
            rows.append(dict(zip(LOG_FIELDS, fields)))
    return rows, damaged, header_ok


def _log_text(rows, header):
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def append_log(folder, rows):
    """Append rows to ``<folder>/log.csv``, with the header when the file is new."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOG_NAME)
    text = _log_text(rows, header=not os.path.isfile(path))
    with open(path, "a", newline="") as f:
        f.write(text)


def truncate_log(folder, epochs_done, label=""):
    """Keep only the rows of epochs up to ``epochs_done`` (a crash between a log row and its checkpoint
    leaves one more), rewritten atomically. Lines that are no row are set aside, appended to
    log.csv.damaged, with a note: the log is not needed to resume, and nothing is deleted."""
    path = os.path.join(folder, LOG_NAME)
    if not os.path.isfile(path):
        return
    rows, damaged, header_ok = read_log(path)
    kept = [row for row in rows if int(row["epoch"]) <= epochs_done]
    if damaged:
        aside = os.path.join(folder, DAMAGED_LOG_NAME)
        with open(aside, "ab") as f:
            f.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in damaged))
        print(f"{label}note: {len(damaged)} line(s) of '{path}' could not be read as log rows (a crash while "
              f"appending?); set aside in '{aside}'", flush=True)
    if damaged or not header_ok or len(kept) != len(rows):
        text = _log_text(kept, header=True).encode()
        atomic_write(path, lambda f: f.write(text))


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
    """An exclusive lock file created with O_EXCL; removed by ``release`` (a kill leaves it stale).
    ``flag`` names the folder in messages (--save_path, or --resume for a run being copied)."""

    def __init__(self, directory, flag="--save_path"):
        self.path = os.path.join(directory, LOCK_NAME)
        self.flag, self.held = flag, False

    def acquire(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._remove_if_stale():
                    raise UserError(self._held_message()) from None
                continue
            except OSError as err:
                raise UserError(f"cannot write to {self.flag} '{os.path.dirname(self.path)}': {err.strerror}") from None
            info = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)}
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise UserError(self._held_message())

    def read(self):
        """The holder (a dict with at least host and a positive integer pid), or None when the file is
        missing, empty, unreadable or names no process."""
        try:
            with open(self.path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or type(info.get("pid")) is not int or info["pid"] <= 0:
            return None
        return info

    def _remove_if_stale(self):
        info = self.read()
        if not info or info.get("host") != socket.gethostname() or _is_running(info["pid"], info.get("process_start")):
            return False
        if self.read() == info:  # still the same stale lock, not one a concurrent start just took
            os.remove(self.path)
            print(f"note: removed the stale lock of pid {info['pid']} (no longer running) from '{self.path}'",
                  flush=True)
        return True

    def held_by_another(self):
        """A live holder's message when another process holds the lock; None when nobody does (or the
        holder is gone)."""
        if not os.path.exists(self.path):
            return None
        info = self.read()
        if info and info.get("host") == socket.gethostname() and not _is_running(info["pid"], info.get("process_start")):
            return None
        return self._held_message()

    def _held_message(self):
        info = self.read()
        if not info:
            return (f"{self.flag} is locked by '{self.path}', which is empty, unreadable or names no pid (a run "
                    f"killed while taking it?); if no run uses this folder, delete that file")
        return (f"{self.flag} '{os.path.dirname(self.path)}' is in use by pid {info.get('pid')} on host "
                f"{info.get('host')} since {info.get('started')} ({info.get('command')}); wait for it, use another "
                f"{self.flag}, or, if that process is gone, delete '{self.path}'")

    def release(self):
        if self.held:
            self.held = False
            if os.path.exists(self.path):
                os.remove(self.path)


def remove_leftovers(directory):
    """Remove temporary files a killed writer left in the run folder; returns how many."""
    paths = glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*")) + \
        glob.glob(os.path.join(glob.escape(directory), "seed_*", TMP_PREFIX + "*"))
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


def check_split_file(run, expect, n_train):
    """Differences between the saved SharpBalance split of ``run`` and the command (``expect``: its
    split settings), and the saved masks."""
    split = read_split(run)
    masks = split["sam_masks"]
    differences = []
    if tuple(masks.shape) != (len(expect["seeds"]), n_train):
        differences.append(f"SharpBalance split: {tuple(masks.shape)} masks (members, training samples) in "
                           f"'{split_path(run)}' -> {(len(expect['seeds']), n_train)} for this command's "
                           "training split")
    differences += argument_differences({k: split[k] for k in expect if k in split}, expect)
    return differences, masks


def check_folder(run, args, run_args, n_train, num_classes, method, split_at, split_expect):
    """Every way the run in ``run`` differs from the command, as ``what: theirs -> ours``. A damaged
    file, invalid args.json, a checkpoint in another member's folder or a split missing after members
    trained past it is a UserError of its own."""
    differences = []
    record = read_args(run)
    if record is not None:
        differences += argument_differences(record, run_args)
    masks = None
    if os.path.isfile(split_path(run)):
        if split_at is None:
            differences.append(f"method: sharpbalance ({SPLIT_NAME} present) -> {method}")
        else:
            found, masks = check_split_file(run, split_expect, n_train)
            differences += found
    seeds = list(args.seeds)
    expected = {"dataset": args.data, "model": args.model, "width": args.width, "num_classes": num_classes,
                "method": method}
    past_split = []
    for seed, path in member_checkpoints(run).items():
        state = read_checkpoint(path, mmap=True)
        check_member_seed(path, state)
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
        if split_at is not None and (mask is not None or int(state.get("epoch", 0)) > split_at):
            past_split.append(f"seed_{seed} (epoch {state.get('epoch')})")
        if mask is not None and len(mask) != n_train:
            differences.append(f"training split size: {len(mask)} (seed_{seed}'s SAM mask) -> {n_train}")
        elif mask is not None and masks is not None and seed in seeds and masks.shape[1] == n_train \
                and not torch.equal(mask.bool(), masks[seeds.index(seed)]):
            differences.append(f"seed_{seed}'s SAM mask differs from the split in {SPLIT_NAME}")
    differences = list(dict.fromkeys(differences))  # args.json and each checkpoint may say the same thing
    if past_split and not differences and not os.path.isfile(split_path(run)):
        # Rescoring would score later weights and train the rest on another split.
        raise UserError(f"'{split_path(run)}' is missing, but {', '.join(past_split)} trained past the split "
                        f"(after epoch {split_at}) on the masks it held: scoring the later weights would give another "
                        "split; restore the file from a backup, or train afresh in another --save_path")
    return differences


# ----------------------------------------------------------------------------- best and adopting
def repair_best(run, repair=True):
    """Make each member's model_best the epoch its checkpoint records as the best (``best_problem``):
    ``behind`` is copied again from the checkpoint, which is that epoch (``repair=False``: left as it
    is); ``replaced`` is refused. A missing one with an older best epoch is handled by
    ``Member.resume`` (the best is tracked afresh)."""
    for seed, folder in member_folders(run).items():
        problem = best_problem(folder)
        if problem is None:
            continue
        kind, what = problem
        if kind == "replaced":
            raise UserError(f"{what}: the file was replaced outside training; restore it, or delete it to track "
                            "the best afresh from the next epoch")
        if repair:
            copy_checkpoint(os.path.join(folder, CHECKPOINT_NAME), os.path.join(folder, BEST_NAME))
            print(f"[seed {seed}] {what} (interrupted between the two writes): rewritten from {CHECKPOINT_NAME}",
                  flush=True)


def adopt(source, run):
    """Copy the run in ``source`` into the fresh ``run``: split, checkpoints, logs."""
    names = [SPLIT_NAME] + [os.path.join(f"seed_{seed}", name) for seed in member_checkpoints(source)
                            for name in (CHECKPOINT_NAME, BEST_NAME, LOG_NAME)]
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            os.makedirs(os.path.dirname(os.path.join(run, name)), exist_ok=True)
            copy_checkpoint(os.path.join(source, name), os.path.join(run, name))


def _lock_source(source):
    """Lock the run that ``--resume`` copies, so that no process trains it meanwhile. A folder this
    user cannot write to is only checked for a live holder (its owner could be training it)."""
    lock = RunLock(source, flag="--resume")
    try:
        return lock.acquire()
    except UserError:
        message = lock.held_by_another()
        if message or os.access(source, os.W_OK):
            raise UserError(message or f"cannot lock --resume '{source}'") from None
        return None


# ------------------------------------------------------------------------------------ the entry
def _prepare(args, run_args, n_train, num_classes, method, split_at, split_expect):
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
    locks = []
    try:
        locks.append(RunLock(save).acquire())
        if source != save:
            locks.append(_lock_source(source))
        removed = remove_leftovers(save)
        if removed:
            print(f"note: removed {removed} temporary file(s) left by an interrupted write in '{save}'")
        if holds_run(source):
            differences = check_folder(source, args, run_args, n_train, num_classes, method, split_at, split_expect)
            if differences:
                raise UserError(f"'{source}' holds a run with other arguments ({'; '.join(differences)}); "
                                "use another --save_path, or the original arguments")
            if source != save:
                repair_best(source, repair=False)  # a replaced model_best is refused before anything is copied
                adopt(source, save)
                print(f"continuing the run in '{source}' in '{save}' (files copied)", flush=True)
            repair_best(save)
        else:
            _forget_attempt(save, n_train, split_at, split_expect)
        record = dict(vars(args))
        record["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "numpy": np.__version__}
        text = json.dumps(record, indent=2, sort_keys=True)
        atomic_write(os.path.join(save, ARGS_NAME), lambda f: f.write(text + "\n"), mode="w")
    except BaseException:
        for lock in locks:
            if lock is not None:
                lock.release()
        _remove_if_created(save, created)
        raise
    for lock in locks[1:]:  # the copied run is free again; the run's own lock stays until training ends
        if lock is not None:
            lock.release()
    return locks[0]


def _remove_if_created(save, created):
    """A refused command leaves no trace: remove --save_path if this command created it empty."""
    if created and os.path.isdir(save) and not os.listdir(save):
        os.rmdir(save)


def _forget_attempt(save, n_train, split_at, split_expect):
    """A folder with no completed epoch holds no run: its args.json is rewritten, and a split that
    does not fit the command (computed at epoch 0 by a failed attempt) is removed."""
    if os.path.isfile(os.path.join(save, ARGS_NAME)):
        print(f"note: '{save}' holds no completed epoch; starting afresh", flush=True)
    if not os.path.isfile(split_path(save)):
        return
    try:
        stale = split_at is None or bool(check_split_file(save, split_expect, n_train)[0])
    except UserError as err:  # damaged: no member trained on it, and the same scores give it again
        print(f"note: {str(err).split(';')[0]}; no member trained on it: removed, it is computed again", flush=True)
        stale = True
    if stale:
        os.remove(split_path(save))


def open_run_folder(args, run_args, n_train, num_classes, method, split_at, split_expect, rank=0, world_size=1):
    """Lock, check, repair and record the run folder (see the module docstring); rank 0 does the
    work and every rank raises the same error. ``split_expect``: the split settings the command
    implies (None without SharpBalance). Returns the lock on rank 0 (release it at the end)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = _prepare(args, run_args, n_train, num_classes, method, split_at, split_expect)
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
