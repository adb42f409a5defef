"""What the three measure_*.py scripts share on the command line: flags, modes, the start of a run."""
import random

import numpy as np
import torch

from measure import result_files
from measure.loading import CHECKPOINT_FILES, find_member_checkpoints, load_members
from measure.result_files import check_output_folder
from training.accel import FastPath, add_fast_path_args, check_fast_path
from utils.args import add_data_args, add_device_args, add_model_args, make_parser
from utils.device import apply_cudnn, select_device
from utils.errors import UserError


# Ctrl-C in a script that keeps its finished eval sets in <save>/<mode>.partial.json (run_main's
# ``interrupted``).
EVAL_SETS_INTERRUPTED = ("interrupted: the eval sets measured so far are kept in <save>/<mode>.partial.json; "
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
    group.add_argument("--skip_finished", action="store_true",
                       help="skip a mode whose <save>/<mode>.json was measured with the same arguments from unchanged "
                            "checkpoint and data files (as <mode>.key.json records); scripts/ pass it")
    return parser, group


def parse_modes(text, valid):
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in modes if m not in valid]
    if unknown or not modes:
        raise UserError(f"unknown mode '{unknown[0] if unknown else text}'; valid modes: {', '.join(valid)}")
    return list(dict.fromkeys(modes))


def modes_to_measure(args, modes, sources):
    """The modes to measure and each one's result key (``result_files.result_key``). With
    --skip_finished a mode whose result was measured from the same arguments and files is left out,
    with a line saying so; checked before any model or data is loaded. ``sources``: the data files
    the script reads (``inputs.data_sources``)."""
    check_seed(args)
    paths = find_member_checkpoints(args.resume, args.checkpoint)
    device_type = select_device(args.device).type
    keys = {mode: result_files.result_key(args, mode, paths, sources, device_type) for mode in modes}
    todo = []
    for mode in modes:
        if args.skip_finished and result_files.finished_result(args.save, mode, keys[mode]):
            print(f"skip measuring {mode}: '{args.save}/{mode}.json' was measured with these arguments from the "
                  "same checkpoint and data files", flush=True)
        else:
            todo.append(mode)
    return todo, keys


def check_seed(args):
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed {args.seed} is out of range: use an integer from 0 to {2 ** 32 - 1}")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def open_run(args, min_members=1):
    """Seed, output folders, device and members: the start every measure script shares, all
    checked before the first long pass."""
    check_seed(args)
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
