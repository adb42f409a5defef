"""Figure 7 report: tables and figures from the measurement JSON files of many ensembles.

    python scripts/report.py --results runs/figure7/results --out runs/figure7/report

Reads <results>/<dataset>/<method>/<ensemble>/{predict,disagreement,variance_mse_c,APGD_worst}.json
and fisher.json when present (scripts/figure7.sh writes them) and writes to --out:
  figure7_table.csv / .md    ensemble and mean-individual accuracy, ID (test) and OOD (-C), mean ± std
                             over ensembles, the paper's numbers and the difference; the .md also has
                             the sharpness / diversity table and the list of missing inputs
  diversity_table.csv        sharpness, variance diversity, disagreement per dataset and method
  ensembles.csv              every number of every ensemble
  figure7.png                Figure 7 style: ID (top) and OOD (bottom) per dataset, bars = mean
                             individual accuracy + the ensemble's gain, error bars = std over ensembles
                             (--error_bars ci95: the 95% t-interval of the mean)
  sharpness_diversity.png    Figure 1(c) style: x = sharpness, y = variance diversity, colour =
                             ensemble OOD accuracy, marker = method, one point per ensemble, and each
                             method's mean with 95% t-intervals when it has two or more ensembles
  missing.txt                missing inputs (also printed); missing inputs never stop the report
The reading and the tables are reporting/results.py, the drawing reporting/plots.py; the claims
(scripts/claims.sh) have their own report, python -m reporting.claims_report.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from reporting import plots  # noqa: E402
from reporting import results as rp  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="runs/figure7/results", help="root of the measurement folders")
    parser.add_argument("--out", default=None, help="output folder (default: <results>/../report)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="datasets to report (default: those found under --results)")
    parser.add_argument("--methods", nargs="+", default=list(rp.METHODS), help="methods to report")
    parser.add_argument("--seed_sets", default=None,
                        help='expected ensembles, e.g. "13 17 27;113 117 127" (default: the folders found)')
    parser.add_argument("--sharpness", default="auto",
                        help="APGD setting for the sharpness axis, e.g. l2_0.5 (auto: first l2 setting)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when inputs are missing")
    parser.add_argument("--error_bars", default="std", choices=tuple(plots.ERROR_BARS),
                        help="Figure 7 error bars: sample std over ensembles, or the 95%% t-interval of the mean")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.normpath(args.results)) or ".", "report")
    os.makedirs(out, exist_ok=True)
    datasets = args.datasets
    if datasets is None:
        found = sorted(os.listdir(args.results)) if os.path.isdir(args.results) else []
        datasets = [d for d in rp.DATASETS if d in found] + [d for d in found if d not in rp.DATASETS]
    ensembles = None
    if args.seed_sets:
        ensembles = [rp.ensemble_folder(s) for s in args.seed_sets.split(";") if s.strip()]
    records, missing = rp.collect(args.results, datasets, args.methods, ensembles, args.sharpness)
    if not os.path.isdir(args.results):
        missing.insert(0, f"{args.results} (results folder missing)")
    rows = rp.summarise(records, datasets, args.methods)
    diversity = rp.summarise_diversity(records, datasets, args.methods)

    files = {name: os.path.join(out, name) for name in ("figure7_table.csv", "figure7_table.md", "diversity_table.csv",
                                                          "ensembles.csv", "figure7.png", "sharpness_diversity.png",
                                                          "missing.txt")}
    rp.write_csv(files["figure7_table.csv"], rows, [
        "dataset", "split", "test_set", "method", "method_label", "n_ensembles", "members", "ensemble_acc_mean",
        "ensemble_acc_std", "ensemble_acc_ci95", "paper_ensemble_acc", "ensemble_acc_diff", "individual_acc_mean",
        "individual_acc_std", "individual_acc_ci95", "paper_individual_acc", "individual_acc_diff",
        "ensemble_gain_mean"])
    rp.write_csv(files["diversity_table.csv"], diversity)
    rp.write_csv(files["ensembles.csv"], records, ["dataset", "method", "ensemble", "members"] + list(rp.FIELDS)
                 + ["sharpness", "sharpness_setting"])
    text = rp.tables_markdown(rows, diversity, missing)
    with open(files["figure7_table.md"], "w") as f:
        f.write(text)
    with open(files["missing.txt"], "w") as f:
        f.write("".join(f"{m}\n" for m in missing))
    plots.figure7_bars(rows, datasets, files["figure7.png"], args.error_bars)
    plots.sharpness_diversity_scatter(records, datasets, args.methods, files["sharpness_diversity.png"])

    print(text.split("\n## Missing inputs")[0].rstrip())
    if missing:
        print(f"\n{len(missing)} missing input(s) (listed in {files['missing.txt']}):")
        for line in missing[:20]:
            print(f"  - {line}")
        if len(missing) > 20:
            print(f"  ... and {len(missing) - 20} more")
    print(f"\nreport of {len(records)} ensemble(s) written to {out}:")
    for name, path in files.items():
        print(f"  {path}")
    return 1 if (missing and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
