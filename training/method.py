"""Which method a command trains, derived from ``--sam`` and ``--flat_ratio`` here and nowhere else.

    --sam False                      deep_ensemble   plain SGD steps
    --sam True --flat_ratio 0        sam             SAM on every sample (DE + SAM)
    --sam True --flat_ratio > 0      sharpbalance    SAM on every sample for initial_epochs + 1 epochs,
                                                     then the partition and the mixed step

main.py checks a command with ``method_name`` (a flat_ratio outside [0, 1), or one without SAM, is
refused there with one line); the trainer, the run folder and the checkpoints use the same names.
"""
from training.partition import check_flat_ratio
from utils.errors import UserError

METHODS = ("deep_ensemble", "sam", "sharpbalance")


def method_name(args):
    """``deep_ensemble``, ``sam`` or ``sharpbalance`` for ``args`` (anything with ``sam`` and
    ``flat_ratio``); a ``UserError`` for a flat_ratio outside [0, 1) or a positive one without SAM."""
    check_flat_ratio(args.flat_ratio)
    if not args.sam:
        if args.flat_ratio > 0:
            raise UserError("--flat_ratio > 0 is SharpBalance, which needs --sam True")
        return "deep_ensemble"
    return "sharpbalance" if args.flat_ratio > 0 else "sam"


def partition_epoch(args):
    """The epoch at whose start SharpBalance partitions the data, or None when it never does.

    The release checks ``epoch - 1 == initial_epochs`` at the start of each (0-indexed) epoch, so the
    partition follows initial_epochs + 1 epochs of SAM on all data (epoch 0 when initial_epochs = -1).
    """
    return args.initial_epochs + 1 if method_name(args) == "sharpbalance" else None
