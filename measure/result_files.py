"""Result files of the measure scripts.

``<save>/<name>.json`` (atomic write, NaN written as null) with a ``meta`` block (checkpoints,
dataset, seeds, software versions, command line) and ``<save>/<name>.csv``, one row per number:
``mode,split,corruption,severity,member,setting,metric,value``.
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

import numpy as np
import torch

CSV_FIELDS = ("mode", "split", "corruption", "severity", "member", "setting", "metric", "value")


def software_versions():
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "platform": platform.platform()}
    try:
        # Read the installed version without importing torchvision (an import costs ~2 s).
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


def atomic_write(path, write, mode="w"):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
    try:
        with os.fdopen(handle, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_results(save_dir, name, payload, rows):
    """Write ``<save_dir>/<name>.json`` and ``<save_dir>/<name>.csv``; return the JSON path."""
    json_path = os.path.join(save_dir, f"{name}.json")
    text = json.dumps(_json_safe(payload), indent=1, allow_nan=False)
    atomic_write(json_path, lambda f: f.write(text + "\n"))
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
    atomic_write(os.path.join(save_dir, f"{name}.csv"), lambda f: f.write(buffer.getvalue()))
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
