"""The claims' tables and figures, from the evidence files alone (results/claims/ or a run's copy).

    python -m reporting.claims_report --evidence results/claims --out runs/claims/report
    python -m reporting.claims_report --evidence results/claims --write docs/claims.md
    python -m reporting.claims_report --evidence results/claims --check docs/claims.md

Writes to --out: claims_tables.md (every table below), claims_primary.png (per claim: the paired
differences per seed set, their mean and 95% t-interval, zero and the margin), claims_control.png (the
same for the positive control, every setting tried). ``--decide`` prints the control's decision and
exits 0 when a setting passed, 3 when none did (scripts/claims.sh --control stops at the first pass).
``--write FILE`` puts each table between the markers ``<!-- claims:NAME -->`` and
``<!-- /claims:NAME -->`` in FILE (the rest of it is kept); ``--check FILE`` compares the blocks
between those markers with the generated tables and exits 1 naming the first block that differs.

Statistics: reporting/claims.py. The evidence: reporting/evidence.py.
"""
import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from reporting import claims  # noqa: E402
from reporting import evidence  # noqa: E402
from reporting.results import method_label  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402

BLOCKS = ("settings", "control", "control_last", "primary", "secondary", "sensitivity", "exploratory", "epochs")
NO_DECISION = 3  # --decide's exit status when no control setting passed


# ------------------------------------------------------------------------------------- formatting
def fmt_p(p):
    if not math.isfinite(p):
        return "—"
    return "<0.0001" if p < 0.0001 else f"{p:.4f}"


def fmt_value(x, result):
    """A paired difference on its own scale: log ratios as a percentage change of the ratio."""
    if not math.isfinite(x):
        return "—"
    if result["scale"] == "log_ratio":
        return f"{math.expm1(x) * 100:+.1f}%"
    if result["scale"] == "slope":
        return f"{x:+.3g}"
    if result["metric"].startswith(("ensemble_acc", "member_acc", "gain")):
        return f"{x:+.2f}"
    if result["metric"].startswith("variance"):
        return f"{x:+.2f}"
    return f"{x:+.4f}"


def fmt_estimate(result):
    value = fmt_value(result["mean"], result)
    if math.isfinite(result["low"]):
        return f"{value} [{fmt_value(result['low'], result)}, {fmt_value(result['high'], result)}]"
    return value


def fmt_mde(result):
    """The minimum detectable effect at 0.01 (Holm's first step) and at 0.05 (its last), on the
    number's own scale; log ratios as the relative change of the ratio."""
    if not math.isfinite(result["mde_01"]):
        return "—"
    return " / ".join(fmt_value(result[key], result).lstrip("+") for key in ("mde_01", "mde_05"))


def number_label(result):
    """What d_k is, in words."""
    metric = {"sharpness_0.05": "worst-case sharpness (radius 0.05)", "sharpness_0.5": "worst-case sharpness "
              "(radius 0.5)", "fisher": "Fisher trace", "der_ood": "DER, digits-C", "disagreement_ood":
              "disagreement, digits-C", "variance_ood": "logit variance, digits-C", "ensemble_acc_ood":
              "ensemble accuracy, digits-C (points)", "ensemble_acc_id": "ensemble accuracy, clean test (points)",
              "gain_ood": "ensemble − mean member accuracy, digits-C (points)"}.get(result["metric"], result["metric"])
    a, b = method_label(result["method"]), method_label(result["baseline"])
    if result["scale"] == "log_ratio":
        return f"{metric}: {a} / {b}"
    if result["scale"] == "slope":
        return "slope of DER (digits-C) on ln worst-case sharpness (radius 0.05), Deep Ensemble and DE + SAM"
    return f"{metric}: {a} − {b}"


def direction(result):
    """k of n seed sets on the claimed side."""
    if result["n"] == 0:
        return "—"
    return f"{result['k']} of {result['n']}"


# ------------------------------------------------------------------------------------- tables
def settings_block(settings):
    shared = settings["shared"]
    training = shared["training"]
    sharpness = shared["sharpness"]
    lines = [f"- Training shared by every run: data {training['data']}, {training['model']}, batch "
             f"{training['batch_size']}, lr {training['lr']} ({training['lrsche']}), momentum {training['momentum']}, "
             f"weight decay {training['weight_decay']}, precision {training['amp']}.",
             f"- Sharpness and Fisher trace: {sharpness['batch_num']} batches of {sharpness['batch_size']} training "
             f"images (seed {sharpness['batch_seed']}), {'adaptive' if sharpness['adaptive'] else 'plain'} "
             f"{', '.join(sharpness['norms'])}, {sharpness['n_iters']} APGD iterations.",
             f"- Seed sets ({len(settings['seed_sets'])}): {'; '.join(settings['seed_sets'])}.",
             "- Settings found (ensembles per setting, method and checkpoint):"]
    for entry in settings["settings"]:
        extra = f", SAM ρ {entry['sam_rho']}" if "sam_rho" in entry else ""
        if "flat_ratio" in entry:
            extra += (f", flat_ratio {entry['flat_ratio']}, initial_epochs {entry['initial_epochs']}, "
                      f"select {entry['select']}")
        lines.append(f"  - {entry['epochs']} epochs, width {entry['width']}, {method_label(entry['method'])}{extra}, "
                     f"{entry['checkpoint']} checkpoint: {entry['ensembles']}")
    versions = ", ".join(f"{k} {'/'.join(v)}" for k, v in settings["versions"].items() if k != "git_commit")
    lines.append(f"- Software: {versions}; collected on {settings['collected_on']}.")
    return "\n".join(lines)


def measured_epochs(members, epochs, width, method, rho=None, checkpoint="best"):
    """'median (min–max)' of the epochs of the checkpoints measured for one method and setting."""
    found = sorted(m["measured_epoch"] for m in members
                   if (m["epochs"], m["width"], m["method"], m["checkpoint"]) == (epochs, width, method, checkpoint)
                   and (rho is None or m["sam_rho"] == rho) and m["measured_epoch"] is not None)
    if not found:
        return "—"
    return f"{statistics.median(found):g} ({found[0]}–{found[-1]})"


def control_table(control_results, chosen, members, checkpoint):
    """The control's rows for the checkpoints of ``checkpoint`` (best or last), one per setting."""
    lines = ["| epochs | width | SAM ρ | n | worst case, radius 0.05: SAM / DE [95% CI] | k | p | Fisher trace: "
             "SAM / DE [95% CI] | k | p | radius 0.5 (not in the criterion) [95% CI] | k | passes | "
             "epoch measured, DE / SAM |",
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | --- | --- |"]
    for c in control_results:
        worst, fisher, release = c["comparisons"]
        passes = "**yes**" if c["passed"] else ("no" if c["enough"] else f"no ({worst['n']} seed sets)")
        if chosen is c:
            passes += " (chosen)"
        lines.append(f"| {c['epochs']} | {c['width']} | {c['rho']:g} | {worst['n']} | {fmt_estimate(worst)} | "
                     f"{direction(worst)} | {fmt_p(worst['p'])} | {fmt_estimate(fisher)} | {direction(fisher)} | "
                     f"{fmt_p(fisher['p'])} | {fmt_estimate(release)} | {direction(release)} | {passes} | "
                     f"{measured_epochs(members, c['epochs'], c['width'], 'deep_ensemble', None, checkpoint)} / "
                     f"{measured_epochs(members, c['epochs'], c['width'], 'sam', c['rho'], checkpoint)} |")
    if not control_results:
        lines.append("| (no Deep Ensemble and DE + SAM pair found) |" + " |" * 13)
    return lines


def control_block(control_results, chosen, members=()):
    return "\n".join(control_table(control_results, chosen, members, "best") + [
        "", "Ratios are geometric means over the seed sets of SAM / DE per seed set, as a change: −30% = SAM "
        "members 30% flatter. k = seed sets with SAM flatter. p = exact two-sided sign-flip p. A setting "
        "passes when both criterion intervals lie below 0%. Epoch measured: median (range) over the members "
        "of the epoch of the model_best checkpoint (best validation accuracy) that was measured."])


def control_last_block(control_results, members):
    """The control again on the last checkpoints (exploratory: not part of the decision)."""
    if not control_results:
        return ("Not measured: `bash scripts/claims.sh --control-last` measures the control's last checkpoints "
                "(exploratory).")
    return "\n".join(control_table(control_results, None, members, "last") + [
        "", "Exploratory, not part of the pre-registered decision: the same comparisons on each member's last "
        "checkpoint (checkpoint.pth.tar) instead of model_best; radius 0.5 is not measured there. Epoch "
        "measured: the last epoch trained."])


def primary_table(results, selection):
    lines = ["| claim | number per seed set | n | estimate [95% CI] | k (claimed side) | p | p entering Holm | "
             "Holm p | verdict | MDE at 0.01 / 0.05 |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        entering = fmt_p(r["p_for_holm"])
        if r["key"] == "a" and math.isfinite(r["p_for_holm"]):
            entering += f" (×{selection})"
        lines.append(f"| ({r['key']}) {r['claim']} | {number_label(r)} | {r['n']} | {fmt_estimate(r)} | "
                     f"{direction(r)} | {fmt_p(r['p'])} | {entering} | {fmt_p(r['p_holm'])} | **{r['verdict']}** | "
                     f"{fmt_mde(r)} |")
    return "\n".join(lines)


def comparison_table(results, note):
    lines = ["| comparison | number per seed set | n | estimate [95% CI] | k (claimed side) | p | interval |",
             "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['claim']} | {number_label(r)} | {r['n']} | {fmt_estimate(r)} | {direction(r)} | "
                     f"{fmt_p(r['p'])} | {claims.interval_side(r)} |")
    return "\n".join(lines + ["", note])


def left_out_lines(results):
    lines = []
    for r in results:
        for entry in r["left_out"]:
            lines.append(f"- {r.get('key')}: seed set {entry} left out")
    return lines


def epochs_block(members, setting):
    """Per method and seed set, the epoch of every measured member's checkpoint (model_best)."""
    epochs, width, rho = setting
    chosen = [m for m in members if m["epochs"] == epochs and m["width"] == width and m["checkpoint"] == "best"
              and (m["method"] == "deep_ensemble" or m["sam_rho"] == rho)]
    methods = [m for m in ("deep_ensemble", "sam", claims.SHARPBALANCE, claims.SHARPBALANCE_SHARPEST)
               if any(x["method"] == m for x in chosen)]
    seed_sets = sorted({m["seed_set"] for m in chosen}, key=claims.seed_set_order)
    lines = ["| seed set | " + " | ".join(method_label(m) for m in methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    for seed_set in seed_sets:
        cells = []
        for method in methods:
            group = sorted((m for m in chosen if m["method"] == method and m["seed_set"] == seed_set),
                           key=lambda m: m["seed"])
            cells.append(", ".join(str(m["measured_epoch"]) + ("*" if m["before_partition"] == "yes" else "")
                                   for m in group) or "—")
        lines.append(f"| {seed_set} | " + " | ".join(cells) + " |")
    summary = []
    for method in methods:
        group = [m for m in chosen if m["method"] == method]
        partition = {m["partition_epoch"] for m in group if m["partition_epoch"] is not None}
        if partition:
            before = sum(m["before_partition"] == "yes" for m in group)
            summary.append(f"{method_label(method)}: {before} of {len(group)} members measured at or before the "
                           f"partition (epoch {', '.join(map(str, sorted(partition)))}; marked *), i.e. before any "
                           "SharpBalance step")
    lines += ["", f"Epoch of each member's model_best checkpoint, of {epochs}. " + "; ".join(summary) + "."
              if summary else ""]
    return "\n".join(lines).rstrip()


# ------------------------------------------------------------------------------------- the analysis
def claims_setting(ensembles):
    """(epochs, width, rho) of the SharpBalance ensembles; None when there are none; a UserError when
    the evidence holds several (each needs its own claims run)."""
    found = {(r["epochs"], r["width"], r["sam_rho"]) for r in ensembles
             if r["method"] in (claims.SHARPBALANCE, claims.SHARPBALANCE_SHARPEST)}
    if len(found) > 1:
        raise UserError(f"the evidence holds SharpBalance ensembles of several settings "
                        f"({'; '.join(f'{e} epochs, width {w}, rho {r:g}' for e, w, r in sorted(found))}); "
                        "collect each claims run separately")
    return found.pop() if found else None


def analyse(ensembles, members, min_seed_sets=claims.MIN_SEED_SETS, draws=claims.BOOTSTRAP_DRAWS):
    """Everything the tables and figures show, as one dict."""
    control_results = claims.control(ensembles, min_seed_sets)
    chosen = claims.chosen_setting(control_results)
    setting = claims_setting(ensembles)
    analysis = dict(control=control_results, chosen=chosen, setting=setting, primary=None, reason="",
                    control_last=claims.control(ensembles, min_seed_sets, checkpoint="last"))
    if setting is None:
        analysis["reason"] = ("no SharpBalance ensembles in the evidence: the claims run has not been made"
                              + ("" if chosen else " (no control setting passed)"))
        return analysis
    epochs, width, rho = setting
    own = next((c for c in control_results if (c["epochs"], c["width"], c["rho"]) == setting), None)
    analysis["own_control"] = own
    best = claims.setting_rows(ensembles, epochs, width, rho, "best")
    last = claims.setting_rows(ensembles, epochs, width, rho, "last")
    selection = claims.selection_count(epochs, width)
    analysis["selection"] = selection
    if own is None or not own["passed"]:
        analysis["reason"] = ("the positive control does not pass in the claims setting "
                              f"({epochs} epochs, width {width}, SAM ρ {rho:g}): SAM is not shown to flatten its "
                              "members there, so claims (b)–(e) are not testable in it")
    analysis["primary"] = claims.primary(best, selection, min_seed_sets=min_seed_sets, draws=draws)
    analysis["secondary"] = [claims.evaluate(c, best) for c in claims.secondary_comparisons()]
    within = claims.trade_off(best, within=True, draws=draws)
    within["claim"] = "(b) trade-off within each method (one intercept per method)"
    analysis["secondary"].insert(2, within)
    analysis["sensitivity"] = [claims.evaluate(c, last) for c in claims.sensitivity_comparisons()]
    sharpest = claims.primary_comparisons(claims.SHARPBALANCE_SHARPEST)
    analysis["exploratory"] = [claims.evaluate(sharpest[k], best) for k in "cde"]
    analysis["epochs"] = epochs_block(members, setting)
    return analysis


def render(evidence_dir, min_seed_sets=claims.MIN_SEED_SETS, draws=claims.BOOTSTRAP_DRAWS):
    """(blocks: name -> Markdown text, analysis) from the evidence files."""
    ensembles = evidence.read_table(os.path.join(evidence_dir, "ensembles.csv"))
    members = evidence.read_table(os.path.join(evidence_dir, "members.csv"))
    path = os.path.join(evidence_dir, "settings.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist (write it with python -m reporting.evidence)")
    with open(path) as f:
        settings = json.load(f)
    analysis = analyse(ensembles, members, min_seed_sets, draws)
    blocks = {"settings": settings_block(settings), "control": control_block(analysis["control"], analysis["chosen"], members),
              "control_last": control_last_block(analysis["control_last"], members)}
    primary = analysis["primary"]
    if primary is None:
        missing = f"Not run: {analysis['reason']}."
        for name in BLOCKS[BLOCKS.index("primary"):]:
            blocks[name] = missing
        return blocks, analysis
    epochs, width, rho = analysis["setting"]
    caveat = f"Setting: {epochs} epochs, width {width}, SAM ρ {rho:g}; best-validation checkpoints."
    if analysis["reason"]:
        caveat += f" **Caution: {analysis['reason']}.**"
    blocks["primary"] = "\n".join([caveat, "", primary_table(primary, analysis["selection"])] +
                                  (["", "Left out:"] + left_out_lines(primary) if left_out_lines(primary) else []))
    blocks["secondary"] = comparison_table(analysis["secondary"], "Secondary: no correction for multiplicity; "
                                           "'interval' says where the unadjusted 95% t-interval lies.")
    blocks["sensitivity"] = comparison_table(analysis["sensitivity"], "The last checkpoint (checkpoint.pth.tar) of "
                                             "every DE + SAM and SharpBalance member instead of model_best; "
                                             "secondary, no correction.")
    blocks["exploratory"] = comparison_table(analysis["exploratory"], "SharpBalance as the paper reads it "
                                             "(`--select sharpest`) against DE + SAM; exploratory, no correction.")
    blocks["epochs"] = analysis["epochs"]
    return blocks, analysis


def _markers(name):
    return f"<!-- claims:{name} -->\n", f"\n<!-- /claims:{name} -->"


def check_document(blocks, path):
    """The first block whose text in ``path`` differs from the generated one (None: all equal)."""
    with open(path) as f:
        text = f.read()
    for name, generated in blocks.items():
        start, end = _markers(name)
        if start not in text:
            continue
        found = text.split(start, 1)[1].split(end, 1)[0]
        if found != generated:
            return name
    return None


def write_document(blocks, path):
    """Replace the text between each block's markers in ``path`` with the generated block (an empty
    pair of markers is filled too); the rest of the file is kept as it is. A marker pair missing from
    the file is a UserError (nothing written)."""
    with open(path) as f:
        text = f.read()
    for name, generated in blocks.items():
        start, end = (marker.strip("\n") for marker in _markers(name))
        head, found, rest = text.partition(start)
        if not found or end not in rest:
            raise UserError(f"{path} has no '{start}' ... '{end}' pair; add the markers where the table should go")
        text = head + start + "\n" + generated + "\n" + end + rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(text)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evidence", required=True, help="folder with ensembles.csv, members.csv, settings.json")
    parser.add_argument("--out", default=None, help="folder for claims_tables.md and the figures")
    parser.add_argument("--decide", action="store_true",
                        help="print the positive control's decision; exit 0 when a setting passed, 3 when none")
    parser.add_argument("--check", default=None, help="a Markdown file whose claims blocks must equal the tables")
    parser.add_argument("--write", default=None,
                        help="a Markdown file whose claims blocks are replaced by the tables (docs/claims.md)")
    parser.add_argument("--min_seed_sets", type=int, default=claims.MIN_SEED_SETS,
                        help="fewer usable seed sets: a test is not testable")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    blocks, analysis = render(args.evidence, args.min_seed_sets)
    if args.out:
        from reporting import plots
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "claims_tables.md"), "w") as f:
            for name in BLOCKS:
                f.write(f"<!-- claims:{name} -->\n{blocks[name]}\n<!-- /claims:{name} -->\n\n")
        plots.control_figure(analysis["control"], os.path.join(args.out, "claims_control.png"))
        if analysis["primary"] is not None:
            plots.claims_figure(analysis["primary"], analysis["setting"], os.path.join(args.out, "claims_primary.png"))
        print(f"claims tables and figures written to {args.out}")
    if args.write:
        write_document(blocks, args.write)
        print(f"claims tables written into {args.write}")
    if args.check:
        differs = check_document(blocks, args.check)
        if differs:
            print(f"{args.check}: block '{differs}' differs from the tables rebuilt from {args.evidence}",
                  file=sys.stderr)
            return 1
    if args.decide:
        chosen = analysis["chosen"]
        if chosen is None:
            print("control: no setting passed")
            return NO_DECISION
        print(f"control: passed at {chosen['epochs']} epochs, width {chosen['width']}, SAM rho {chosen['rho']:g}")
    elif not args.out and not args.check:
        print("\n\n".join(blocks[name] for name in BLOCKS))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
