"""Accuracy, calibration and diversity of an ensemble on validation, test and the -C set.

    python measure_diversity.py --dataset cifar10 --data_path ./datasets --model resnet18 \\
        --resume runs/sharpbalance --mode predict,disagreement,KL --save results/sharpbalance

Modes (comma-separated):
  predict       per member and ensemble (probability averaging): accuracy, NLL, ECE (15 bins), Brier
  disagreement  pairwise disagreement matrix, mean disagreement, DER, EIR
  KL            pairwise KL(p_i || p_j) matrix between members' predictive distributions
The eval sets are: val, test, then each (corruption, severity) cell of the -C set, summarised per
corruption, per severity and over all cells (OOD = unweighted mean of the cells). The logits of each
member on each eval set are computed once and shared by all modes. Output: <save>/<mode>.json and
.csv, written when every eval set is done; until then <save>/<mode>.partial.json keeps the finished
ones, and rerunning the same command continues from them.
"""
import itertools

from tqdm import tqdm

from measure import cli, forward, inputs, metrics, result_files
from utils.errors import run_main

# mode -> (report of one eval set from (logits, labels), how cells combine, members needed)
MODES = {
    "predict": (metrics.ensemble_report, metrics.mean_reports, 1),
    "disagreement": (metrics.diversity_report, metrics.mean_diversity_reports, 2),
    "KL": (lambda logits, labels: metrics.kl_report(logits), metrics.mean_reports, 2),
}
HEADLINE = {"predict": ("ensemble_accuracy", "average_individual_accuracy"),
            "disagreement": ("mean_disagreement", "DER"), "KL": ("mean_kl",)}


def get_parser():
    parser, group = cli.build_parser(__doc__, tuple(MODES), "predict,disagreement", 200, fast_path=True)
    inputs.add_corruption_args(group)
    group.add_argument("--logits_dir", default=None,
                       help="also keep every member's logits here as .npy and reuse them on later runs")
    return parser


def measure(args, modes, members, device, corruptions, partials):
    """Run every eval set once through every member; return {mode: (clean reports, cell list)}.

    An eval set already in every mode's partial file (same data files) is not run again; every fresh
    report goes to its mode's partial file."""
    cache = forward.LogitCache(members, device, args.eval_batch_size, args.logits_dir)
    clean = {mode: {} for mode in modes}
    cells = {mode: [] for mode in modes}
    eval_sets = itertools.chain(inputs.clean_splits(args), inputs.corrupted_splits(args, corruptions))
    try:
        for eval_set in tqdm(eval_sets, total=2 + 5 * len(corruptions), desc="eval sets"):
            sources = inputs.source_stats(eval_set)
            reports = {mode: partials[mode].get(eval_set.key, sources) for mode in modes}
            for mode in [m for m in modes if reports[m] is None]:
                logits, labels = cache.get(eval_set)
                reports[mode] = MODES[mode][0](logits, labels)
                partials[mode].add(eval_set.key, sources, reports[mode])
            for mode in modes:
                if eval_set.kind == "cell":
                    cells[mode].append((eval_set.corruption, eval_set.severity, reports[mode]))
                else:
                    clean[mode][eval_set.key] = reports[mode]
            cache.drop(eval_set.key)
    finally:  # also on Ctrl-C or an error: every finished eval set goes to disk
        for partial in partials.values():
            partial.flush()
    return {mode: (clean[mode], cells[mode]) for mode in modes}


def main(argv=None):
    args = get_parser().parse_args(argv)
    modes = cli.parse_modes(args.mode, tuple(MODES))
    corruptions = inputs.corruption_selection(args)
    inputs.check_corruption_files(args, corruptions)
    modes, keys = cli.modes_to_measure(args, modes, inputs.data_sources(args, corruptions))
    if not modes:
        return
    device, members, spec = cli.open_run(args, min_members=max(MODES[m][2] for m in modes))
    meta = result_files.run_metadata(args, __file__, members, spec, device, corruptions=corruptions,
                                     ensemble_rule="mean of member softmax probabilities", ece_bins=metrics.ECE_BINS)
    partials = {mode: result_files.partial_results(args, members, mode, meta) for mode in modes}
    results = measure(args, modes, members, device, corruptions, partials)
    for mode in modes:
        clean, cells = results[mode]
        summary = metrics.summarise_cells(cells, MODES[mode][1])
        payload = dict(meta=dict(meta, mode=mode), **clean, corruptions=summary)
        result_files.write_results(args.save, mode, payload, result_files.summary_rows(mode, clean, summary),
                                   key=keys[mode])
        for name, report in list(clean.items()) + ([("ood", summary["ood"])] if summary else []):
            values = ", ".join(f"{key} {report[key]:.4f}" for key in HEADLINE[mode])
            print(f"{mode:12s} {name:4s}: {values}", flush=True)
    for partial in partials.values():  # every result file is written: the partial ones have served
        partial.finish()


if __name__ == "__main__":
    run_main(main, interrupted=cli.EVAL_SETS_INTERRUPTED)
