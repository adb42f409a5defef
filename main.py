"""Train an ensemble (one member per seed): deep ensemble, DE + SAM, or SharpBalance.

    python main.py --data digits --seed 13 17 27 --epochs 30 --save_path runs/de
    python main.py --data digits --seed 13 17 27 --epochs 30 --sam True --rho 0.05 --save_path runs/sam
    python main.py --data digits --seed 13 17 27 --epochs 30 --sam True --rho 0.05 \\
        --flat_ratio 0.5 --initial_epochs 14 --save_path runs/sharpbalance

Rerunning the same command resumes every member from its last completed epoch. Several processes:
``torchrun --nproc_per_node=K main.py ...`` spreads the members over K ranks (round-robin).
"""
import math
import os
import sys

from data import build_datasets
from training.accel import add_fast_path_args, add_training_fast_path_args, check_fast_path
from training.scores import SCORE_BACKENDS
from training.method import method_name
from training.partition import SELECT_CHOICES, SPLIT_RULE_CHOICES, TRAIN_SUBSET_CHOICES
from utils.args import add_data_args, add_device_args, add_model_args, make_parser, parse_seeds, str2bool
from utils.device import apply_cudnn, select_device
from utils.distributed import barrier, destroy, dist_env, init_distributed
from utils.errors import UserError, run_main


def get_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, flag="--data")
    add_model_args(parser)
    add_device_args(parser)
    add_training_fast_path_args(add_fast_path_args(parser))
    opt = parser.add_argument_group("optimisation (released defaults)")
    opt.add_argument("--epochs", type=int, default=200, help="training epochs per member")
    opt.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate")
    opt.add_argument("--lrsche", default="multistep", choices=("multistep", "cosine"),
                     help="multistep: x0.1 at epochs/2 and 3*epochs/4; cosine over all epochs")
    opt.add_argument("--batch_size", type=int, default=128, help="training images per step")
    opt.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=500,
                     help="images per forward pass when validating and scoring")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, in [0, 1)")
    opt.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay (L2), >= 0")
    sb = parser.add_argument_group("SAM and SharpBalance")
    sb.add_argument("--sam", type=str2bool, default=False, metavar="{True,False}", help="train with SAM")
    sb.add_argument("--rho", type=float, default=0.05, help="SAM neighbourhood radius")
    sb.add_argument("--flat_ratio", type=float, default=0.0,
                    help="SharpBalance: fraction k of samples each member marks (0 = plain DE / DE+SAM)")
    sb.add_argument("--initial_epochs", type=int, default=-1,
                    help="SAM on all data for initial_epochs+1 epochs, then partition once")
    sb.add_argument("--train_subset", default="boosting", choices=TRAIN_SUBSET_CHOICES,
                    help="boosting = SharpBalance; random / same = the paper's ablations")
    sb.add_argument("--select", default="flattest", choices=SELECT_CHOICES,
                    help="flattest = released code; sharpest = the paper's Figure 6 reading")
    sb.add_argument("--split_rule", default="auto", choices=SPLIT_RULE_CHOICES,
                    help="leftover samples: auto = boost for cifar10, share otherwise (released)")
    sb.add_argument("--freeze_bn_on_perturbed", type=str2bool, default=False, metavar="{True,False}",
                    help="keep BatchNorm running statistics fixed on SAM's perturbed pass (release: False)")
    sb.add_argument("--score_chunk", type=int, default=64, help="samples per chunk when scoring")
    sb.add_argument("--score_backend", default="func", choices=SCORE_BACKENDS,
                    help="per-sample squared gradient norms: func = torch.func vmap(grad); hooks = exact "
                         "per-layer norms from one batched backward (faster on a CPU, see benchmarks/README.md); "
                         "auto = hooks where exact")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", nargs="+", default=["13", "17", "27"],
                     help='one member per seed: --seed 13 17 27 or --seed "13 17 27"')
    run.add_argument("--save_path", default=None, help="run directory (default: runs/<data>_<method>)")
    run.add_argument("--resume", default=None,
                     help="a run to continue in a fresh --save_path (its files are copied in after the checks), "
                          "or, with --evaluate, the run to evaluate (default: --save_path; rerunning resumes)")
    run.add_argument("--evaluate", action="store_true", help="only evaluate the checkpoints (val and test)")
    run.add_argument("--print-freq", dest="print_freq", type=int, default=50,
                     help="the progress bars are redrawn every this many batches")
    run.add_argument("--no_progress", action="store_true", help="no progress bars (one summary line per epoch)")
    return parser


def check_args(args):
    try:
        args.seeds = parse_seeds(args.seed)
    except Exception as err:  # noqa: BLE001
        raise UserError(str(err)) from None
    if not args.seeds:
        raise UserError("--seed needs at least one seed")
    outside = [s for s in args.seeds if not 0 <= s < 2 ** 32]
    if outside:
        raise UserError(f"--seed {outside[0]} is out of range: seeds are integers from 0 to {2 ** 32 - 1} "
                        "(numpy seeds each member's initialisation with it)")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seed has duplicates ({' '.join(map(str, args.seeds))}); members need distinct seeds")
    method = method_name(args)  # refuses a --flat_ratio outside [0, 1), or one without --sam True
    for flag in ("lr", "momentum", "weight_decay", "rho"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise UserError(f"--{flag} must be >= 0 (and finite), got {getattr(args, flag)}")
    if args.momentum >= 1:
        raise UserError(f"--momentum must be < 1 (SGD momentum), got {args.momentum}")
    for flag in ("epochs", "batch_size", "eval-batch-size", "score_chunk", "width", "print-freq"):
        value = getattr(args, flag.replace("-", "_"))
        if value < 1:
            raise UserError(f"--{flag} must be a positive integer, got {value}")
    if method == "sharpbalance" and args.initial_epochs + 1 >= args.epochs:
        raise UserError(f"--initial_epochs {args.initial_epochs} with --epochs {args.epochs}: the SharpBalance "
                        "partition happens after initial_epochs+1 epochs and would never happen; "
                        f"use --initial_epochs < {args.epochs - 1}")
    if args.initial_epochs < -1:
        raise UserError(f"--initial_epochs must be >= -1, got {args.initial_epochs}")
    if args.save_path is None:
        args.save_path = os.path.join("runs", f"{args.data}_{method}")


def load_splits(args, rank, world_size):
    """Rank 0 loads first (downloading CIFAR if needed); the other ranks wait for it, then read its files."""
    if rank != 0:
        barrier(world_size)
    splits = build_datasets(args.data, args.data_path, tiny_val=args.tiny_val, download=(rank == 0))
    if rank == 0:
        barrier(world_size)
    return splits


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    device = select_device(args.device, local_rank=dist_env()[2])
    check_fast_path(args, device)
    apply_cudnn(args.cudnn)  # process-wide, before any model exists
    rank, world_size = init_distributed(device, args.device)
    try:
        splits = load_splits(args, rank, world_size)
        if args.evaluate:
            # Loading and ensemble prediction are shared with the measure scripts.
            from measure.loading import ensemble_summary
            return ensemble_summary(args.resume or args.save_path, args.seeds, splits, device,
                                    eval_batch_size=args.eval_batch_size)
        from training.trainer import run_training
        run_training(args, splits, device, rank, world_size)
    finally:
        destroy(world_size)
    if rank == 0:
        print(f"done: checkpoints and logs in {args.save_path}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
