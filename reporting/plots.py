"""Drawing the report's figures: Figure 7 bars, the sharpness-diversity scatter, and the claims figures
(the paired differences per seed set next to zero and the margin).

Every function takes rows that reporting.results or reporting.claims computed and writes one PNG; none
reads result files or computes a statistic itself.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from reporting import results as rp  # noqa: E402

COLOURS = {"deep_ensemble": "#4C72B0", "sam": "#DD8452", "sharpbalance": "#55A868", "sharpbalance_sharpest": "#C44E52"}
MARKERS = {"deep_ensemble": "o", "sam": "s", "sharpbalance": "^", "sharpbalance_sharpest": "v"}
ERROR_BARS = {"std": "std over ensembles", "ci95": "95% t-interval of the mean over ensembles"}


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


def figure7_bars(rows, datasets, path, error_bars="std"):
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


def sharpness_diversity_scatter(records, datasets, methods, path):
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


# ------------------------------------------------------------------------------------- the claims
def _strip(ax, x, values, colour, label=None):
    """Points at x, spread sideways by a fixed pattern (no random jitter: the figure is reproducible)."""
    offsets = [0.06 * ((i % 5) - 2) for i in range(len(values))]
    ax.scatter([x + o for o in offsets], values, s=22, color=colour, edgecolors="black", linewidths=0.4,
               zorder=3, label=label)


def _interval(ax, x, mean, low, high, colour="black"):
    if finite(mean, low, high):
        ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="D", color=colour, markersize=6,
                    capsize=5, linewidth=1.6, zorder=4)


SHORT_CLAIMS = {"a": "SAM flatter than SGD", "b": "sharper = more diverse", "c": "SharpBalance more diverse",
                "d": "SharpBalance about as flat", "e": "SharpBalance more accurate"}


RATIO_TICKS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)


def ratio_axis(ax):
    """A log axis of ratios labelled as percentage changes (0.8 -> −20%), with ticks no closer than an
    eighth of the axis (on the log scale) so that labels never overlap; call it after plotting."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    spacing = math.log(high / low) / 8
    ticks = [1.0]
    for tick in sorted((t for t in RATIO_TICKS if low <= t <= high and t != 1.0), key=lambda t: abs(math.log(t))):
        if all(abs(math.log(tick / t)) >= spacing for t in ticks):
            ticks.append(tick)
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{(y - 1) * 100:+.0f}%"))


def control_figure(control_results, path):
    """The positive control: per setting tried, the per-seed-set ratios SAM / DE (log axis) of the two
    criterion measures and of the release's radius, their geometric mean with the 95% t-interval, the
    line of no difference; settings that pass are labelled."""
    if not control_results:
        return empty_figure(path, "no control settings found")
    names = ("worst-case sharpness, radius 0.05 (criterion)", "Fisher trace (criterion)",
             "radius 0.5 (release; not in the criterion)")
    fig, axes = plt.subplots(1, 3, figsize=(max(12.0, 1.3 * len(control_results) * 3 + 2), 4.8), squeeze=False)
    labels = [f"{c['epochs']} ep\nw{c['width']}\nρ {c['rho']:g}" + ("\npasses" if c["passed"] else "")
              for c in control_results]
    for j, ax in enumerate(axes[0]):
        for x, c in enumerate(control_results):
            result = c["comparisons"][j]
            ratios = [math.exp(d) for d in result["differences"]]
            _strip(ax, x, ratios, "#DD8452" if c["passed"] else "#BBBBBB")
            if math.isfinite(result["low"]):
                _interval(ax, x + 0.32, math.exp(result["mean"]), math.exp(result["low"]), math.exp(result["high"]))
        ax.axhline(1.0, color="black", linewidth=1)
        ratio_axis(ax)
        ax.set_xticks(range(len(control_results)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlim(-0.6, len(control_results) - 0.4)
        ax.set_title(names[j], fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
        if j == 0:
            ax.set_ylabel("SAM / Deep Ensemble, per seed set (log scale)\nbelow 0% = SAM members flatter")
    fig.suptitle("Positive control: is SAM flatter than SGD here? Points = seed sets; diamond = geometric mean "
                 "with 95% t-interval", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def claims_figure(primary, setting, path):
    """The five primary tests: per claim, the paired value of each seed set (points), their mean with
    the 95% t-interval (diamond), zero (solid) and the margin (dashed); for the trade-off (b), each
    seed set's Deep Ensemble and DE + SAM ensembles joined by a line, and the fitted slope."""
    fig, axes = plt.subplots(1, 5, figsize=(17.5, 4.6), squeeze=False)
    for ax, result in zip(axes[0], primary):
        title = f"({result['key']}) {SHORT_CLAIMS[result['key']]}: {result['verdict']}"
        if result["scale"] == "slope":
            for (x0, x1), (y0, y1) in zip(result["x_pairs"], result["y_pairs"]):
                ax.plot([x0, x1], [y0, y1], color="#BBBBBB", linewidth=0.8, zorder=1)
            xs = [p for pair in result["x_pairs"] for p in pair]
            ys = [p for pair in result["y_pairs"] for p in pair]
            if xs:
                ax.scatter(xs[0::2], ys[0::2], color=COLOURS["deep_ensemble"], edgecolors="black", s=26,
                           label=rp.method_label("deep_ensemble"), zorder=3)
                ax.scatter(xs[1::2], ys[1::2], color=COLOURS["sam"], edgecolors="black", s=26, marker="s",
                           label=rp.method_label("sam"), zorder=3)
                if finite(result["mean"]):
                    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                    grid = [min(xs), max(xs)]
                    ax.plot(grid, [my + result["mean"] * (g - mx) for g in grid], color="black", linewidth=1.5)
                ax.legend(fontsize=7, loc="best")
            ax.set_xlabel("ln worst-case sharpness (radius 0.05)", fontsize=8)
            ax.set_ylabel("DER on digits-C (disagreement / error)", fontsize=8)
            slope = f"slope {result['mean']:+.3g} [{result['low']:+.3g}, {result['high']:+.3g}]" \
                if finite(result["mean"], result["low"], result["high"]) else "no slope"
            ax.set_title(f"{title}\n{slope}", fontsize=9)
            ax.grid(alpha=0.3)
            continue
        log = result["scale"] == "log_ratio"
        values = [math.exp(d) for d in result["differences"]] if log else list(result["differences"])
        colour = COLOURS.get(result["method"], "#777777")
        _strip(ax, 0.0, values, colour)
        if math.isfinite(result["low"]):
            mean, low, high = (math.exp(v) if log else v for v in (result["mean"], result["low"], result["high"]))
            _interval(ax, 0.45, mean, low, high)
        ax.axhline(1.0 if log else 0.0, color="black", linewidth=1)
        if result["expect"] == "below_margin":
            ax.axhline(1.0 + result["margin"], color="black", linewidth=1, linestyle="--",
                       label=f"margin: {result['margin']:.0%} sharper")
            ax.legend(fontsize=7, loc="best")
        if log:
            ratio_axis(ax)
        ax.set_xticks([0.0, 0.45])
        ax.set_xticklabels(["seed sets", "mean,\n95% CI"], fontsize=8)
        ax.set_xlim(-0.4, 0.8)
        a, b = rp.method_label(result["method"]), rp.method_label(result["baseline"])
        what = {"sharpness_0.05": "worst-case sharpness (r 0.05)", "der_ood": "DER, digits-C",
                "ensemble_acc_ood": "ensemble accuracy, digits-C (points)"}.get(result["metric"], result["metric"])
        ax.set_ylabel(f"{what}\n{a} / {b} − 1 (log scale)" if log else f"{what}\n{a} − {b}", fontsize=8)
        ax.set_title(f"{title}\n{result['k']} of {result['n']} seed sets on the claimed side", fontsize=9)
        ax.grid(axis="y", alpha=0.3, which="both")
    epochs, width, rho = setting
    fig.suptitle(f"Primary tests, digits, {epochs} epochs, width {width}, SAM ρ {rho:g}: one point per seed set "
                 "(paired); verdicts after Holm across the five", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)
