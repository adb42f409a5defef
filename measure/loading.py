"""Finding and loading the members of a trained ensemble.

``--resume`` takes checkpoint files and/or run directories written by main.py. A run directory
``<save_path>`` contributes ``seed_<s>/model_best.pth.tar`` (``--checkpoint best``, default) or
``seed_<s>/checkpoint.pth.tar`` (``--checkpoint last``) for every ``seed_<s>`` folder, in
increasing seed order; a ``seed_<s>`` folder itself contributes its one file. Architecture,
width, dataset and class count come from the checkpoint (main.py stores them); checkpoints
without them (older or foreign files holding only ``state_dict``) fall back to --model,
--width and --dataset. Members must agree on architecture, width and class count.

Completeness: a run directory's ``args.json`` names the seeds and epochs it was started with. A
measurement lists every member with the epoch of its weights and how far it trained, and refuses an
ensemble with a missing ``seed_<s>/`` folder or a member that stopped before the planned epochs
(``--allow_incomplete`` measures it anyway, and the result files record what was measured).
"""
import glob
import json
import os
import re
import sys
from collections import namedtuple

import numpy as np

from utils.checkpoint import load_checkpoint
from utils.errors import UserError

CHECKPOINT_FILES = {"best": "model_best.pth.tar", "last": "checkpoint.pth.tar"}
# epoch: the epoch the weights are from; trained: epochs the member completed (checkpoint.pth.tar);
# planned: epochs the run was started with (None when unknown).
Member = namedtuple("Member", "path model seed epoch trained planned", defaults=(None, None, None))


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
    from models.resnet_tiny import has_shortcut_scales
    # Tiny-ImageNet ResNet18 with or without the released shortcut scales: the weights say which.
    model = create_model(spec["model"], spec["num_classes"], width=spec["width"], dataset=dataset,
                         shortcut_scale=has_shortcut_scales(state["state_dict"]))
    try:
        model.load_state_dict(_strip_prefix(state["state_dict"]))
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in lines[:2])
        raise UserError(f"checkpoint '{path}' does not fit {spec['model']} (width {spec['width']}, "
                        f"{spec['num_classes']} classes): {detail[:200]}") from None
    return model


def run_plan(run_dir):
    """(seeds, epochs) that ``<run_dir>/args.json`` (written by main.py) names; None where unknown."""
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, None
    seeds = record.get("seeds")
    epochs = record.get("epochs")
    return ([int(s) for s in seeds] if isinstance(seeds, list) else None,
            int(epochs) if isinstance(epochs, int) else None)


def _progress(path, state):
    """(trained, planned) epochs of the member whose checkpoint ``path`` holds ``state``.

    trained: the epoch of the member's last checkpoint (``checkpoint.pth.tar`` beside a best file);
    planned: the run's ``args.json`` epochs, else the run arguments main.py stores in the checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    trained = state.get("epoch")
    last = os.path.join(folder, CHECKPOINT_FILES["last"])
    if os.path.basename(path) == CHECKPOINT_FILES["best"] and os.path.isfile(last):
        last_state = load_checkpoint(last, mmap=True)
        trained = last_state.get("epoch", trained)
        # main.py records the best epoch in the checkpoint and writes it before model_best: a kill in
        # between leaves model_best behind until the training command runs again (it repairs it).
        if last_state.get("best_epoch") not in (None, 0, state.get("epoch")):
            raise UserError(f"'{path}' holds epoch {state.get('epoch')}, but '{last}' records epoch "
                            f"{last_state['best_epoch']} as the best (training was interrupted between the two "
                            "writes); rerun the training command once: it repairs model_best")
    planned = run_plan(os.path.dirname(folder))[1] if _seed_of(folder) is not None else None
    run_args = state.get("run_args") if isinstance(state.get("run_args"), dict) else {}
    if planned is None and isinstance(run_args.get("epochs"), int):
        planned = run_args["epochs"]
    return (int(trained) if trained is not None else None), planned


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
        epoch = int(state["epoch"]) if state.get("epoch") is not None else None
        members.append(Member(path, net.to(device).eval(), state.get("seed"), epoch, *_progress(path, state)))
    return members, specs[0]


def describe_member(member):
    """One line: which file, the epoch of its weights, how far the member trained."""
    seed = f"seed {member.seed}" if member.seed is not None else "member"
    weights = f"weights of epoch {member.epoch}" if member.epoch is not None else "epoch unknown"
    if member.trained is None:
        trained = ""
    elif member.planned is None:
        trained = f", trained {member.trained} epochs (planned count unknown)"
    else:
        trained = f", trained {member.trained} of {member.planned} epochs"
    return f"{seed}: {member.path} ({weights}{trained})"


def ensemble_gaps(resume, members):
    """What makes the ensemble incomplete: seeds that a run's args.json lists but that have no
    ``seed_<s>/`` folder, and members that trained fewer epochs than planned."""
    gaps = []
    for entry in resume:
        if not os.path.isdir(entry) or _seed_of(entry) is not None:
            continue
        seeds, _ = run_plan(entry)
        present = {_seed_of(d) for d in glob.glob(os.path.join(entry, "seed_*")) if os.path.isdir(d)}
        missing = [s for s in seeds or [] if s not in present]
        if missing:
            gaps.append(f"'{entry}' has no {', '.join(f'seed_{s}/' for s in missing)} "
                        f"(its args.json lists seeds {' '.join(map(str, seeds))})")
    for member in members:
        if member.planned is not None and member.trained is not None and member.trained < member.planned:
            gaps.append(f"seed {member.seed} stopped after epoch {member.trained} of {member.planned} "
                        f"({os.path.dirname(member.path)})")
    return gaps


def load_members(args, device, min_members=1):
    """The members named by ``--resume`` (see the module docstring), checked to form one complete
    ensemble; prints one line per member. ``spec['incomplete']`` lists what is missing (allowed only
    with ``--allow_incomplete``)."""
    paths = find_member_checkpoints(args.resume, args.checkpoint)
    if len(paths) < min_members:
        raise UserError(f"mode '{args.mode}' compares members and needs at least {min_members} models; "
                        f"--resume gave {len(paths)} ({', '.join(paths)})")
    members, spec = load_member_files(paths, args.dataset, device, model=args.model, width=args.width)
    for member in members:
        print(f"member {describe_member(member)}", flush=True)
    gaps = ensemble_gaps(args.resume, members)
    if gaps and not getattr(args, "allow_incomplete", False):
        raise UserError(f"incomplete ensemble: {'; '.join(gaps)}. Finish training (rerun the same main.py "
                        "command), or pass --allow_incomplete to measure the members as they are")
    if gaps:
        print(f"warning: measuring an incomplete ensemble (--allow_incomplete): {'; '.join(gaps)}",
              file=sys.stderr, flush=True)
    return members, dict(spec, incomplete=gaps)


def ensemble_summary(directory, seeds, splits, device, eval_batch_size=500, which="best"):
    """Print each member's and the ensemble's validation and test accuracy (main.py --evaluate).

    Members are ``<directory>/seed_<s>/model_best.pth.tar`` (``checkpoint.pth.tar`` where no best
    file exists). Returns {split: ensemble_report}.
    """
    from measure import metrics
    from measure.forward import member_forward
    paths = []
    for seed in seeds:
        path = os.path.join(directory, f"seed_{seed}", CHECKPOINT_FILES[which])
        if not os.path.isfile(path):
            path = os.path.join(directory, f"seed_{seed}", CHECKPOINT_FILES["last"])
        paths.append(path)
    members, _ = load_member_files(paths, splits.info.name, device)
    for member in members:
        print(f"member {describe_member(member)}", flush=True)
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
