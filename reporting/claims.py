"""Does SharpBalance do what the paper claims? Paired statistics over seed sets (scripts/report.py --claims).

Design. Every method is trained once per seed set (the same three seeds for every method), so each
claim "method A is lower/higher than method B on metric m" is tested on the paired differences
d_k = m(A, seed set k) − m(B, seed set k). Pairing removes what a seed set does to every method
alike (initialisation, batch order, which images are hard) and leaves the method's effect.

The test: the paired t-interval, mean(d) ± t_{1−α/2, n−1} · sd(d) / √n (sd with n − 1). With n of 2
to a few dozen seed sets a normal (z) interval would be too narrow; the t-interval is exact when the
differences are normal and close to right for moderately skewed ones at n ≈ 8. As a check that does
not assume normality, each row also carries the exact two-sided sign-flip permutation p-value (under
"no effect" every d_k is as likely to be −d_k; its smallest possible value is 2 / 2^n).

Verdicts, from the 95% interval (no correction for the number of claims: with ~20 rows, about one
interval in twenty misses its true value by chance):
  holds          the whole interval lies on the claimed side of 0
  contradicted   the whole interval lies on the other side
  inconclusive   the interval contains 0
"About as flat" is a non-inferiority claim with a margin fixed before looking at any result: the
relative difference r_k = m(A, k) / m(B, k) − 1 per seed set; holds when the interval's upper end is
below +margin (A at most margin·100 % sharper than B), contradicted when its lower end is above
+margin, inconclusive otherwise. Being flatter than B does not contradict "about as flat": the
paper's point is that SharpBalance keeps SAM's flatness, not that it matches it exactly.

A seed set enters a claim only when both methods have a finite value for it from a complete
ensemble (as many members as seeds); every seed set left out is named with the reason.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
FLATNESS_MARGIN = 0.10  # "about as flat": at most 10 % sharper (relative), fixed before any run
PAPER_SEED_SETS = ((13, 17, 27), (113, 117, 127), (43, 59, 223))
NAN = float("nan")
TEST_DESCRIPTION = ("paired t-interval of the mean difference over seed sets (t with n − 1 degrees of freedom); "
                    "exact two-sided sign-flip permutation p-value as a check without the normality assumption")


def default_seed_sets(k):
    """K disjoint seed triples: the paper's three, then 213 217 227, 313 317 327, ... (the pattern of
    the paper's first two triples, 100 apart)."""
    if k < 1:
        raise ValueError(f"need at least one seed set, got {k}")
    sets = list(PAPER_SEED_SETS[:k])
    base = 213
    while len(sets) < k:
        sets.append((base, base + 4, base + 14))
        base += 100
    used = [s for triple in sets for s in triple]
    assert len(used) == len(set(used)), "seed sets overlap"
    return sets


def ensemble_name(seeds):
    """(13, 17, 27) or "13 17 27" -> "seeds_13_17_27" (the folder name figure7.sh uses)."""
    if isinstance(seeds, str):
        seeds = seeds.replace(",", " ").split()
    return "seeds_" + "_".join(str(s) for s in seeds)


def seed_count(name):
    """"seeds_13_17_27" -> 3; None when the name is not of that form."""
    prefix, *seeds = name.split("_")
    if prefix != "seeds" or not seeds or not all(s.isdigit() for s in seeds):
        return None
    return len(seeds)


# ------------------------------------------------------------------------------------- statistics
def t_interval(differences, confidence=CONFIDENCE):
    """Paired t-interval of the mean difference: dict(n, mean, sd, se, t, low, high).

    Needs n ≥ 2 (one difference has no spread to build an interval from): raises ValueError."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least two seed sets, got {n}")
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return dict(n=n, mean=mean, sd=sd, se=se, t=t, low=mean - t * se, high=mean + t * se)


def sign_flip_p(differences, exact_up_to=16, draws=100_000, seed=0):
    """Two-sided sign-flip permutation p-value of mean(d) = 0: the fraction of sign patterns whose
    |mean| is at least the observed one. Exact (all 2^n patterns) for n ≤ exact_up_to, else seeded
    random patterns (the observed one counted once more, so p > 0)."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n == 0:
        return NAN
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= exact_up_to:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d) / n >= observed - tolerance))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, n))
    hits = np.sum(np.abs(signs @ d) / n >= observed - tolerance)
    return float((hits + 1) / (draws + 1))


def verdict(low, high, expect, margin=0.0):
    """holds / contradicted / inconclusive from an interval [low, high].

    expect "lower":  claimed < 0;  "higher": claimed > 0;
    "not_higher": claimed < margin (non-inferiority: at most `margin` above)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval"
    if expect == "higher":
        return "holds" if low > 0 else "contradicted" if high < 0 else "inconclusive"
    if expect == "lower":
        return "holds" if high < 0 else "contradicted" if low > 0 else "inconclusive"
    if expect == "not_higher":
        return "holds" if high < margin else "contradicted" if low > margin else "inconclusive"
    raise ValueError(f"unknown expectation '{expect}'")


# ------------------------------------------------------------------------------------- the claims
@dataclass(frozen=True)
class Claim:
    key: str        # short id
    text: str       # the claim, in words
    metric: str     # record field (reporting/figure7.FIELDS, "sharpness", "fisher", "<split>_ensemble_gain")
    method: str
    baseline: str
    expect: str     # "lower", "higher" or "not_higher" (relative difference, with the flatness margin)
    reading: str = ""  # for SharpBalance claims: which selection rule the method uses

    @property
    def relative(self):
        return self.expect == "not_higher"


SHARPBALANCE_READINGS = (("sharpbalance", "flattest (released)"), ("sharpbalance_sharpest", "sharpest (paper)"))


def paper_claims():
    """The paper's claims as testable rows; every SharpBalance claim once per reading."""
    claims = [
        Claim("sam_flatter_apgd", "SAM members are flatter than SGD members (worst-case sharpness)",
              "sharpness", "sam", "deep_ensemble", "lower"),
        Claim("sam_flatter_fisher", "SAM members are flatter than SGD members (Fisher trace)",
              "fisher", "sam", "deep_ensemble", "lower"),
        Claim("sam_less_diverse_variance", "SAM ensembles are less diverse than deep ensembles "
              "(logit variance, corrupted set)", "ood_variance", "sam", "deep_ensemble", "lower"),
        Claim("sam_less_diverse_disagreement", "SAM ensembles are less diverse than deep ensembles "
              "(disagreement, corrupted set)", "ood_disagreement", "sam", "deep_ensemble", "lower"),
        Claim("sam_beats_de_ood", "DE + SAM > Deep Ensemble (ensemble accuracy, corrupted set)",
              "ood_ensemble_acc", "sam", "deep_ensemble", "higher"),
        Claim("sam_beats_de_id", "DE + SAM > Deep Ensemble (ensemble accuracy, clean test set)",
              "id_ensemble_acc", "sam", "deep_ensemble", "higher"),
        Claim("sam_smaller_gain_ood", "SAM ensembles gain less from ensembling than deep ensembles "
              "(ensemble − mean member accuracy, corrupted set)", "ood_ensemble_gain", "sam", "deep_ensemble",
              "lower"),
    ]
    margin = f"{FLATNESS_MARGIN:.0%}"
    for method, reading in SHARPBALANCE_READINGS:
        claims += [
            Claim(f"{method}_more_diverse_variance", "SharpBalance ensembles are more diverse than DE + SAM "
                  "(logit variance, corrupted set)", "ood_variance", method, "sam", "higher", reading),
            Claim(f"{method}_more_diverse_disagreement", "SharpBalance ensembles are more diverse than DE + SAM "
                  "(disagreement, corrupted set)", "ood_disagreement", method, "sam", "higher", reading),
            Claim(f"{method}_as_flat_apgd", f"SharpBalance members are about as flat as DE + SAM members, at most "
                  f"{margin} sharper (worst-case sharpness)", "sharpness", method, "sam", "not_higher", reading),
            Claim(f"{method}_as_flat_fisher", f"SharpBalance members are about as flat as DE + SAM members, at most "
                  f"{margin} sharper (Fisher trace)", "fisher", method, "sam", "not_higher", reading),
            Claim(f"{method}_beats_sam_ood", "SharpBalance > DE + SAM (ensemble accuracy, corrupted set)",
                  "ood_ensemble_acc", method, "sam", "higher", reading),
            Claim(f"{method}_beats_sam_id", "SharpBalance > DE + SAM (ensemble accuracy, clean test set)",
                  "id_ensemble_acc", method, "sam", "higher", reading),
            Claim(f"{method}_larger_gain_ood", "SharpBalance gains more from ensembling than DE + SAM "
                  "(ensemble − mean member accuracy, corrupted set)", "ood_ensemble_gain", method, "sam", "higher",
                  reading),
            Claim(f"{method}_larger_gain_id", "SharpBalance gains more from ensembling than DE + SAM "
                  "(ensemble − mean member accuracy, clean test set)", "id_ensemble_gain", method, "sam", "higher",
                  reading),
        ]
    return claims


def value(record, metric):
    """A record's value of ``metric``; ``<split>_ensemble_gain`` = ensemble − mean individual accuracy."""
    if metric.endswith("_ensemble_gain"):
        split = metric.split("_", 1)[0]
        return record.get(f"{split}_ensemble_acc", NAN) - record.get(f"{split}_individual_acc", NAN)
    result = record.get(metric)
    return float(result) if isinstance(result, (int, float)) else NAN


def incomplete_reason(record):
    """Why an ensemble's record cannot be used at all (None = it can): fewer members than seeds."""
    expected = seed_count(record["ensemble"])
    members = record.get("members")
    if expected is not None and members is not None and members != expected:
        return f"{members} of {expected} members measured"
    return None


def evaluate_claim(claim, records, dataset, ensembles, confidence=CONFIDENCE, margin=FLATNESS_MARGIN):
    """One claim's row: paired differences over ``ensembles`` (seed-set folder names), interval, verdict."""
    by_key = {(r["method"], r["ensemble"]): r for r in records if r["dataset"] == dataset}
    differences, used, left_out = [], [], []
    for name in ensembles:
        values, reasons = [], []
        for method in (claim.method, claim.baseline):
            record = by_key.get((method, name))
            if record is None:
                reasons.append(f"{method}: no results")
                continue
            why = incomplete_reason(record)
            if why:
                reasons.append(f"{method}: {why}")
                continue
            v = value(record, claim.metric)
            if not math.isfinite(v):
                reasons.append(f"{method}: no {claim.metric}")
            values.append(v)
        if not reasons and claim.relative and not values[1] > 0:
            reasons.append(f"{claim.baseline}: {claim.metric} ≤ 0, no relative difference")
        if reasons:
            left_out.append(f"{name} ({'; '.join(reasons)})")
            continue
        a, b = values
        differences.append(a / b - 1.0 if claim.relative else a - b)
        used.append(name)
    row = dict(key=claim.key, claim=claim.text, reading=claim.reading, dataset=dataset, metric=claim.metric,
               method=claim.method, baseline=claim.baseline, expect=claim.expect,
               difference="relative: method / baseline − 1" if claim.relative else "method − baseline",
               margin=margin if claim.relative else 0.0, confidence=confidence, n=len(differences),
               mean=NAN, sd=NAN, ci_low=NAN, ci_high=NAN, t_crit=NAN, p_sign_flip=NAN,
               used=" ".join(used), left_out="; ".join(left_out), differences=differences)
    if len(differences) >= 2:
        interval = t_interval(differences, confidence)
        row.update(mean=interval["mean"], sd=interval["sd"], ci_low=interval["low"], ci_high=interval["high"],
                   t_crit=interval["t"], p_sign_flip=sign_flip_p(differences),
                   verdict=verdict(interval["low"], interval["high"], claim.expect, row["margin"]))
    else:
        if differences:
            row.update(mean=float(np.mean(differences)))
        row["verdict"] = f"no interval (n = {len(differences)}; an interval needs two seed sets)"
    return row


def evaluate(records, dataset, ensembles, methods, confidence=CONFIDENCE, margin=FLATNESS_MARGIN):
    """Every paper claim whose two methods were run; claims on a method not in ``methods`` are skipped."""
    return [evaluate_claim(c, records, dataset, ensembles, confidence, margin)
            for c in paper_claims() if c.method in methods and c.baseline in methods]


SUMMARY_METRICS = (
    ("id_ensemble_acc", "ensemble accuracy, test (%)"), ("id_individual_acc", "mean member accuracy, test (%)"),
    ("ood_ensemble_acc", "ensemble accuracy, corrupted (%)"),
    ("ood_individual_acc", "mean member accuracy, corrupted (%)"),
    ("id_ensemble_nll", "ensemble NLL, test"), ("id_individual_nll", "mean member NLL, test"),
    ("ood_ensemble_nll", "ensemble NLL, corrupted"), ("ood_individual_nll", "mean member NLL, corrupted"),
    ("id_ensemble_ece", "ensemble ECE, test"), ("id_individual_ece", "mean member ECE, test"),
    ("ood_ensemble_ece", "ensemble ECE, corrupted"), ("ood_individual_ece", "mean member ECE, corrupted"),
    ("ood_variance", "logit variance, corrupted"), ("ood_disagreement", "disagreement, corrupted"),
    ("id_disagreement", "disagreement, test"), ("sharpness", "worst-case sharpness (members)"),
    ("fisher", "Fisher trace (members)"))


def method_summary(records, dataset, ensembles, methods, confidence=CONFIDENCE):
    """Per method and metric: mean over the usable seed sets and its t-interval (NaN with n < 2)."""
    rows = []
    for method in methods:
        chosen = [r for r in records if r["dataset"] == dataset and r["method"] == method
                  and r["ensemble"] in ensembles and incomplete_reason(r) is None]
        for metric, label in SUMMARY_METRICS:
            values = [value(r, metric) for r in chosen]
            values = [v for v in values if math.isfinite(v)]
            row = dict(dataset=dataset, method=method, metric=metric, label=label, n=len(values),
                       mean=float(np.mean(values)) if values else NAN, ci_low=NAN, ci_high=NAN)
            if len(values) >= 2:
                interval = t_interval(values, confidence)
                row.update(ci_low=interval["low"], ci_high=interval["high"])
            rows.append(row)
    return rows


def seed_set_status(records, dataset, ensembles, methods):
    """One line per seed set that is incomplete for some method (missing, too few members)."""
    by_key = {(r["method"], r["ensemble"]): r for r in records if r["dataset"] == dataset}
    problems = []
    for name in ensembles:
        reasons = []
        for method in methods:
            record = by_key.get((method, name))
            why = "no results" if record is None else incomplete_reason(record)
            if why:
                reasons.append(f"{method}: {why}")
        if reasons:
            problems.append(f"{name}: {'; '.join(reasons)}")
    return problems


# ------------------------------------------------------------------------------------- rendering
def _num(x, digits=3):
    """3 decimals, or 3 significant digits for very large or very small values; — for NaN."""
    if not math.isfinite(x):
        return "—"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 10 ** -digits):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def _difference(row):
    """Formatter of a row's differences: relative ones in %, the others with a sign and 4 digits."""
    if row["expect"] == "not_higher":
        return lambda x: f"{x:+.1%}" if math.isfinite(x) else "—"
    return lambda x: f"{x:+.4g}" if math.isfinite(x) else "—"


def markdown(rows, summary, problems, settings_lines=(), margin=FLATNESS_MARGIN):
    """The claims report as Markdown: the claims table, seed sets left out, per-method means."""
    confidence = rows[0]["confidence"] if rows else CONFIDENCE
    lines = ["## Claims", ""]
    lines += list(settings_lines)
    lines += [f"Paired difference over seed sets (the same seeds for both methods): mean and {confidence:.0%} "
              "t-interval; n = seed sets used; p = exact two-sided sign-flip permutation p-value (no normality "
              "assumed). Verdict: holds / contradicted = the whole interval on the claimed / the other side of 0; "
              "inconclusive = the interval contains 0. 'About as flat' rows are relative differences "
              f"(SharpBalance / DE + SAM − 1) with a non-inferiority margin of +{margin:.0%}: they hold when the "
              "interval's upper end is below it, are contradicted when its lower end is above it. Accuracy in "
              "percentage points. No correction for the number of rows.", "",
              "| Claim | SharpBalance reading | Difference | n | Mean | 95% CI | p (sign-flip) | Verdict |",
              "| --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        f = _difference(r)
        ci = f"[{f(r['ci_low'])}, {f(r['ci_high'])}]" if math.isfinite(r["ci_low"]) else "—"
        relative = " (relative)" if r["expect"] == "not_higher" else ""
        diff = f"{r['metric']}: {r['method']} vs {r['baseline']}{relative}"
        lines.append(f"| {r['claim']} | {r['reading'] or '—'} | {diff} | {r['n']} | {f(r['mean'])} | {ci} | "
                     f"{_num(r['p_sign_flip'])} | **{r['verdict']}** |")
    if not rows:
        lines.append("| (no claim could be evaluated: fewer than two methods found) | | | | | | | |")
    left = {}
    for r in rows:
        for entry in filter(None, r["left_out"].split("; seeds_")):
            left.setdefault(entry if entry.startswith("seeds_") else "seeds_" + entry, []).append(r["key"])
    if left:
        lines += ["", "Seed sets left out of a claim (not averaged in):", ""]
        lines += [f"- {entry}: left out of {len(keys)} claim(s)" + (f" ({', '.join(keys)})" if len(keys) <= 3 else "")
                  for entry, keys in left.items()]
    methods = list(dict.fromkeys(s["method"] for s in summary))
    lines += ["", f"## Per method (mean over seed sets [{confidence:.0%} t-interval], n = seed sets)", "",
              "| Metric | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for metric, label in SUMMARY_METRICS:
        cells = []
        for s in (s for s in summary if s["metric"] == metric):
            if s["n"] == 0:
                cells.append("—")
            elif math.isfinite(s["ci_low"]):
                cells.append(f"{_num(s['mean'])} [{_num(s['ci_low'])}, {_num(s['ci_high'])}] (n={s['n']})")
            else:
                cells.append(f"{_num(s['mean'])} (n={s['n']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Incomplete seed sets", ""]
    lines += [f"- {p}" for p in problems] if problems else ["none"]
    return "\n".join(lines) + "\n"
