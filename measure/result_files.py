"""Result files of the measure scripts.

``<save>/<name>.json`` (atomic write, NaN written as null) with a ``meta`` block (checkpoints,
dataset, seeds, each member's epochs, software versions, command line) and ``<save>/<name>.csv``,
one row per number: ``mode,split,corruption,severity,member,setting,metric,value``. These two are
written only when a measurement is complete; until then ``<save>/<name>.partial.json`` holds the
splits finished so far (``PartialResults``), so a late failure loses nothing and a rerun continues.
"""
import csv
import datetime
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from utils import checkpoint
from utils.errors import UserError
from utils.run_folder import fingerprint, member_inputs

CSV_FIELDS = ("mode", "split", "corruption", "severity", "member", "setting", "metric", "value")
# Flags that do not change what a result says (where it goes, where it is looked for, how a rerun
# decides to skip it); the member files and the mode enter a result's key on their own.
KEY_IGNORED = ("save", "logits_dir", "skip_finished", "resume", "checkpoint", "mode", "device", "num_workers")


def software_versions():
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "platform": platform.platform()}
    try:
        # Read the installed version without importing torchvision (a slow import).
        from importlib.metadata import PackageNotFoundError, version
        versions["torchvision"] = version("torchvision")
    except (ImportError, PackageNotFoundError):  # pragma: no cover
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        versions["git_commit"] = commit or None
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = None
    return versions


def run_metadata(args, script, members, spec, device, **extra):
    meta = {"script": script, "mode": args.mode, "command": " ".join([os.path.basename(script)] + sys.argv[1:]),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "dataset": args.dataset, "data_path": os.path.abspath(args.data_path),
            "corrupt_path": os.path.abspath(args.corrupt_path) if args.corrupt_path else None,
            "checkpoints": [os.path.abspath(m.path) for m in members],
            "member_seeds": [m.seed for m in members], "seed": args.seed,
            # Which weights were measured and how far each member trained (epochs planned by the run).
            "members": [{"seed": m.seed, "checkpoint": os.path.abspath(m.path), "epoch": m.epoch,
                         "trained_epochs": m.trained, "planned_epochs": m.planned} for m in members],
            "incomplete_ensemble": spec.get("incomplete", []),
            "model": spec["model"], "width": spec["width"], "num_classes": spec["num_classes"],
            "eval_batch_size": args.eval_batch_size, "device": str(device),
            "versions": software_versions()}
    meta.update(extra)
    return meta


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def check_output_folder(path, flag="--save"):
    """Create ``path`` if needed and prove it writable with a probe file, before any long pass."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a file; pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=checkpoint.TMP_PREFIX + "probe_", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"{flag} '{path}' cannot be created or written ({err.strerror or err}); "
                        "choose another folder") from None


def _nan_from_null(value):
    """Undo ``_json_safe``'s NaN -> null, so a report read back computes like the original."""
    if isinstance(value, dict):
        return {k: _nan_from_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_from_null(v) for v in value]
    return float("nan") if value is None else value


def measurement_key(args, members, mode):
    """What a finished split's numbers depend on besides its data: the checkpoints (path, size,
    modification time), the dataset and how it is read, the batch size, the precision (--amp,
    --channels_last where the script offers them) and the mode."""
    checkpoints = [fingerprint(member.path) for member in members]
    return {"mode": mode, "dataset": args.dataset, "data_path": os.path.abspath(args.data_path),
            "corrupt_path": os.path.abspath(args.corrupt_path) if args.corrupt_path else None,
            "tiny_val": args.tiny_val, "eval_batch_size": args.eval_batch_size, "checkpoints": checkpoints,
            "amp": getattr(args, "amp", None), "channels_last": getattr(args, "channels_last", None)}


class PartialResults:
    """``<save>/<name>.partial.json``: the results of every finished split, rewritten atomically as
    they finish (``complete: false`` and the list of finished splits), removed once the complete
    ``<name>.json`` is written.

    A rerun with the same ``key`` (``measurement_key``) reuses a finished split when the files it
    was read from still have the same size and modification time (``sources``); anything else is
    measured again. ``<name>.json`` itself is never partial, so "the JSON exists" means "complete"
    for the report and for scripts/figure7.sh.

    Writes are at most one per ``min_interval`` seconds (tiny splits finish many per second), and
    the scripts ``flush()`` in a ``finally``, so an exception or Ctrl-C keeps every finished split
    and only a hard kill can lose the last ``min_interval`` seconds.
    """

    def __init__(self, save_dir, name, key, meta=None, min_interval=2.0):
        self.path = os.path.join(save_dir, f"{name}.partial.json")
        self.key, self.meta, self.splits = _json_safe(key), _json_safe(meta or {}), {}
        self.min_interval, self.written_at, self.dirty = min_interval, time.monotonic(), False
        if not os.path.isfile(self.path):
            return
        try:
            with open(self.path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
        if previous.get("key") == self.key:
            self.splits = previous.get("splits", {})
            print(f"continuing from {self.path}: {len(self.splits)} split(s) already measured", flush=True)
        else:
            print(f"note: {self.path} was written for other checkpoints or settings; measuring from the start",
                  flush=True)

    def get(self, split_key, sources):
        """The stored result of ``split_key`` if it was measured from the same ``sources``, else None."""
        entry = self.splits.get(split_key)
        if entry is None or entry.get("sources") != _json_safe(sources):
            return None
        return _nan_from_null(entry["result"])

    def add(self, split_key, sources, result):
        self.splits[split_key] = {"sources": _json_safe(sources), "result": _json_safe(result)}
        self.dirty = True
        if time.monotonic() - self.written_at >= self.min_interval:
            self.flush()

    def flush(self):
        """Write what is not on disk yet (atomically)."""
        if not self.dirty:
            return
        payload = {"complete": False, "finished_splits": list(self.splits), "meta": self.meta, "key": self.key,
                   "splits": self.splits}
        text = json.dumps(payload, indent=1, allow_nan=False)
        checkpoint.atomic_write(self.path, lambda f: f.write(text + "\n"), mode="w")
        self.written_at, self.dirty = time.monotonic(), False

    def finish(self):
        """The complete result is written: the partial file has served its purpose."""
        self.dirty = False
        if os.path.exists(self.path):
            os.remove(self.path)


def partial_results(args, members, mode, meta):
    """The ``PartialResults`` of ``mode`` in ``--save`` for this run's checkpoints and settings."""
    return PartialResults(args.save, mode, measurement_key(args, members, mode), dict(meta, mode=mode))


def result_key(args, mode, member_paths, sources, device_type):
    """What ``<save>/<mode>.json`` is computed from: the script's arguments as parsed (presets
    resolved), the mode, the device type, and the fingerprints of every member file
    (``run_folder.member_inputs``) and of every data file the script reads (``sources``)."""
    arguments = {key: value for key, value in sorted(vars(args).items()) if key not in KEY_IGNORED}
    for key in ("data_path", "corrupt_path"):
        if arguments.get(key):
            arguments[key] = os.path.abspath(arguments[key])
    members = [fingerprint(p) for path in member_paths for p in member_inputs(path)]
    return _json_safe({"mode": mode, "arguments": arguments, "device": device_type, "members": members,
                       "data": [fingerprint(path) for path in sources]})


def _key_path(save_dir, name):
    return os.path.join(save_dir, f"{name}.key.json")


def finished_result(save_dir, name, key):
    """True when ``<save_dir>/<name>.json`` exists and ``<name>.key.json`` beside it records ``key``:
    the same measurement, from unchanged files, is already there."""
    if not os.path.isfile(os.path.join(save_dir, f"{name}.json")):
        return False
    try:
        with open(_key_path(save_dir, name)) as f:
            return json.load(f) == key
    except (OSError, ValueError):
        return False


def write_results(save_dir, name, payload, rows, key=None):
    """Write ``<save_dir>/<name>.json`` and ``<save_dir>/<name>.csv``, then ``<name>.key.json`` with
    ``key`` (``result_key``); return the JSON path. The old key goes first, so a kill in between
    leaves no key that describes another result."""
    json_path = os.path.join(save_dir, f"{name}.json")
    if os.path.exists(_key_path(save_dir, name)):
        os.remove(_key_path(save_dir, name))
    text = json.dumps(_json_safe(payload), indent=1, allow_nan=False)
    checkpoint.atomic_write(json_path, lambda f: f.write(text + "\n"), mode="w")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        value = row.get("value")
        clean = {k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS}
        if isinstance(value, (bool, np.bool_)) or value is None:
            clean["value"] = "" if value is None else str(bool(value))
        elif isinstance(value, (int, np.integer)):
            clean["value"] = str(int(value))
        else:
            clean["value"] = repr(float(value)) if math.isfinite(float(value)) else ""
        writer.writerow(clean)
    checkpoint.atomic_write(os.path.join(save_dir, f"{name}.csv"), lambda f: f.write(buffer.getvalue()), mode="w")
    if key is not None:
        key_text = json.dumps(key, indent=1, allow_nan=False)
        checkpoint.atomic_write(_key_path(save_dir, name), lambda f: f.write(key_text + "\n"), mode="w")
    print(f"wrote {json_path} and {name}.csv", flush=True)
    return json_path


def report_rows(mode, split, report, corruption=None, severity=None, setting=None):
    """Tidy rows of a metrics report: ``ensemble_x`` -> member 'ensemble', ``individual_x`` ->
    members 0..M-1, ``average_individual_x`` -> 'mean_individual', matrices -> 'i-j', scalars -> ''."""
    rows = []
    base = dict(mode=mode, split=split, corruption=corruption, severity=severity, setting=setting)
    for key, value in report.items():
        if key.startswith("ensemble_"):
            rows.append(dict(base, member="ensemble", metric=key[len("ensemble_"):], value=value))
        elif key.startswith("average_individual_"):
            rows.append(dict(base, member="mean_individual", metric=key[len("average_individual_"):], value=value))
        elif key.startswith("individual_"):
            rows += [dict(base, member=str(i), metric=key[len("individual_"):], value=v) for i, v in enumerate(value)]
        elif isinstance(value, list) and value and isinstance(value[0], list):
            rows += [dict(base, member=f"{i}-{j}", metric=key, value=v)
                     for i, line in enumerate(value) for j, v in enumerate(line) if i != j]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(dict(base, member="", metric=key, value=value))
    return rows


def summary_rows(mode, clean, summary):
    """Tidy rows of a diversity-script payload: clean splits, then -C cells and their summaries."""
    rows = []
    for split, report in clean.items():
        rows += report_rows(mode, split, report)
    if summary:
        for key, report in summary["cells"].items():
            corruption, severity = key.rsplit("_", 1)
            rows += report_rows(mode, "cell", report, corruption=corruption, severity=severity)
        for corruption, report in summary["per_corruption"].items():
            rows += report_rows(mode, "corruption", report, corruption=corruption)
        for severity, report in summary["per_severity"].items():
            rows += report_rows(mode, "severity", report, severity=severity)
        rows += report_rows(mode, "ood", summary["ood"])
    return rows
