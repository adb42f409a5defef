"""What the three measure_*.py scripts share: arguments, members, logits, data splits, result files.

Members
    ``--resume`` takes checkpoint files and/or run directories written by main.py. A run directory
    ``<save_path>`` contributes ``seed_<s>/model_best.pth.tar`` (``--checkpoint best``, default) or
    ``seed_<s>/checkpoint.pth.tar`` (``--checkpoint last``) for every ``seed_<s>`` folder, in
    increasing seed order; a ``seed_<s>`` folder itself contributes its one file. Architecture,
    width, dataset and class count come from the checkpoint (main.py stores them); checkpoints
    without them (older or foreign files holding only ``state_dict``) fall back to --model,
    --width and --dataset. Members must agree on architecture, width and class count.

Logits
    ``LogitCache`` runs every member over a split in one pass (each batch is read once and fed to
    all members) and keeps the (M, n, C) logits until the caller drops them, so every mode of a run
    reuses them; with ``--logits_dir`` they are also saved as .npy and reused by later runs.

Result files
    ``<save>/<name>.json`` (atomic write, NaN written as null) with a ``meta`` block (checkpoints,
    dataset, seeds, software versions, command line) and ``<save>/<name>.csv``, one row per number:
    ``mode,split,corruption,severity,member,setting,metric,value``.
"""
import csv
import datetime
import glob
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
from collections import namedtuple

import numpy as np
import torch

from utils.args import add_data_args, add_device_args, add_model_args, make_parser
from utils.checkpoint import load_checkpoint
from utils.device import select_device
from utils.errors import UserError

from tqdm import tqdm

CHECKPOINT_FILES = {"best": "model_best.pth.tar", "last": "checkpoint.pth.tar"}
CSV_FIELDS = ("mode", "split", "corruption", "severity", "member", "setting", "metric", "value")
Member = namedtuple("Member", "path model seed")
Split = namedtuple("Split", "key kind corruption severity dataset")


# ------------------------------------------------------------------------------------ arguments
def build_parser(description, modes, default_mode, eval_batch_size, eval_batch_help="images per forward pass"):
    """Parser with the shared groups (data, model, device) and the measurement flags."""
    parser = make_parser(description)
    add_data_args(parser, flag="--dataset")
    add_model_args(parser)
    add_device_args(parser)
    # None = "not given": the checkpoint's own metadata decides, --model/--width only fill gaps.
    parser.set_defaults(model=None, width=None)
    group = parser.add_argument_group("measurement")
    group.add_argument("--resume", nargs="+", required=True, metavar="PATH",
                       help="checkpoint files and/or run directories of main.py (members found automatically)")
    group.add_argument("--checkpoint", default="best", choices=tuple(CHECKPOINT_FILES),
                       help="for run directories: best = model_best.pth.tar, last = checkpoint.pth.tar")
    group.add_argument("--mode", default=default_mode,
                       help=f"comma-separated list of: {', '.join(modes)}")
    group.add_argument("--save", default="./results/measure", help="folder for the JSON and CSV results")
    group.add_argument("--eval-batch-size", "--eval_batch_size", dest="eval_batch_size", type=int,
                       default=eval_batch_size, help=eval_batch_help)
    group.add_argument("--seed", type=int, default=13, help="seed for every random draw of the measurement")
    return parser, group


def parse_modes(text, valid):
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in modes if m not in valid]
    if unknown or not modes:
        raise UserError(f"unknown mode '{unknown[0] if unknown else text}'; valid modes: {', '.join(valid)}")
    return list(dict.fromkeys(modes))


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------- members
def _seed_of(folder):
    match = re.fullmatch(r"seed_(-?\d+)", os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def find_member_checkpoints(resume, which="best"):
    """Expand --resume into checkpoint files (see the module docstring)."""
    filename = CHECKPOINT_FILES[which]
    paths = []
    for entry in resume:
        if os.path.isfile(entry):
            paths.append(entry)
            continue
        if not os.path.isdir(entry):
            raise UserError(f"--resume '{entry}' does not exist")
        seed_dirs = sorted((d for d in glob.glob(os.path.join(entry, "seed_*")) if os.path.isdir(d)
                            and _seed_of(d) is not None), key=_seed_of)
        folders = seed_dirs or [entry]
        for folder in folders:
            path = os.path.join(folder, filename)
            if not os.path.isfile(path):
                other = os.path.join(folder, CHECKPOINT_FILES["last" if which == "best" else "best"])
                hint = f" ('{other}' exists: use --checkpoint {'last' if which == 'best' else 'best'})" \
                    if os.path.isfile(other) else ""
                if not seed_dirs and not os.path.isfile(other):
                    raise UserError(f"--resume '{entry}' holds neither checkpoint files nor seed_<s> run folders")
                raise UserError(f"checkpoint '{path}' is missing{hint}")
            paths.append(path)
    return paths


def _strip_prefix(state_dict):
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def build_model(path, state, spec, dataset):
    """The model described by ``spec`` with the checkpoint's weights; a mismatch is a UserError."""
    from models import create_model
    model = create_model(spec["model"], spec["num_classes"], width=spec["width"], dataset=dataset)
    try:
        model.load_state_dict(_strip_prefix(state["state_dict"]))
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in lines[:2])
        raise UserError(f"checkpoint '{path}' does not fit {spec['model']} (width {spec['width']}, "
                        f"{spec['num_classes']} classes): {detail[:200]}") from None
    return model


def load_member_files(paths, dataset, device, model=None, width=None):
    """Load checkpoint files as one ensemble on ``device`` (eval mode); returns (members, spec).

    Architecture, width and class count come from each checkpoint, ``model``/``width`` only fill
    gaps (and must not contradict it); every member must match the first and ``dataset``.
    """
    from data import dataset_info
    info = dataset_info(dataset)
    members, specs = [], []
    for path in paths:
        state = load_checkpoint(path)
        spec = {"model": state.get("model") or model or "resnet18",
                "width": int(state.get("width") or width or 64),
                "num_classes": int(state.get("num_classes") or info.num_classes)}
        trained_on = state.get("dataset")
        if trained_on and trained_on != dataset:
            raise UserError(f"checkpoint '{path}' was trained on {trained_on}, but --dataset is {dataset}")
        for key, given in (("model", model), ("width", width)):
            if given is not None and state.get(key) is not None and given != state[key]:
                raise UserError(f"checkpoint '{path}' holds {key} {state[key]}, but --{key} is {given}")
        if spec["num_classes"] != info.num_classes:
            raise UserError(f"checkpoint '{path}' has {spec['num_classes']} classes, but {dataset} "
                            f"has {info.num_classes}")
        if specs and spec != specs[0]:
            raise UserError(f"checkpoints differ: '{paths[0]}' is {specs[0]} but '{path}' is {spec}; "
                            "an ensemble needs one architecture, width and class count")
        net = build_model(path, state, spec, dataset)
        specs.append(spec)
        members.append(Member(path, net.to(device).eval(), state.get("seed")))
    return members, specs[0]


def load_members(args, device, min_members=1):
    """The members named by ``--resume`` (see the module docstring), checked to form one ensemble."""
    paths = find_member_checkpoints(args.resume, args.checkpoint)
    if len(paths) < min_members:
        raise UserError(f"mode '{args.mode}' compares members and needs at least {min_members} models; "
                        f"--resume gave {len(paths)} ({', '.join(paths)})")
    return load_member_files(paths, args.dataset, device, model=args.model, width=args.width)


# --------------------------------------------------------------------------------------- splits
def corruption_selection(args):
    from data import corruption_names
    names = corruption_names(args.dataset)
    if args.corruptions in ("all", None):
        return list(names)
    if args.corruptions == "none":
        return []
    chosen = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise UserError(f"unknown corruption '{unknown[0]}'; valid: {', '.join(names)}")
    return chosen


def add_corruption_args(group):
    group.add_argument("--corruptions", default="all",
                       help="corruptions of the -C set to evaluate: all, none, or a comma list")


def check_corruption_files(args, corruptions):
    """Fail before any long pass if a selected -C file is missing (the error names it)."""
    if not corruptions or args.dataset == "digits":
        return  # digits-C is generated on first use
    from data import dataset_info
    directory = os.path.join(args.corrupt_path or args.data_path, dataset_info(args.dataset).corrupt_dirname)
    if args.dataset == "tiny_imgnet":
        wanted = [os.path.join(directory, c, str(s)) for c in corruptions for s in range(1, 6)]
        exists = os.path.isdir
    else:
        wanted = [os.path.join(directory, "labels.npy")] + [os.path.join(directory, f"{c}.npy") for c in corruptions]
        exists = os.path.isfile
    for path in wanted:
        if not exists(path):
            raise UserError(f"corruption file '{path}' is missing (needed for the -C evaluation; "
                            "use --corruptions none to skip it)")


def clean_splits(args, which=("val", "test")):
    from data import build_datasets
    splits = build_datasets(args.dataset, args.data_path, tiny_val=args.tiny_val)
    for name in which:
        yield Split(name, name, None, None, getattr(splits, name))


def corrupted_splits(args, corruptions):
    if not corruptions:
        return
    from data import corrupted_test_sets
    wanted = set(corruptions)
    for corruption, severity, dataset in corrupted_test_sets(args.dataset, args.data_path, args.corrupt_path):
        if corruption in wanted:
            yield Split(f"{corruption}_{severity}", "cell", corruption, severity, dataset)


# --------------------------------------------------------------------------------------- logits
def member_forward(models, dataset, batch_size, device, desc=None):
    """Yield (logits (M, b, C) on device, labels) per batch; each batch is read once for all models."""
    from data import BatchLoader
    loader = BatchLoader(dataset, batch_size, device)
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, disable=None if desc else True):
            x, y = batch[0], batch[1]
            yield torch.stack([model(x) for model in models]), y


class LogitCache:
    """Logits of every member on a split, computed in one pass and shared by every mode."""

    def __init__(self, members, device, batch_size, directory=None):
        self.members, self.device, self.batch_size = members, device, batch_size
        self.directory = directory
        self.store = {}
        self.passes = 0
        self._ids = [self._member_id(m.path) for m in members]

    @staticmethod
    def _member_id(path):
        """Changes when the checkpoint file is rewritten, so stale saved logits are never reused."""
        text = os.path.abspath(path)
        if os.path.isfile(path):
            stat = os.stat(path)
            text += f"|{stat.st_size}|{stat.st_mtime_ns}"
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
            chunks = [out.float().cpu().numpy() for out, _ in member_forward(
                [self.members[i].model for i in todo], split.dataset, self.batch_size, self.device,
                desc=f"logits {split.key}")]
            fresh = np.concatenate(chunks, axis=1)
            for j, i in enumerate(todo):
                cached[i] = fresh[j]
                if self.directory:
                    os.makedirs(self.directory, exist_ok=True)
                    _atomic_write(self._disk_path(i, split.key), lambda f, a=fresh[j]: np.save(f, a), "wb")
        result = (np.stack(cached), labels)
        self.store[split.key] = result
        return result

    def drop(self, key):
        self.store.pop(key, None)


# -------------------------------------------------------------------------------------- results
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


def _atomic_write(path, write, mode="w"):
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
    _atomic_write(json_path, lambda f: f.write(text + "\n"))
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
    _atomic_write(os.path.join(save_dir, f"{name}.csv"), lambda f: f.write(buffer.getvalue()))
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


def open_run(args, min_members=1):
    """Seed, device and members: the start every measure script shares."""
    set_seed(args.seed)
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UserError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")
    device = select_device(args.device)
    members, spec = load_members(args, device, min_members=min_members)
    print(f"{len(members)} member(s): {spec['model']} width {spec['width']}, {spec['num_classes']} classes, "
          f"on {device}", flush=True)
    return device, members, spec


def ensemble_summary(directory, seeds, splits, device, eval_batch_size=500, which="best"):
    """Print each member's and the ensemble's validation and test accuracy (main.py --evaluate).

    Members are ``<directory>/seed_<s>/model_best.pth.tar`` (``checkpoint.pth.tar`` where no best
    file exists). Returns {split: ensemble_report}.
    """
    from utils import metrics
    paths = []
    for seed in seeds:
        path = os.path.join(directory, f"seed_{seed}", CHECKPOINT_FILES[which])
        if not os.path.isfile(path):
            path = os.path.join(directory, f"seed_{seed}", CHECKPOINT_FILES["last"])
        paths.append(path)
    members, _ = load_member_files(paths, splits.info.name, device)
    models = [member.model for member in members]
    out = {}
    for name in ("val", "test"):
        dataset = getattr(splits, name)
        chunks = [z.float().cpu().numpy() for z, _ in member_forward(models, dataset, eval_batch_size, device)]
        report = metrics.ensemble_report(np.concatenate(chunks, axis=1), np.asarray(dataset.labels))
        members = " ".join(f"{a:.4f}" for a in report["individual_accuracy"])
        print(f"{name:4s}: ensemble acc {report['ensemble_accuracy']:.4f} nll {report['ensemble_loss']:.4f} | "
              f"members {members} (mean {report['average_individual_accuracy']:.4f})", flush=True)
        out[name] = report
    return out
