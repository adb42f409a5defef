"""Finding and loading the members of a trained ensemble.

``--resume`` takes checkpoint files and/or run directories written by main.py. A run directory
``<save_path>`` contributes ``seed_<s>/model_best.pth.tar`` (``--checkpoint best``, default) or
``seed_<s>/checkpoint.pth.tar`` (``--checkpoint last``) for every ``seed_<s>`` folder, in
increasing seed order; a ``seed_<s>`` folder itself contributes its one file. Architecture,
width, dataset and class count come from the checkpoint (main.py stores them); checkpoints
without them (older or foreign files holding only ``state_dict``) fall back to --model,
--width and --dataset. Members must agree on architecture, width and class count.

Completeness: a run directory's seeds and epochs are those it was started with (args.json, and the
run arguments every checkpoint records, so a deleted member folder is noticed without args.json:
utils.run_folder.run_plan). A measurement lists every member with the epoch of its weights and how
far it trained, and refuses an ensemble with a missing ``seed_<s>/`` folder or a member that stopped
before the planned epochs (``--allow_incomplete`` measures it anyway, and the result files record
what was measured). Every file is checked before it is loaded: intact (zip CRCs), in its own member's
folder, and a model_best that is the best epoch its checkpoint records.
"""
import os
import sys
from collections import namedtuple

import numpy as np

from utils import run_folder
from utils.errors import UserError
from utils.run_folder import CHECKPOINT_FILES

# One loaded member of an ensemble (training/trainer.py's Member is a member being trained).
# epoch: the epoch the weights are from; trained: epochs the member completed (checkpoint.pth.tar);
# planned: epochs the run was started with (None when unknown).
LoadedMember = namedtuple("LoadedMember", "path model seed epoch trained planned", defaults=(None, None, None))


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
        seed_dirs = list(run_folder.member_folders(entry).values())
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


def _progress(path, state, plans):
    """(trained, planned) epochs of the member whose checkpoint ``path`` holds ``state``.

    trained: the epoch of the member's last checkpoint (``checkpoint.pth.tar`` beside a best file);
    planned: the run's planned epochs (``run_folder.run_plan``, cached per run in ``plans``), else the
    run arguments main.py stores in the checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    trained = state.get("epoch")
    last = os.path.join(folder, run_folder.CHECKPOINT_NAME)
    if os.path.basename(path) == run_folder.BEST_NAME and os.path.isfile(last):
        problem = run_folder.best_problem(folder)
        if problem is not None and problem[0] == "behind":
            raise UserError(f"{problem[1]} (training was interrupted between the two writes); rerun the training "
                            "command once: it repairs model_best")
        if problem is not None:
            raise UserError(f"{problem[1]}: the file was replaced outside training; restore it, or measure "
                            "--checkpoint last")
        trained = run_folder.read_checkpoint(last, mmap=True).get("epoch", trained)
    planned = None
    if run_folder.seed_of(folder) is not None:
        run = os.path.dirname(folder)
        if run not in plans:
            plans[run] = run_folder.run_plan(run)
        planned = plans[run][1]
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
    members, specs, plans = [], [], {}
    for path in paths:
        state = run_folder.read_checkpoint(path)
        run_folder.check_member_seed(path, state)
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
        members.append(LoadedMember(path, net.to(device).eval(), state.get("seed"), epoch,
                                    *_progress(path, state, plans)))
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
    """What makes the ensemble incomplete: seeds that a run planned (its args.json, or the run
    arguments its checkpoints record) but that have no ``seed_<s>/`` folder, and members that
    trained fewer epochs than planned."""
    gaps = []
    for entry in resume:
        if not os.path.isdir(entry) or run_folder.seed_of(entry) is not None:
            continue
        seeds, _ = run_folder.run_plan(entry)
        present = set(run_folder.member_folders(entry))
        missing = [s for s in seeds or [] if s not in present]
        if missing:
            source = "its args.json lists" if run_folder.read_args(entry) is not None else \
                "its members' checkpoints record"
            gaps.append(f"'{entry}' has no {', '.join(f'seed_{s}/' for s in missing)} "
                        f"({source} seeds {' '.join(map(str, seeds))})")
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
        path = run_folder.member_file(directory, seed, CHECKPOINT_FILES[which])
        if not os.path.isfile(path):
            path = run_folder.member_file(directory, seed, run_folder.CHECKPOINT_NAME)
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
