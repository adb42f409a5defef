"""Does SharpBalance do what the paper claims? The statistics of scripts/claims.sh, as pure functions.

The design (fixed before any run in results/claims/preregistration.md):

* **Paired by seed set.** Every method is trained with the same K seed triples, so a comparison of
  method A with method B uses the K paired values d_k = A_k − B_k (accuracy, diversity) or
  d_k = ln(A_k / B_k) (sharpness, Fisher trace: a log ratio, so that a relative margin means the same
  at every level and one seed set with large values does not dominate).
* **Tests.** The exact sign-flip permutation test (under "no effect" each d_k is as likely to be −d_k;
  all 2^K sign patterns): two-sided, or one-sided against a shifted null for the non-inferiority claim
  (H0: mean ≥ ln 1.10). The trade-off (b) is a slope: the OLS slope of normalised diversity on log
  sharpness over the Deep Ensemble and DE + SAM ensembles, tested exactly over the 2^K swaps of the two
  diversity values within each seed set, with a percentile bootstrap interval over seed sets.
* **Multiplicity.** One primary test per claim (a)–(e), Holm's step-down procedure across the five.
  Claim (a)'s p is first multiplied by the number of control settings the setting was chosen from
  (Bonferroni for the selection). Everything else is secondary or exploratory and says so.
* **Description.** Every comparison also gets the paired 95% t-interval (mean ± t·sd/√K, unadjusted),
  k of K seed sets in the claimed direction, and the minimum detectable effect at 80% power.
* **The positive control.** Before the claims are tested in a setting, SAM must be shown to flatten
  its members there: the upper ends of the t-intervals of ln(S_SAM / S_DE) (worst-case sharpness at
  radius 0.05) and of ln(F_SAM / F_DE) (Fisher trace) both below 0. Settings are tried in the order of
  CONTROL_CELLS; the first cell with a passing setting is used (ρ = 0.2 before ρ = 0.05).

Rows are dicts, one per ensemble, as reporting/evidence.py writes them (results/claims/ensembles.csv).
A seed set enters a comparison only when both methods have a finite value for it from a complete
ensemble; every seed set left out is named with the reason, nothing is imputed.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05          # family level of Holm's procedure over the primary tests
POWER = 0.80          # for the minimum detectable effect
FLATNESS_MARGIN = 0.10  # "about as flat": at most 10 % sharper (ratio), fixed before any run
MIN_SEED_SETS = 10    # a primary test (or the control) with fewer usable seed sets is not testable
DEFAULT_K = 12
PAPER_SEED_SETS = ((13, 17, 27), (113, 117, 127), (43, 59, 223))
CONTROL_CELLS = ((20, 8), (40, 8), (20, 16), (40, 16))   # (epochs, width), in the order they are tried
CONTROL_RHOS = (0.2, 0.05)                                 # SAM's rho in each cell, in order of preference
CONTROL_RADIUS = 0.05   # the worst-case sharpness radius of the control and of the primary tests
RELEASE_RADIUS = 0.5    # the release's radius, reported next to it
BOOTSTRAP_DRAWS = 10_000
NAN = float("nan")


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


def _sign_patterns(n, exact_up_to, draws, seed):
    """All 2^n sign patterns (rows of ±1) for n ≤ exact_up_to, else ``draws`` seeded random ones."""
    if n <= exact_up_to:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n))), True
    return np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, n)), False


def sign_flip_p(differences, alternative="two-sided", shift=0.0, exact_up_to=16, draws=100_000, seed=0):
    """Sign-flip permutation p-value of H0 "the d_k − shift are symmetric about 0".

    alternative: "two-sided" (|mean| at least the observed), "less" (mean at most the observed:
    evidence that the mean is below ``shift``) or "greater". Exact over all 2^n patterns for
    n ≤ exact_up_to; otherwise seeded random patterns with the observed one counted once more."""
    d = np.asarray(differences, dtype=np.float64) - shift
    n = len(d)
    if n == 0:
        return NAN
    observed = d.mean()
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    signs, exact = _sign_patterns(n, exact_up_to, draws, seed)
    means = signs @ d / n
    if alternative == "two-sided":
        hits = np.abs(means) >= abs(observed) - tolerance
    elif alternative == "less":
        hits = means <= observed + tolerance
    elif alternative == "greater":
        hits = means >= observed - tolerance
    else:
        raise ValueError(f"unknown alternative '{alternative}'")
    return float(hits.mean()) if exact else float((hits.sum() + 1) / (len(hits) + 1))


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the input's order: with the p's sorted ascending,
    p_adj(i) = max over j ≤ i of min(1, (m − j + 1)·p(j)). NaN counts as 1 (an untestable claim is not
    rejected, and still counts in m)."""
    p = np.array([1.0 if not math.isfinite(x) else float(x) for x in pvalues])
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return [float(a) for a in adjusted]


def ols_slope(x, y):
    """Least-squares slope of y on x (with an intercept); NaN when x does not vary."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    dx = x - x.mean()
    denominator = float(dx @ dx)
    return float(dx @ (y - y.mean()) / denominator) if denominator > 0 else NAN


def within_slope(x, y, groups):
    """Pooled within-group slope of y on x (one intercept per group, e.g. per method)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    dx, dy = np.empty_like(x), np.empty_like(y)
    for g in np.unique(groups):
        mask = groups == g
        dx[mask] = x[mask] - x[mask].mean()
        dy[mask] = y[mask] - y[mask].mean()
    denominator = float(dx @ dx)
    return float(dx @ dy / denominator) if denominator > 0 else NAN


def slope_swap_p(x_pairs, y_pairs, exact_up_to=16, draws=100_000, seed=0):
    """Two-sided permutation p of the pooled OLS slope of y on x over K pairs of points (one pair per
    seed set: its Deep Ensemble and its DE + SAM ensemble). Under "no link", the two y values of a seed
    set are exchangeable: every one of the 2^K patterns of within-pair swaps is equally likely.
    Exact for K ≤ exact_up_to, else seeded random patterns with the observed one counted once more."""
    x = np.asarray(x_pairs, dtype=np.float64).reshape(-1, 2)
    y = np.asarray(y_pairs, dtype=np.float64).reshape(-1, 2)
    k = len(x)
    if k == 0:
        return NAN
    observed = abs(ols_slope(x.ravel(), y.ravel()))
    signs, exact = _sign_patterns(k, exact_up_to, draws, seed)
    # a swap exchanges y_k0 and y_k1; with x fixed, the slope's numerator is linear in the swaps
    dx = x - x.mean()
    mean_y = y.mean()
    denominator = float((dx ** 2).sum())
    kept = dx[:, 0] * (y[:, 0] - mean_y) + dx[:, 1] * (y[:, 1] - mean_y)
    swapped = dx[:, 0] * (y[:, 1] - mean_y) + dx[:, 1] * (y[:, 0] - mean_y)
    slopes = ((signs > 0) @ kept + (signs < 0) @ swapped) / denominator
    tolerance = 1e-12 * max(1.0, observed)
    hits = np.abs(slopes) >= observed - tolerance
    return float(hits.mean()) if exact else float((hits.sum() + 1) / (len(hits) + 1))


def bootstrap_slope_interval(x_pairs, y_pairs, groups=None, confidence=CONFIDENCE, draws=BOOTSTRAP_DRAWS, seed=0):
    """Percentile bootstrap interval of the slope, resampling seed sets (both points of a seed set
    together). ``groups`` (one label per point, e.g. the method) makes it the within-group slope.
    Resamples whose x does not vary are skipped. Returns (low, high)."""
    x = np.asarray(x_pairs, dtype=np.float64).reshape(-1, 2)
    y = np.asarray(y_pairs, dtype=np.float64).reshape(-1, 2)
    g = None if groups is None else np.asarray(groups).reshape(-1, 2)
    k = len(x)
    if k < 2:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(draws):
        pick = rng.integers(0, k, size=k)
        if g is None:
            slope = ols_slope(x[pick].ravel(), y[pick].ravel())
        else:
            slope = within_slope(x[pick].ravel(), y[pick].ravel(), g[pick].ravel())
        if math.isfinite(slope):
            slopes.append(slope)
    if not slopes:
        return NAN, NAN
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(slopes, [tail, 100 - tail])
    return float(low), float(high)


def minimum_detectable_effect(sd, n, alpha=ALPHA, power=POWER, sides=2):
    """Smallest true mean paired difference a t-test on n pairs detects with the given power, in the
    units of sd (the sd of the paired differences): (t_{1−α/sides, n−1} + t_{power, n−1})·sd/√n."""
    if n < 2 or not math.isfinite(sd):
        return NAN
    critical = stats.t.ppf(1 - alpha / sides, n - 1)
    return float((critical + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


# ------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Comparison:
    """Method against baseline on one number of their ensembles, paired by seed set."""
    key: str
    claim: str          # in words
    method: str
    baseline: str
    metric: str         # a column of results/claims/ensembles.csv
    scale: str          # "log_ratio" (d = ln(method / baseline)) or "difference" (d = method − baseline)
    expect: str         # "lower", "higher", or "below_margin" (non-inferiority: d < ln(1 + margin))
    margin: float = 0.0


def paired_values(rows, comparison):
    """(differences, seed sets used, left out "seed set (reason)") for ``rows`` of one setting and checkpoint."""
    by_key = {(r["method"], r["seed_set"]): r for r in rows}
    seed_sets = sorted({r["seed_set"] for r in rows}, key=seed_set_order)
    differences, used, left_out = [], [], []
    for seed_set in seed_sets:
        values, reasons = [], []
        for method in (comparison.method, comparison.baseline):
            row = by_key.get((method, seed_set))
            value = NAN if row is None else row.get(comparison.metric, NAN)
            if row is None:
                reasons.append(f"{method}: no ensemble")
            elif row.get("incomplete"):
                reasons.append(f"{method}: {row['incomplete']}")
            elif not (isinstance(value, float) and math.isfinite(value)):
                reasons.append(f"{method}: no {comparison.metric}")
            elif comparison.scale == "log_ratio" and not value > 0:
                reasons.append(f"{method}: {comparison.metric} ≤ 0, no log ratio")
            values.append(value)
        if reasons:
            left_out.append(f"{seed_set} ({'; '.join(reasons)})")
            continue
        a, b = values
        differences.append(math.log(a / b) if comparison.scale == "log_ratio" else a - b)
        used.append(seed_set)
    return differences, used, left_out


def seed_set_order(seed_set):
    """Sort key of "13 17 27"-style seed sets: by their seeds as numbers."""
    return tuple(int(s) for s in str(seed_set).split())


def threshold(comparison):
    """Where the claimed side begins, on the scale of d: 0, or ln(1 + margin) for non-inferiority."""
    return math.log1p(comparison.margin) if comparison.expect == "below_margin" else 0.0


def claimed_side(comparison, d):
    """True where d lies on the claimed side (strictly)."""
    edge = threshold(comparison)
    return d > edge if comparison.expect == "higher" else d < edge


def evaluate(comparison, rows, confidence=CONFIDENCE):
    """One comparison: n, mean, sd, t-interval, sign-flip p (two-sided; one-sided against the margin
    for non-inferiority), k of n seed sets on the claimed side, the MDE at 0.05 and at 0.01."""
    differences, used, left_out = paired_values(rows, comparison)
    result = dict(key=comparison.key, claim=comparison.claim, method=comparison.method,
                  baseline=comparison.baseline, metric=comparison.metric, scale=comparison.scale,
                  expect=comparison.expect, margin=comparison.margin, n=len(differences),
                  differences=differences, used=used, left_out=left_out, mean=NAN, sd=NAN, low=NAN, high=NAN,
                  p=NAN, k=sum(claimed_side(comparison, d) for d in differences), mde_05=NAN, mde_01=NAN)
    if differences:
        result["mean"] = float(np.mean(differences))
    if len(differences) >= 2:
        interval = t_interval(differences, confidence)
        sides = 1 if comparison.expect == "below_margin" else 2
        result.update(sd=interval["sd"], low=interval["low"], high=interval["high"],
                      mde_05=minimum_detectable_effect(interval["sd"], len(differences), 0.05, sides=sides),
                      mde_01=minimum_detectable_effect(interval["sd"], len(differences), 0.01, sides=sides))
    if differences:
        if comparison.expect == "below_margin":
            result["p"] = sign_flip_p(differences, "less", shift=threshold(comparison))
        else:
            result["p"] = sign_flip_p(differences)
    return result


def interval_side(result):
    """Where the t-interval lies, for secondary rows (no multiplicity control): claimed side,
    other side, or across (it contains the threshold)."""
    if not (math.isfinite(result["low"]) and math.isfinite(result["high"])):
        return "no interval"
    edge = math.log1p(result["margin"]) if result["expect"] == "below_margin" else 0.0
    if result["expect"] == "higher":
        return "claimed side" if result["low"] > edge else "other side" if result["high"] < edge else "contains 0"
    if result["high"] < edge:
        return "claimed side"
    if result["low"] > edge:
        return "other side"
    return "contains the margin" if result["expect"] == "below_margin" else "contains 0"


# ------------------------------------------------------------------------------------- the setting
def setting_rows(rows, epochs, width, rho, checkpoint="best"):
    """The ensembles of one setting: Deep Ensemble of (epochs, width) and the SAM-based methods with SAM's rho."""
    chosen = []
    for r in rows:
        if r["epochs"] != epochs or r["width"] != width or r["checkpoint"] != checkpoint:
            continue
        if r["method"] == "deep_ensemble" or r["sam_rho"] == rho:
            chosen.append(r)
    return chosen


def control_comparisons():
    """The positive control's comparisons: the two of the criterion, then the release's radius."""
    return [
        Comparison("control_worst_case", f"SAM members flatter: worst-case sharpness, radius {CONTROL_RADIUS}",
                   "sam", "deep_ensemble", f"sharpness_{CONTROL_RADIUS}", "log_ratio", "lower"),
        Comparison("control_fisher", "SAM members flatter: Fisher trace", "sam", "deep_ensemble", "fisher",
                   "log_ratio", "lower"),
        Comparison("control_release_radius", f"SAM members flatter: worst-case sharpness, radius {RELEASE_RADIUS}",
                   "sam", "deep_ensemble", f"sharpness_{RELEASE_RADIUS}", "log_ratio", "lower"),
    ]


def control(rows, min_seed_sets=MIN_SEED_SETS, checkpoint="best"):
    """Every control setting in ``rows`` (a (epochs, width, SAM rho) with Deep Ensemble and DE + SAM
    ensembles of ``checkpoint``: best, the pre-registered one, or last, exploratory), in the order
    tried, with its three comparisons and whether it passes."""
    settings = sorted({(r["epochs"], r["width"], r["sam_rho"]) for r in rows
                       if r["method"] == "sam" and r["checkpoint"] == checkpoint}, key=setting_order)
    results = []
    for epochs, width, rho in settings:
        chosen = [r for r in setting_rows(rows, epochs, width, rho, checkpoint) if r["method"] in ("sam", "deep_ensemble")]
        comparisons = [evaluate(c, chosen) for c in control_comparisons()]
        criterion = comparisons[:2]
        enough = all(c["n"] >= min_seed_sets for c in criterion)
        passed = enough and all(math.isfinite(c["high"]) and c["high"] < 0 for c in criterion)
        results.append(dict(epochs=epochs, width=width, rho=rho, comparisons=comparisons, passed=passed,
                            enough=enough, cell=cell_index(epochs, width)))
    return results


def cell_index(epochs, width):
    """Position of (epochs, width) in CONTROL_CELLS; None outside the pre-registered grid."""
    try:
        return CONTROL_CELLS.index((epochs, width))
    except ValueError:
        return None


def setting_order(setting):
    """Sort key of (epochs, width, rho): the grid's order, rho in CONTROL_RHOS's order; others after."""
    epochs, width, rho = setting
    cell = cell_index(epochs, width)
    rank = CONTROL_RHOS.index(rho) if rho in CONTROL_RHOS else len(CONTROL_RHOS)
    return (cell if cell is not None else len(CONTROL_CELLS), epochs, width, rank, rho)


def chosen_setting(control_results):
    """The pre-registered decision: the first cell in CONTROL_CELLS's order with a passing setting,
    within it the first passing rho in CONTROL_RHOS's order. None when no setting passes."""
    for cell in range(len(CONTROL_CELLS)):
        passing = [c for c in control_results if c["cell"] == cell and c["passed"]]
        if passing:
            return min(passing, key=lambda c: setting_order((c["epochs"], c["width"], c["rho"])))
    return None


def selection_count(epochs, width):
    """How many control settings a setting in cell (epochs, width) was chosen from: every rho of every
    cell up to and including it (the grid is run in order). 1 outside the grid (no selection)."""
    cell = cell_index(epochs, width)
    return 1 if cell is None else len(CONTROL_RHOS) * (cell + 1)


# ------------------------------------------------------------------------------------- the claims
SHARPBALANCE = "sharpbalance"
SHARPBALANCE_SHARPEST = "sharpbalance_sharpest"


def primary_comparisons(sharpbalance=SHARPBALANCE):
    """Claims (a), (c), (d), (e) as comparisons; (b) is the slope (trade_off)."""
    radius = f"sharpness_{CONTROL_RADIUS}"
    return {
        "a": Comparison("a", "SAM members are flatter than SGD members", "sam", "deep_ensemble", radius,
                        "log_ratio", "lower"),
        "c": Comparison("c", "SharpBalance ensembles are more diverse than DE + SAM", sharpbalance, "sam", "der_ood",
                        "difference", "higher"),
        "d": Comparison("d", f"SharpBalance members are about as flat as DE + SAM members (at most "
                             f"{FLATNESS_MARGIN:.0%} sharper)", sharpbalance, "sam", radius, "log_ratio",
                        "below_margin", FLATNESS_MARGIN),
        "e": Comparison("e", "SharpBalance ensembles are more accurate than DE + SAM under corruption", sharpbalance,
                        "sam", "ensemble_acc_ood", "difference", "higher"),
    }


def trade_off(rows, diversity="der_ood", sharpness=f"sharpness_{CONTROL_RADIUS}", methods=("deep_ensemble", "sam"),
              within=False, draws=BOOTSTRAP_DRAWS):
    """Claim (b): slope of ``diversity`` on ln(``sharpness``) over the ensembles of two methods, one pair
    of points per seed set. within=True: the within-method slope (one intercept per method), with its
    bootstrap interval and no p. Returns a dict like evaluate's."""
    by_key = {(r["method"], r["seed_set"]): r for r in rows}
    x_pairs, y_pairs, used, left_out = [], [], [], []
    for seed_set in sorted({r["seed_set"] for r in rows}, key=seed_set_order):
        xs, ys, reasons = [], [], []
        for method in methods:
            row = by_key.get((method, seed_set))
            if row is None:
                reasons.append(f"{method}: no ensemble")
                continue
            if row.get("incomplete"):
                reasons.append(f"{method}: {row['incomplete']}")
                continue
            x, y = row.get(sharpness, NAN), row.get(diversity, NAN)
            if not (math.isfinite(x) and x > 0 and math.isfinite(y)):
                reasons.append(f"{method}: no {sharpness} or {diversity}")
                continue
            xs.append(math.log(x))
            ys.append(y)
        if reasons:
            left_out.append(f"{seed_set} ({'; '.join(reasons)})")
            continue
        x_pairs.append(xs)
        y_pairs.append(ys)
        used.append(seed_set)
    n = len(used)
    result = dict(key="b_within" if within else "b", metric=f"{diversity} on ln {sharpness}", method=methods[1],
                  baseline=methods[0], scale="slope", expect="higher", margin=0.0, n=n, used=used,
                  left_out=left_out, x_pairs=x_pairs, y_pairs=y_pairs, mean=NAN, sd=NAN, low=NAN, high=NAN, p=NAN,
                  k=0, mde_05=NAN, mde_01=NAN, differences=[])
    if n == 0:
        return result
    x = np.asarray(x_pairs).ravel()
    y = np.asarray(y_pairs).ravel()
    groups = np.tile(np.arange(2), n)
    result["mean"] = within_slope(x, y, groups) if within else ols_slope(x, y)
    # seed sets whose pair moves the claimed way: the sharper ensemble of the two is the more diverse
    result["k"] = int(sum((xs[1] - xs[0]) * (ys[1] - ys[0]) > 0 for xs, ys in zip(x_pairs, y_pairs)))
    if n >= 2:
        result["low"], result["high"] = bootstrap_slope_interval(
            x_pairs, y_pairs, groups.reshape(-1, 2) if within else None, draws=draws)
        if not within:
            result["p"] = slope_swap_p(x_pairs, y_pairs)
    return result


def verdict(adjusted_p, result, alpha=ALPHA):
    """holds / contradicted / not shown for a primary test from its Holm-adjusted p and its estimate."""
    if result["n"] == 0 or not math.isfinite(adjusted_p):
        return "not testable"
    if adjusted_p > alpha:
        return "not shown"
    if result["expect"] == "below_margin":
        return "holds"
    on_claimed_side = result["mean"] > 0 if result["expect"] == "higher" else result["mean"] < 0
    return "holds" if on_claimed_side else "contradicted"


def primary(rows, selection=1, sharpbalance=SHARPBALANCE, min_seed_sets=MIN_SEED_SETS, draws=BOOTSTRAP_DRAWS):
    """The five primary tests on the best checkpoints of one setting, Holm across them.

    ``selection``: how many control settings this one was chosen from; claim (a)'s p is multiplied by
    it. A test with fewer than ``min_seed_sets`` usable seed sets enters Holm with p = 1 and is
    reported as not testable."""
    comparisons = primary_comparisons(sharpbalance)
    results = {key: evaluate(comparison, rows) for key, comparison in comparisons.items()}
    results["b"] = trade_off(rows, draws=draws)
    results["b"]["claim"] = "Sharpness-diversity trade-off: sharper ensembles are more diverse"
    ordered = [results[key] for key in "abcde"]
    for result in ordered:
        result["testable"] = result["n"] >= min_seed_sets
        result["p_for_holm"] = NAN if not result["testable"] else (
            min(1.0, result["p"] * selection) if result["key"] == "a" else result["p"])
    adjusted = holm([r["p_for_holm"] for r in ordered])
    for result, p in zip(ordered, adjusted):
        result["p_holm"] = p if result["testable"] else NAN
        result["verdict"] = verdict(p, result) if result["testable"] else (
            f"not testable ({result['n']} usable seed sets, {min_seed_sets} needed)")
    return ordered


def secondary_comparisons(sharpbalance=SHARPBALANCE):
    """Comparisons reported without multiplicity control."""
    release = f"sharpness_{RELEASE_RADIUS}"
    return [
        Comparison("a_fisher", "(a) SAM flatter: Fisher trace", "sam", "deep_ensemble", "fisher", "log_ratio", "lower"),
        Comparison("a_release_radius", f"(a) SAM flatter: worst-case sharpness, radius {RELEASE_RADIUS}", "sam",
                   "deep_ensemble", release, "log_ratio", "lower"),
        Comparison("b_disagreement", "(b) SAM less diverse: disagreement, digits-C", "sam", "deep_ensemble",
                   "disagreement_ood", "difference", "lower"),
        Comparison("b_variance", "(b) SAM less diverse: logit variance, digits-C", "sam", "deep_ensemble",
                   "variance_ood", "difference", "lower"),
        Comparison("b_der", "(b) SAM less diverse: DER, digits-C", "sam", "deep_ensemble", "der_ood", "difference",
                   "lower"),
        Comparison("c_disagreement", "(c) SharpBalance more diverse: disagreement, digits-C", sharpbalance, "sam",
                   "disagreement_ood", "difference", "higher"),
        Comparison("c_variance", "(c) SharpBalance more diverse: logit variance, digits-C", sharpbalance, "sam",
                   "variance_ood", "difference", "higher"),
        Comparison("d_fisher", f"(d) SharpBalance at most {FLATNESS_MARGIN:.0%} sharper: Fisher trace",
                   sharpbalance, "sam", "fisher", "log_ratio", "below_margin", FLATNESS_MARGIN),
        Comparison("d_release_radius", f"(d) SharpBalance at most {FLATNESS_MARGIN:.0%} sharper: radius "
                   f"{RELEASE_RADIUS}", sharpbalance, "sam", release, "log_ratio", "below_margin", FLATNESS_MARGIN),
        Comparison("e_clean", "(e) SharpBalance more accurate: clean test set", sharpbalance, "sam",
                   "ensemble_acc_id", "difference", "higher"),
        Comparison("sam_vs_de_ood", "DE + SAM more accurate than Deep Ensemble: digits-C", "sam", "deep_ensemble",
                   "ensemble_acc_ood", "difference", "higher"),
        Comparison("sam_vs_de_clean", "DE + SAM more accurate than Deep Ensemble: clean test set", "sam",
                   "deep_ensemble", "ensemble_acc_id", "difference", "higher"),
        Comparison("gain_sam_vs_de", "DE + SAM gains less from ensembling than Deep Ensemble: digits-C", "sam",
                   "deep_ensemble", "gain_ood", "difference", "lower"),
        Comparison("gain_sb_vs_sam", "SharpBalance gains more from ensembling than DE + SAM: digits-C",
                   sharpbalance, "sam", "gain_ood", "difference", "higher"),
    ]


def sensitivity_comparisons(sharpbalance=SHARPBALANCE):
    """Claims (c), (d), (e) on the last checkpoints instead of model_best."""
    comparisons = primary_comparisons(sharpbalance)
    return [comparisons[key] for key in "cde"]


def half_phase_initial_epochs(epochs):
    """--initial_epochs that gives SharpBalance's own (mixed) phase half of the training: SAM on all data
    for epochs/2 epochs (initial_epochs + 1 of them), then the partition and epochs − epochs/2 mixed epochs."""
    if epochs < 2:
        raise ValueError(f"SharpBalance needs at least 2 epochs to have a phase of its own, got {epochs}")
    return epochs // 2 - 1


def main(argv=None):
    """The design's numbers for scripts/claims.sh, one per line: ``seed-sets K``, ``cells``, ``rhos``,
    ``initial-epochs EPOCHS``."""
    import sys
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command == "seed-sets" and len(args) == 2:
        print(";".join(" ".join(map(str, s)) for s in default_seed_sets(int(args[1]))))
    elif command == "cells" and len(args) == 1:
        print("\n".join(f"{epochs} {width}" for epochs, width in CONTROL_CELLS))
    elif command == "rhos" and len(args) == 1:
        print(" ".join(f"{rho:g}" for rho in CONTROL_RHOS))
    elif command == "initial-epochs" and len(args) == 2:
        print(half_phase_initial_epochs(int(args[1])))
    else:
        print("usage: python -m reporting.claims seed-sets K | cells | rhos | initial-epochs EPOCHS", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
