"""What the three measure_*.py scripts share on the command line: flags, modes, the start of a run."""
import random

import numpy as np
import torch

from measure.loading import CHECKPOINT_FILES, load_members
from measure.result_files import check_output_folder
from training.accel import FastPath, add_fast_path_args, check_fast_path
from utils.args import add_data_args, add_device_args, add_model_args, make_parser
from utils.device import apply_cudnn, select_device
from utils.errors import UserError


# Ctrl-C in a script that keeps finished splits in <save>/<mode>.partial.json (run_main's ``interrupted``).
SPLITS_INTERRUPTED = ("interrupted: the splits measured so far are kept in <save>/<mode>.partial.json; "
                      "rerun the same command to continue from them")


def build_parser(description, modes, default_mode, eval_batch_size, eval_batch_help="images per forward pass",
                 fast_path=False):
    """Parser with the shared groups (data, model, device) and the measurement flags; ``fast_path``
    adds --amp/--channels_last/--compile (for scripts that only run forward passes)."""
    parser = make_parser(description)
    add_data_args(parser, flag="--dataset")
    add_model_args(parser)
    add_device_args(parser)
    if fast_path:
        add_fast_path_args(parser)
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
    group.add_argument("--allow_incomplete", action="store_true",
                       help="measure an ensemble with a missing seed_<s>/ folder or a member that stopped before "
                            "its planned epochs (refused by default; the result files record it)")
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


def open_run(args, min_members=1):
    """Seed, output folders, device and members: the start every measure script shares, all
    checked before the first long pass."""
    set_seed(args.seed)
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise UserError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")
    for flag in ("save", "logits_dir"):
        if getattr(args, flag, None):
            check_output_folder(getattr(args, flag), f"--{flag}")
    device = select_device(args.device)
    check_fast_path(args, device)
    apply_cudnn(args.cudnn)  # process-wide, before any model exists
    members, spec = load_members(args, device, min_members=min_members)
    fast = FastPath.from_args(args, device)  # nothing unless the script offers the flags and they are given
    for member in members:
        fast.prepare(member.model)
    print(f"{len(members)} member(s): {spec['model']} width {spec['width']}, {spec['num_classes']} classes, "
          f"on {device}", flush=True)
    return device, members, spec
