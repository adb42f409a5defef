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
  claims.md / .csv / .json   with --claims: the paper's claims tested on paired differences over the
                             seed sets (reporting/claims.py); fisher.json is then required
"""
import argparse
import csv
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from reporting import claims  # noqa: E402
from reporting import figure7 as rp  # noqa: E402

COLOURS = {"deep_ensemble": "#4C72B0", "sam": "#DD8452", "sharpbalance": "#55A868", "sharpbalance_sharpest": "#C44E52"}
MARKERS = {"deep_ensemble": "o", "sam": "s", "sharpbalance": "^", "sharpbalance_sharpest": "v"}
ERROR_BARS = {"std": "std over ensembles", "ci95": "95% t-interval of the mean over ensembles"}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="runs/figure7/results", help="root of the measurement folders")
    parser.add_argument("--out", default=None, help="output folder (default: <results>/../report)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="datasets to report (default: those found under --results)")
    parser.add_argument("--methods", nargs="+", default=list(rp.METHODS))
    parser.add_argument("--seed_sets", default=None,
                        help='expected ensembles, e.g. "13 17 27;113 117 127" (default: the folders found)')
    parser.add_argument("--sharpness", default="auto",
                        help="APGD setting for the sharpness axis, e.g. l2_0.5 (auto: first l2 setting)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when inputs are missing")
    parser.add_argument("--error_bars", default="std", choices=tuple(ERROR_BARS),
                        help="Figure 7 error bars: sample std over ensembles, or the 95%% t-interval of the mean")
    parser.add_argument("--claims", action="store_true",
                        help="also test the paper's claims with paired statistics over the seed sets "
                             "(claims.md/.csv/.json; needs fisher.json, see reporting/claims.py)")
    parser.add_argument("--flatness_margin", type=float, default=claims.FLATNESS_MARGIN,
                        help="'about as flat' = at most this relative increase in sharpness (non-inferiority)")
    parser.add_argument("--settings", default=None,
                        help="JSON file of the run's settings (scripts/claims.sh writes it), shown with the claims")
    return parser


def write_csv(path, rows, fields=None):
    fields = fields or (list(rows[0]) if rows else ["note"])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def json_safe(value):
    """NaN -> None (JSON has no NaN); tuples -> lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def setting_label(key):
    """``l2_0.5`` -> ``l2, ρ = 0.5``."""
    norm, _, rho = str(key).partition("_")
    return f"{norm}, ρ = {rho}" if rho else str(key)


def tick_label(row):
    """Two or three short lines, so that four methods fit under narrow panels."""
    label = {"Deep Ensemble": "Deep\nEnsemble", "SharpBalance (sharpest)": "SharpBalance\n(sharpest)"}.get(
        row["method_label"], row["method_label"])
    return f"{label}\nn={row['n_ensembles']}"


def fit_tick_labels(ax):
    """Shrink, then tilt, the x tick labels until neighbours do not overlap (they collided in narrow panels)."""
    renderer = ax.figure.canvas.get_renderer()
    labels = ax.get_xticklabels()
    for size in (9, 8, 7):
        for label in labels:
            label.set_fontsize(size)
        boxes = [label.get_window_extent(renderer) for label in labels]
        if all(left.x1 + 3 < right.x0 for left, right in zip(boxes, boxes[1:])):
            return
    for label in labels:
        label.set_rotation(30)
        label.set_horizontalalignment("right")


def panel_bars(ax, rows, dataset, split, error_bars="std"):
    """One Figure 7 panel: per method a bar of mean individual accuracy topped by the ensemble gain.
    Returns the panel's lower y limit (0 = the axis starts at 0)."""
    chosen = [r for r in rows if r["dataset"] == dataset and r["split"] == split and finite(r["ensemble_acc_mean"])]
    ax.set_title(rp.dataset_label(dataset, split) + (" (ID)" if split == "ID" else " (OOD)"), fontsize=11)
    if not chosen:
        ax.text(0.5, 0.5, f"no {split} results", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        return 0.0
    lows, highs = [], []
    for x, r in enumerate(chosen):
        colour = COLOURS.get(r["method"], "#777777")
        ens, ind = r["ensemble_acc_mean"], r["individual_acc_mean"]
        ens_err, ind_err = r[f"ensemble_acc_{error_bars}"], r[f"individual_acc_{error_bars}"]
        ax.bar(x, ind, width=0.6, color=colour, edgecolor="black", linewidth=0.6)
        ax.bar(x, ens - ind, bottom=ind, width=0.6, color=colour, alpha=0.45, hatch="///",
               edgecolor="black", linewidth=0.6)
        for value, err, dx in ((ens, ens_err, 0.0), (ind, ind_err, 0.12)):
            if finite(err):
                ax.errorbar(x + dx, value, yerr=err, color="black", capsize=3, linewidth=1)
                lows.append(value - err)
                highs.append(value + err)
        lows += [ens, ind]
        highs += [ens, ind]
        for value, colour in ((r["paper_ensemble_acc"], "black"), (r["paper_individual_acc"], "dimgrey")):
            if finite(value):
                ax.plot([x], [value], marker="_", markersize=26, markeredgewidth=2, color=colour, linestyle="none")
                lows.append(value)
                highs.append(value)
        tops = [ens, ind] + [v for v in (ens + ens_err, ind + ind_err, r["paper_ensemble_acc"],
                                          r["paper_individual_acc"]) if finite(v)]
        ax.annotate(f"{ens:.2f}\n({ens - ind:+.2f})", (x, max(tops)), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    span = max(max(highs) - min(lows), 0.5)
    bottom = max(0.0, min(lows) - 0.35 * span)
    ax.set_ylim(bottom, max(highs) + 0.45 * span)  # room for the labels above the highest error bar
    ax.set_xticks(range(len(chosen)))
    ax.set_xticklabels([tick_label(r) for r in chosen], fontsize=9)
    ax.set_xlim(-0.6, len(chosen) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    return bottom


def empty_figure(path, text):
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey", wrap=True)
    ax.set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure7(rows, datasets, path, error_bars="std"):
    """ID (top row) and OOD (bottom row) per dataset (columns); one dataset: ID and OOD side by side."""
    shown = [d for d in datasets if any(r["dataset"] == d for r in rows)] or datasets[:1]
    if not shown:
        return empty_figure(path, "no accuracy results found (see missing.txt)")
    methods = len({r["method"] for r in rows})
    if len(shown) == 1:
        fig, axes = plt.subplots(1, 2, figsize=(max(10.5, 2.9 * methods), 5.6), squeeze=False)
        places = {("ID", 0): axes[0][0], ("OOD", 0): axes[0][1]}
    else:
        fig, axes = plt.subplots(2, len(shown), figsize=((1.2 * methods + 1.0) * len(shown) + 0.6, 8.6),
                                 squeeze=False)
        places = {(split, j): axes[i][j] for i, split in enumerate(("ID", "OOD")) for j in range(len(shown))}
    bottoms = []
    for (split, j), ax in places.items():
        bottoms.append(panel_bars(ax, rows, shown[j], split, error_bars))
        if j == 0 or len(shown) == 1:
            ax.set_ylabel("test accuracy (%)" if split == "ID" else "corrupted-test accuracy (%)")
    handles = [Patch(facecolor="white", edgecolor="black", label="mean individual accuracy (solid)"),
               Patch(facecolor="white", edgecolor="black", hatch="///",
                     label="ensemble gain = ensemble − mean individual (hatched)")]
    with_bars = any(finite(r[f"ensemble_acc_{error_bars}"]) for r in rows)
    if with_bars:
        handles.append(Line2D([], [], color="black", marker="|", linestyle="none", markersize=10,
                              label=f"error bars: {ERROR_BARS[error_bars]}"))
    if any(finite(r["paper_ensemble_acc"]) for r in rows):
        handles += [Line2D([], [], color="black", marker="_", linestyle="none", markersize=16, markeredgewidth=2,
                           label="paper: ensemble accuracy"),
                    Line2D([], [], color="dimgrey", marker="_", linestyle="none", markersize=16, markeredgewidth=2,
                           label="paper: mean individual accuracy")]
    fig.legend(handles=handles, loc="lower center", ncol=2 if len(shown) == 1 else 3, fontsize=9, frameon=False)
    members = sorted({m for r in rows if r.get("members") for m in str(r["members"]).split(", ")}, key=int)
    size = f"ensembles of {' or '.join(members)} members" if members else "ensembles"
    bars = f"error bars: {ERROR_BARS[error_bars]}" if with_bars else "no error bars (one ensemble per method)"
    zoomed = [b > 0 for b in bottoms]
    axis = ("y axes zoomed (not from 0)" if all(zoomed) else "some y axes zoomed (not from 0)" if any(zoomed)
            else "y axes from 0")
    fig.suptitle("Figure 7 style: bar top = ensemble accuracy = mean individual accuracy + ensemble gain\n"
                 f"labels: ensemble accuracy (gain); n = {size} per method; {bars}; {axis}", fontsize=10)
    rect = (0, 0.09 if len(handles) > 2 else 0.06, 1, 0.93)
    fig.tight_layout(rect=rect)
    for ax in places.values():
        fit_tick_labels(ax)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def scatter(records, datasets, methods, path):
    usable = [r for r in records if finite(r["sharpness"], r["ood_variance"])]
    shown = [d for d in datasets if any(r["dataset"] == d for r in usable)] or datasets[:1]
    if not shown:
        return empty_figure(path, "no sharpness and variance results found (see missing.txt)")
    fig, axes = plt.subplots(1, len(shown), figsize=(max(6.4 * len(shown), 7.5), 5.4), squeeze=False)
    for ax, dataset in zip(axes[0], shown):
        points = [r for r in usable if r["dataset"] == dataset]
        ax.set_title(f"{rp.dataset_label(dataset)}: sharpness vs diversity", fontsize=11)
        if not points:
            ax.text(0.5, 0.5, "no sharpness + variance results", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            continue
        accs = [r["ood_ensemble_acc"] for r in points if finite(r["ood_ensemble_acc"])]
        vmin, vmax = (min(accs), max(accs)) if accs else (0.0, 1.0)
        if vmax - vmin < 1e-9:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        mappable = None
        for method in methods:
            group = [r for r in points if r["method"] == method]
            if not group:
                continue
            colours = [r["ood_ensemble_acc"] if finite(r["ood_ensemble_acc"]) else vmin for r in group]
            mappable = ax.scatter([r["sharpness"] for r in group], [r["ood_variance"] for r in group], c=colours,
                                  cmap="viridis", vmin=vmin, vmax=vmax, marker=MARKERS.get(method, "D"), s=110,
                                  edgecolors="black", linewidths=0.8, label=rp.method_label(method), zorder=2)
            if len(group) >= 2:  # the method's mean, with 95% t-intervals on both axes, behind the points
                (x, sx, n), (y, sy, _) = (rp.mean_std([r[k] for r in group]) for k in ("sharpness", "ood_variance"))
                ax.errorbar(x, y, xerr=rp.ci95(sx, n), yerr=rp.ci95(sy, n), color=COLOURS.get(method, "black"),
                            linewidth=1.6, capsize=4, alpha=0.8, zorder=1)
                ax.scatter([x], [y], marker=MARKERS.get(method, "D"), s=260, facecolors="none",
                           edgecolors=COLOURS.get(method, "black"), linewidths=2.5, zorder=3)
        settings = sorted({setting_label(r["sharpness_setting"]) for r in points if r["sharpness_setting"]})
        ax.set_xlabel(f"sharpness: adaptive worst-case loss increase\n({'; '.join(settings)}; mean over members)")
        ax.set_ylabel(f"variance diversity on {rp.dataset_label(dataset, 'OOD')}\n(logit variance across members) →")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        if mappable is not None:
            fig.colorbar(mappable, ax=ax).set_label(f"ensemble accuracy on {rp.dataset_label(dataset, 'OOD')} (%)")
        handles = [Line2D([], [], marker=MARKERS.get(m, "D"), linestyle="none", markersize=9, markerfacecolor="white",
                          markeredgecolor="black", label=rp.method_label(m))
                   for m in methods if any(r["method"] == m for r in points)]
        title = "marker = method\n(one point per ensemble)"
        if any(sum(r["method"] == m for r in points) >= 2 for m in methods):
            title += "\nlarge open marker = method mean,\nbars = 95% t-interval"
        ax.legend(handles=handles, title=title, fontsize=8, title_fontsize=8, loc="best")
    fig.suptitle("Sharpness–diversity trade-off (style of the paper's Figure 1c)\n"
                 "up = more diverse, left = flatter, colour = ensemble accuracy on the corrupted test set", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_claims(args, records, datasets, ensembles, files):
    """claims.md / .csv / .json: every paper claim tested on paired differences over the seed sets."""
    settings = {}
    if args.settings:
        try:
            with open(args.settings) as f:
                settings = json.load(f)
        except (OSError, ValueError) as err:
            print(f"warning: settings file {args.settings} not read ({err})", file=sys.stderr)
    ensembles = ensembles or sorted({r["ensemble"] for r in records})
    rows, summary, problems = [], [], []
    for dataset in datasets:
        rows += claims.evaluate(records, dataset, ensembles, args.methods, margin=args.flatness_margin)
        summary += claims.method_summary(records, dataset, ensembles, args.methods)
        problems += [f"{dataset} {p}" for p in claims.seed_set_status(records, dataset, ensembles, args.methods)]
    if len(ensembles) < 2:
        print(f"claims: {len(ensembles)} seed set(s); a confidence interval needs at least two seed sets, "
              "so every claim is reported without an interval", file=sys.stderr)
    lines = []
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()), ""]
    text = claims.markdown(rows, summary, problems, lines, args.flatness_margin)
    with open(files["claims.md"], "w") as f:
        f.write(text)
    write_csv(files["claims.csv"], rows, [k for k in rows[0] if k != "differences"] if rows else None)
    meta = dict(settings=settings, seed_sets=ensembles, datasets=datasets, methods=args.methods,
                confidence=claims.CONFIDENCE, flatness_margin=args.flatness_margin, sharpness_setting=args.sharpness,
                test=claims.TEST_DESCRIPTION, incomplete_seed_sets=problems)
    with open(files["claims.json"], "w") as f:
        json.dump(json_safe(dict(meta=meta, claims=rows, per_method=summary)), f, indent=1)
    return text


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
        ensembles = ["seeds_" + "_".join(s.replace(",", " ").split()) for s in args.seed_sets.split(";") if s.strip()]
    required = rp.FILES + (("fisher",) if args.claims else ())
    records, missing = rp.collect(args.results, datasets, args.methods, ensembles, args.sharpness, required)
    if not os.path.isdir(args.results):
        missing.insert(0, f"{args.results} (results folder missing)")
    rows = rp.summarise(records, datasets, args.methods)
    diversity = rp.summarise_diversity(records, datasets, args.methods)

    files = {name: os.path.join(out, name) for name in ("figure7_table.csv", "figure7_table.md", "diversity_table.csv",
                                                          "ensembles.csv", "figure7.png", "sharpness_diversity.png",
                                                          "missing.txt")}
    if args.claims:
        files.update({name: os.path.join(out, name) for name in ("claims.md", "claims.csv", "claims.json")})
    write_csv(files["figure7_table.csv"], rows, [
        "dataset", "split", "test_set", "method", "method_label", "n_ensembles", "members", "ensemble_acc_mean",
        "ensemble_acc_std", "ensemble_acc_ci95", "paper_ensemble_acc", "ensemble_acc_diff", "individual_acc_mean",
        "individual_acc_std", "individual_acc_ci95", "paper_individual_acc", "individual_acc_diff",
        "ensemble_gain_mean"])
    write_csv(files["diversity_table.csv"], diversity)
    write_csv(files["ensembles.csv"], records, ["dataset", "method", "ensemble", "members"] + list(rp.FIELDS)
              + ["sharpness", "sharpness_setting"])
    text = rp.markdown(rows, diversity, missing)
    with open(files["figure7_table.md"], "w") as f:
        f.write(text)
    with open(files["missing.txt"], "w") as f:
        f.write("".join(f"{m}\n" for m in missing))
    figure7(rows, datasets, files["figure7.png"], args.error_bars)
    scatter(records, datasets, args.methods, files["sharpness_diversity.png"])
    claims_text = write_claims(args, records, datasets, ensembles, files) if args.claims else ""

    print(text.split("\n## Missing inputs")[0].rstrip())
    if claims_text:
        print("\n" + claims_text.split("\n## Per method")[0].rstrip())
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
