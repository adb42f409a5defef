"""The data a measurement runs over: the clean splits and the cells of the corrupted (-C) set."""
import os
from collections import namedtuple

from utils.errors import UserError

Split = namedtuple("Split", "key kind corruption severity dataset")


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
