"""The data a measurement runs over: the clean splits and the cells of the corrupted (-C) set.

Each ``Split`` carries the files it was read from (``sources``), so a rerun can tell whether a
split measured before (kept in ``<save>/<mode>.partial.json``) still describes the same data.
"""
from collections import namedtuple

from utils.errors import UserError
from utils.run_folder import fingerprint

Split = namedtuple("Split", "key kind corruption severity dataset sources", defaults=((),))


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
    """Check every selected -C input before any long pass (headers and folder listings only, see
    ``data.datasets.check_corrupted_files``); a problem is one error line naming the file."""
    if not corruptions:
        return
    from data.datasets import check_corrupted_files
    try:
        check_corrupted_files(args.dataset, args.data_path, args.corrupt_path, corruptions)
    except UserError as err:
        raise UserError(f"{err} (use --corruptions to measure the others)") from None


def source_stats(split):
    """The fingerprint (path, size, modification time) of every file a split was read from: equal
    fingerprints = same data."""
    return [fingerprint(path) for path in split.sources]


def data_sources(args, corruptions=()):
    """Every file (folder for Tiny-ImageNet) a measurement reads: the clean splits' and the selected
    -C cells' (listing them reads no pixels)."""
    from data.datasets import clean_sources, corrupted_sources
    sources = list(clean_sources(args.dataset, args.data_path))
    for corruption in corruptions:
        for severity in range(1, 6):
            sources += corrupted_sources(args.dataset, args.data_path, args.corrupt_path, corruption, severity)
    return sources


def clean_splits(args, which=("val", "test")):
    from data import build_datasets
    from data.datasets import clean_sources
    splits = build_datasets(args.dataset, args.data_path, tiny_val=args.tiny_val)
    sources = clean_sources(args.dataset, args.data_path)
    for name in which:
        yield Split(name, name, None, None, getattr(splits, name), sources)


def corrupted_splits(args, corruptions):
    if not corruptions:
        return
    from data import corrupted_test_sets
    from data.datasets import corrupted_sources
    for corruption, severity, dataset in corrupted_test_sets(args.dataset, args.data_path, args.corrupt_path,
                                                             corruptions=corruptions):
        sources = corrupted_sources(args.dataset, args.data_path, args.corrupt_path, corruption, severity)
        yield Split(f"{corruption}_{severity}", "cell", corruption, severity, dataset, sources)
