"""Diversity as the variance of the members' logits, on corrupted or clean test images.

    python measure_diversity_variance.py --dataset cifar10 --data_path ./datasets --model resnet18 \\
        --resume runs/sharpbalance --mode variance_mse_c --save results/sharpbalance

Modes (comma-separated):
  variance_mse_c  V = (1/n) Σ_x Σ_c (1/(M−1)) Σ_m (z_mc(x) − z̄_c(x))² over every corrupted test
                  image (all corruptions × 5 severities), also per corruption, severity and cell
  variance_mse    the same on the clean test set
The data are streamed: each batch goes through all members and is reduced at once, so memory does
not grow with the number of images. Output: <save>/<mode>.json and .csv, written when every eval set
is done; until then <save>/<mode>.partial.json keeps each finished eval set's sums, and rerunning the
same command continues from them.
"""
from tqdm import tqdm

from measure import cli, forward, inputs, metrics, result_files
from utils.errors import UserError, run_main

MODES = ("variance_mse_c", "variance_mse")


def get_parser():
    parser, group = cli.build_parser(__doc__, MODES, "variance_mse_c", 200, fast_path=True)
    inputs.add_corruption_args(group)
    return parser


def stream_variance(eval_sets, members, device, batch_size, partial, total=None):
    """VarianceAccumulator over ``eval_sets``, keyed by their keys; one pass, constant memory. Each
    eval set's sums go to ``partial`` when it is done, and one found there is not run again."""
    models = [m.model for m in members]
    accumulator = metrics.VarianceAccumulator()
    try:
        for eval_set in tqdm(eval_sets, total=total, desc="eval sets"):
            sources = inputs.source_stats(eval_set)
            done = partial.get(eval_set.key, sources)
            if done is not None:
                if done["count"]:  # an empty eval set adds no key, as update() would not
                    accumulator.totals[eval_set.key], accumulator.counts[eval_set.key] = done["total"], done["count"]
                continue
            for logits, _ in forward.member_forward(models, eval_set.dataset, batch_size, device,
                                                    desc=f"variance {eval_set.key}"):
                accumulator.update(eval_set.key, logits.double().cpu().numpy())
            partial.add(eval_set.key, sources, {"total": accumulator.totals.get(eval_set.key, 0.0),
                                             "count": accumulator.counts.get(eval_set.key, 0)})
    finally:  # also on Ctrl-C or an error: every finished eval set goes to disk
        partial.flush()
    return accumulator


def _recording(eval_sets, cells):
    """Pass the eval sets through, noting (key, corruption, severity) of each."""
    for eval_set in eval_sets:
        cells.append((eval_set.key, eval_set.corruption, eval_set.severity))
        yield eval_set


def pooled(accumulator, keys):
    total = sum(accumulator.totals[k] for k in keys)
    count = sum(accumulator.counts[k] for k in keys)
    return total / count if count else float("nan")


def corrupted_payload(accumulator, cells):
    by_corruption, by_severity = {}, {}
    for key, corruption, severity in cells:
        by_corruption.setdefault(corruption, []).append(key)
        by_severity.setdefault(str(severity), []).append(key)
    overall, per_key, n = accumulator.result()
    return {"variance_unbias": overall, "n": n,
            "per_corruption": {c: pooled(accumulator, ks) for c, ks in by_corruption.items()},
            "per_severity": {s: pooled(accumulator, ks) for s, ks in sorted(by_severity.items())},
            "cells": per_key}


def measure_corrupted(args, members, device, corruptions, partial):
    """variance_mse_c: pooled over all cells, per corruption, per severity and per cell; tidy rows."""
    mode, cells = "variance_mse_c", []
    accumulator = stream_variance(_recording(inputs.corrupted_splits(args, corruptions), cells),
                                  members, device, args.eval_batch_size, partial, total=5 * len(corruptions))
    result = corrupted_payload(accumulator, cells)
    rows = [dict(mode=mode, split="ood", metric="variance_unbias", value=result["variance_unbias"])]
    rows += [dict(mode=mode, split="corruption", corruption=c, metric="variance_unbias", value=v)
             for c, v in result["per_corruption"].items()]
    rows += [dict(mode=mode, split="severity", severity=s, metric="variance_unbias", value=v)
             for s, v in result["per_severity"].items()]
    rows += [dict(mode=mode, split="cell", corruption=c, severity=s, metric="variance_unbias",
                  value=result["cells"][k]) for k, c, s in cells]
    return result, rows


def measure_clean(args, members, device, partial):
    """variance_mse: the clean test set."""
    accumulator = stream_variance(inputs.clean_splits(args, which=("test",)), members, device,
                                  args.eval_batch_size, partial)
    overall, _, n = accumulator.result()
    rows = [dict(mode="variance_mse", split="test", metric="variance_unbias", value=overall)]
    return {"variance_unbias": overall, "n": n}, rows


def main(argv=None):
    args = get_parser().parse_args(argv)
    modes = cli.parse_modes(args.mode, MODES)
    corruptions = inputs.corruption_selection(args) if "variance_mse_c" in modes else []
    if "variance_mse_c" in modes and not corruptions:
        raise UserError("variance_mse_c needs the -C set; drop --corruptions none or use --mode variance_mse")
    inputs.check_corruption_files(args, corruptions)
    modes, keys = cli.modes_to_measure(args, modes, inputs.data_sources(args, corruptions))
    if not modes:
        return
    device, members, spec = cli.open_run(args, min_members=2)
    meta = result_files.run_metadata(args, __file__, members, spec, device,
                                 definition="mean over inputs of the sum over classes of the unbiased "
                                            "(1/(M-1)) variance of the raw logits across members")
    # The clean test set first: it is short, and reading it checks the clean data files before the
    # long -C pass (the -C files are checked above). Partial files go only when every mode is done,
    # so an interrupted run's rerun measures nothing twice.
    partials = {mode: result_files.partial_results(args, members, mode, meta) for mode in modes}
    for mode in sorted(modes, key=lambda m: m != "variance_mse"):
        partial = partials[mode]
        if mode == "variance_mse_c":
            result, rows = measure_corrupted(args, members, device, corruptions, partial)
            payload = dict(meta=dict(meta, mode=mode, corruptions=corruptions), **result)
        else:
            result, rows = measure_clean(args, members, device, partial)
            payload = dict(meta=dict(meta, mode=mode), **result)
        result_files.write_results(args.save, mode, payload, rows, key=keys[mode])
        print(f"{mode}: variance {result['variance_unbias']:.6g} over {result['n']} images", flush=True)
    for partial in partials.values():
        partial.finish()


if __name__ == "__main__":
    run_main(main, interrupted=cli.EVAL_SETS_INTERRUPTED)
