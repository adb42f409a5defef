"""The claims (scripts/claims.sh): the statistics against hand-worked examples, scipy and brute-force
enumerations; the evidence read from fabricated run and result folders, and refused when it mixes
settings; the report's tables rebuilt byte for byte from the committed evidence; claims.sh end to end
at toy size and its one-line refusals."""
import csv
import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from reporting import claims, claims_report, evidence
from reporting.results import ensemble_folder
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_975 = {2: 4.302653, 3: 3.182446, 4: 2.776445}  # t_{0.975, df} from a printed t table
NAN = float("nan")


# ------------------------------------------------------------------------------------- statistics
def test_t_interval_hand_worked():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/√3, t_{0.975,2} = 4.302653
    interval = claims.t_interval([1.0, 2.0, 3.0])
    half = T_975[2] / math.sqrt(3)
    assert interval["mean"] == pytest.approx(2.0) and interval["sd"] == pytest.approx(1.0)
    assert (interval["low"], interval["high"]) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    # d = [1, 2, 3, 4]: mean 2.5, sd √(5/3), t_{0.975,3} = 3.182446 -> [0.4457, 4.5543]
    interval = claims.t_interval([1.0, 2.0, 3.0, 4.0])
    assert interval["low"] == pytest.approx(0.4457, abs=1e-4) and interval["high"] == pytest.approx(4.5543, abs=1e-4)
    for differences in ([], [1.0]):
        with pytest.raises(ValueError, match="at least two seed sets"):
            claims.t_interval(differences)
    d = np.random.default_rng(5).normal(0.2, 1.0, 12)
    reference = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    interval = claims.t_interval(d)
    assert (interval["low"], interval["high"]) == (pytest.approx(reference.low, abs=1e-12),
                                                   pytest.approx(reference.high, abs=1e-12))


def brute_sign_flip(d, alternative="two-sided", shift=0.0):
    """Every sign pattern, one at a time, with Python floats: the count the vectorised test must match."""
    d = [x - shift for x in d]
    observed = sum(d) / len(d)
    hits = 0
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    for signs in patterns:
        mean = sum(s * x for s, x in zip(signs, d)) / len(d)
        if alternative == "two-sided":
            hits += abs(mean) >= abs(observed) - 1e-12
        elif alternative == "less":
            hits += mean <= observed + 1e-12
        else:
            hits += mean >= observed - 1e-12
    return hits / len(patterns)


def test_sign_flip_p_hand_worked_and_brute_force():
    # [1, 2, 3]: sums of the 8 patterns 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice -> 2/8
    assert claims.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # one-sided: mean <= observed (2) for every pattern but none above... all 8 sums <= 6 -> 1; "greater": 1/8
    assert claims.sign_flip_p([1.0, 2.0, 3.0], "less") == pytest.approx(1.0)
    assert claims.sign_flip_p([1.0, 2.0, 3.0], "greater") == pytest.approx(1 / 8)
    # twelve values on one side: the smallest two-sided p, 2/4096, below Holm's first threshold 0.05/5
    assert claims.sign_flip_p([0.5] * 12) == pytest.approx(2 / 4096) and 2 / 4096 < 0.01
    # non-inferiority: d = ln ratios all below ln 1.1 -> shifted values all negative -> p = 1/2^n
    d = [math.log(r) for r in (0.9, 1.0, 1.05, 0.95)]
    assert claims.sign_flip_p(d, "less", shift=math.log(1.1)) == pytest.approx(1 / 16)
    rng = np.random.default_rng(3)
    for n in (5, 8, 11):
        d = list(rng.normal(0.3, 1.0, n))
        for alternative in ("two-sided", "less", "greater"):
            for shift in (0.0, 0.2):
                assert claims.sign_flip_p(d, alternative, shift) == pytest.approx(brute_sign_flip(d, alternative, shift))
    # the Monte Carlo path for large n: all 20 on one side, the exact p would be 2^-19
    assert claims.sign_flip_p([1.0] * 20, exact_up_to=16, draws=2000) < 0.01


def test_holm_hand_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4. Sorted: 0.005·4 = 0.02; 0.01·3 = 0.03; 0.03·2 = 0.06; 0.04·1 = 0.04,
    # raised to the running maximum 0.06. Back in the input's order:
    assert claims.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and an untestable claim (NaN) counts as p = 1 and still counts in m
    assert claims.holm([0.5, NAN, 0.001]) == pytest.approx([1.0, 1.0, 0.003])


def test_slopes_against_least_squares():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=24), rng.normal(size=24)
    assert claims.ols_slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0])
    groups = np.tile([0, 1], 12)
    design = np.column_stack([x, groups == 0, groups == 1]).astype(float)  # one intercept per group
    assert claims.within_slope(x, y, groups) == pytest.approx(np.linalg.lstsq(design, y, rcond=None)[0][0])
    assert math.isnan(claims.ols_slope([1.0, 1.0], [0.0, 2.0]))


def test_slope_swap_p_against_explicit_swaps():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 2))
    y = rng.normal(size=(7, 2)) + 0.8 * x
    observed = abs(np.polyfit(x.ravel(), y.ravel(), 1)[0])
    hits = 0
    for swaps in itertools.product((False, True), repeat=7):
        y_swapped = np.array([pair[::-1] if swap else pair for pair, swap in zip(y, swaps)])
        hits += abs(np.polyfit(x.ravel(), y_swapped.ravel(), 1)[0]) >= observed - 1e-12
    assert claims.slope_swap_p(x, y) == pytest.approx(hits / 2 ** 7)


def test_bootstrap_interval_of_an_exact_line_is_the_slope():
    x = np.arange(12.0).reshape(6, 2)
    low, high = claims.bootstrap_slope_interval(x, 3.0 * x + 1.0, draws=200)
    assert low == pytest.approx(3.0) and high == pytest.approx(3.0)
    rng = np.random.default_rng(2)
    noisy = 3.0 * x + rng.normal(0, 0.5, x.shape)
    low, high = claims.bootstrap_slope_interval(x, noisy, draws=500)
    assert low < claims.ols_slope(x.ravel(), noisy.ravel()) < high
    assert claims.bootstrap_slope_interval(x, noisy, draws=500) == (low, high)  # seeded: the same every time


def test_minimum_detectable_effect_has_the_power_it_claims():
    # at the MDE, the two-sided t-test's power from the noncentral t distribution is about 80%
    for n, alpha in ((12, 0.05), (12, 0.01), (8, 0.05)):
        mde = claims.minimum_detectable_effect(1.0, n, alpha)
        critical = stats.t.ppf(1 - alpha / 2, n - 1)
        power = stats.nct.sf(critical, n - 1, mde * math.sqrt(n)) + stats.nct.cdf(-critical, n - 1, mde * math.sqrt(n))
        assert power == pytest.approx(0.80, abs=0.02)
    assert claims.minimum_detectable_effect(1.0, 12, 0.01) == pytest.approx(1.149, abs=1e-3)


def test_half_phase_and_seed_sets():
    assert claims.half_phase_initial_epochs(20) == 9   # SAM epochs 1-10, mixed epochs 11-20
    assert claims.half_phase_initial_epochs(2) == 0
    with pytest.raises(ValueError):
        claims.half_phase_initial_epochs(1)
    sets = claims.default_seed_sets(12)
    assert sets[:4] == [(13, 17, 27), (113, 117, 127), (43, 59, 223), (213, 217, 227)]
    assert len({s for triple in sets for s in triple}) == 36
    assert ensemble_folder((13, 17, 27)) == ensemble_folder("13 17 27") == "seeds_13_17_27"


# ------------------------------------------------------------------------------------- claims on rows
SETS = [" ".join(map(str, s)) for s in claims.default_seed_sets(12)]


def row(method, seed_set, epochs=20, width=8, rho=0.2, checkpoint="best", **values):
    base = {"epochs": epochs, "width": width, "method": method, "sam_rho": NAN if method == "deep_ensemble" else rho,
            "seed_set": seed_set, "checkpoint": checkpoint, "incomplete": "", "sharpness_0.05": 0.02,
            "sharpness_0.5": 2.0, "fisher": 50.0, "der_ood": 1.0, "ensemble_acc_ood": 80.0}
    base.update(values)
    return base


def test_paired_values_name_what_they_leave_out():
    rows = [row("sam", s, fisher=10.0 * (k + 1)) for k, s in enumerate(SETS[:4])]
    rows += [row("deep_ensemble", s, fisher=20.0 * (k + 1)) for k, s in enumerate(SETS[:3])]
    rows[1]["incomplete"] = "2 of 3 members measured"
    rows[6]["fisher"] = NAN
    comparison = claims.control_comparisons()[1]
    differences, used, left_out = claims.paired_values(rows, comparison)
    assert differences == pytest.approx([math.log(0.5)]) and used == [SETS[0]]
    assert left_out == [f"{SETS[2]} (deep_ensemble: no fisher)", f"{SETS[1]} (sam: 2 of 3 members measured)",
                        f"{SETS[3]} (deep_ensemble: no ensemble)"]  # seed sets in numeric order: 43 before 113


def fabricated_claims(sam_factor=0.6, sb_acc_gain=0.5, n=12, seed=0):
    """Rows of one setting: SAM members sharper or flatter by sam_factor, SharpBalance more accurate."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in SETS[:n]:
        level = math.exp(rng.normal(0, 0.3))
        rows.append(row("deep_ensemble", s, **{"sharpness_0.05": 0.03 * level, "fisher": 60 * level,
                                              "der_ood": 1.00 + rng.normal(0, 0.01)}))
        sam = 0.03 * level * sam_factor * math.exp(rng.normal(0, 0.05))
        rows.append(row("sam", s, **{"sharpness_0.05": sam, "fisher": 60 * level * sam_factor,
                                     "der_ood": 0.95 + rng.normal(0, 0.01), "ensemble_acc_ood": 79.0}))
        rows.append(row("sharpbalance", s, **{"sharpness_0.05": sam * math.exp(rng.normal(-0.2, 0.05)),
                                              "der_ood": 0.97 + rng.normal(0, 0.01),
                                              "ensemble_acc_ood": 79.0 + sb_acc_gain + rng.normal(0, 0.1)}))
    return rows


def test_primary_holm_verdicts_and_selection():
    rows = fabricated_claims()
    results = claims.primary(rows, selection=4, draws=300)
    by_key = {r["key"]: r for r in results}
    assert [r["key"] for r in results] == list("abcde")
    a = by_key["a"]
    assert a["k"] == 12 and a["p"] == pytest.approx(2 / 4096) and a["p_for_holm"] == pytest.approx(8 / 4096)
    expected = claims.holm([r["p_for_holm"] for r in results])
    assert [r["p_holm"] for r in results] == pytest.approx(expected)
    assert by_key["a"]["verdict"] == "holds" and by_key["e"]["verdict"] == "holds"
    # (d): SharpBalance about 18% flatter than DE + SAM in every seed set: below the +10% margin
    assert by_key["d"]["p"] == pytest.approx(1 / 4096) and by_key["d"]["verdict"] == "holds"
    # the other way round: DE + SAM more accurate in every seed set is a contradiction, not "not shown"
    worse = claims.primary(fabricated_claims(sb_acc_gain=-0.5), draws=300)
    assert worse[4]["verdict"] == "contradicted"
    # too few seed sets: not testable, entering Holm as p = 1
    few = claims.primary(fabricated_claims(n=6), draws=300)
    assert all(r["verdict"].startswith("not testable") for r in few)


def test_control_decision_follows_the_grid_order():
    rows = []
    for epochs, width, rho, factor in ((20, 8, 0.2, 1.3), (20, 8, 0.05, 1.1), (40, 8, 0.2, 0.9), (40, 8, 0.05, 0.5)):
        for k, s in enumerate(SETS):
            noise = 1.0 + 0.02 * ((k % 3) - 1)
            rows.append(row("deep_ensemble", s, epochs, width, **{"sharpness_0.05": 0.03, "fisher": 50.0}))
            rows.append(row("sam", s, epochs, width, rho, **{"sharpness_0.05": 0.03 * factor * noise,
                                                            "fisher": 50.0 * factor * noise}))
    # deep_ensemble rows of a cell appear once per rho here: keep one per (epochs, width, seed set)
    unique = {(r["epochs"], r["width"], r["method"], r["sam_rho"] if r["method"] == "sam" else None, r["seed_set"]): r
              for r in rows}
    results = claims.control(list(unique.values()))
    assert [(c["epochs"], c["rho"], c["passed"]) for c in results] == [
        (20, 0.2, False), (20, 0.05, False), (40, 0.2, True), (40, 0.05, True)]
    chosen = claims.chosen_setting(results)
    assert (chosen["epochs"], chosen["rho"]) == (40, 0.2)  # both pass in cell 2: rho 0.2 first
    assert claims.selection_count(40, 8) == 4 and claims.selection_count(20, 8) == 2
    assert claims.selection_count(30, 8) == 1  # outside the grid: no selection to correct for


# ------------------------------------------------------------------------------------- evidence
def write_run_and_results(root, setting, method, seeds, epochs=2, width=4, rho=0.2, batch_num=2, members=None,
                          checkpoint="model_best.pth.tar", sharpness=0.02, accuracy=0.8):
    """A run folder (args.json, empty member folders) and its result files, in the layout figure7.sh
    writes, with the keys the measure scripts write (only those the evidence reads)."""
    tag = ensemble_folder(seeds)
    run = os.path.join(root, setting, "runs", "digits", method, tag)
    save = os.path.join(root, setting, "results", "digits", method, tag)
    os.makedirs(save)
    sam = method != "deep_ensemble"
    sharpbalance = method.startswith("sharpbalance")
    args = {"data": "digits", "model": "resnet18", "batch_size": 64, "lr": 0.1, "lrsche": "multistep",
            "momentum": 0.9, "weight_decay": 5e-4, "train_subset": "boosting", "split_rule": "auto",
            "freeze_bn_on_perturbed": False, "amp": "off", "tiny_val": "holdout", "shortcut_scale": True,
            "epochs": epochs, "width": width, "sam": sam, "rho": rho if sam else 0.05,
            "flat_ratio": 0.5 if sharpbalance else 0.0, "initial_epochs": 0 if sharpbalance else -1,
            "select": "sharpest" if method == "sharpbalance_sharpest" else "flattest", "seeds": list(seeds)}
    for seed in seeds:
        os.makedirs(os.path.join(run, f"seed_{seed}"))
    with open(os.path.join(run, "args.json"), "w") as f:
        json.dump(args, f)
    count = len(seeds) if members is None else members
    member_meta = [{"seed": s, "epoch": 1 + i % epochs, "trained_epochs": epochs, "planned_epochs": epochs}
                   for i, s in enumerate(seeds[:count])]
    meta = {"checkpoints": [os.path.join(run, f"seed_{s}", checkpoint) for s in seeds[:count]],
            "members": member_meta, "incomplete_ensemble": [], "dataset": "digits",
            "corruptions": ["gaussian_noise"], "ensemble_rule": "mean", "ece_bins": 15,
            "versions": {"torch": "2.14.1"}}
    sharp_meta = dict(meta, norms=["l2"], adaptive=True, n_iters=20, apgd_restart="release", batch_num=batch_num,
                      batch_size=5, batch_seed=13, logit_norm=False, preset="release", rho=[0.05, 0.5])
    split = lambda acc: {"ensemble_accuracy": acc, "average_individual_accuracy": acc - 0.02,  # noqa: E731
                         "individual_accuracy": [acc - 0.02] * count, "ensemble_loss": 0.5, "ensemble_ece": 0.03}
    files = {
        "predict": dict(meta=meta, test=split(0.98), corruptions={"ood": split(accuracy)}),
        "disagreement": dict(meta=meta, test={"mean_disagreement": 0.02},
                             corruptions={"ood": {"mean_disagreement": 0.2, "DER": 1.1}}),
        "variance_mse_c": dict(meta=meta, variance_unbias=30.0),
        "APGD_worst": dict(meta=sharp_meta, mean_sharpness={"l2_0.05": sharpness, "l2_0.5": 2.0},
                           individual_sharpness=[{"l2_0.05": {"sharpness": sharpness}}] * count),
        "fisher": dict(meta=sharp_meta, mean_fisher=40.0, individual_fisher=[40.0] * count),
    }
    for name, payload in files.items():
        with open(os.path.join(save, f"{name}.json"), "w") as f:
            json.dump(payload, f)
    return save


def test_evidence_from_run_records(tmp_path):
    root = str(tmp_path / "claims")
    for seeds in ((13, 17, 27), (113, 117, 127)):
        write_run_and_results(root, "e2_w4_rho0.2", "deep_ensemble", seeds, sharpness=0.04)
        write_run_and_results(root, "e2_w4_rho0.2", "sam", seeds, sharpness=0.02)
        write_run_and_results(root, "e2_w4_rho0.2", "sharpbalance", seeds, accuracy=0.81)
    write_run_and_results(root, "e2_w4_rho0.2/last", "sharpbalance", (13, 17, 27), checkpoint="checkpoint.pth.tar")
    ensembles, members, settings = evidence.collect(root)
    assert len(ensembles) == 7 and len(members) == 21
    sb = next(r for r in ensembles if r["method"] == "sharpbalance" and r["checkpoint"] == "best")
    assert (sb["epochs"], sb["width"], sb["sam_rho"], sb["flat_ratio"], sb["initial_epochs"]) == (2, 4, 0.2, 0.5, 0)
    assert sb["ensemble_acc_ood"] == pytest.approx(81.0) and sb["gain_ood"] == pytest.approx(2.0)
    assert math.isnan(next(r for r in ensembles if r["method"] == "deep_ensemble")["sam_rho"])
    assert {r["checkpoint"] for r in ensembles} == {"best", "last"}
    first = next(m for m in members if m["method"] == "sharpbalance" and m["seed"] == 13)
    assert (first["measured_epoch"], first["partition_epoch"], first["before_partition"]) == (1, 1, "yes")
    assert settings["shared"]["sharpness"]["batch_num"] == 2 and settings["seed_sets"] == ["13 17 27", "113 117 127"]

    out = str(tmp_path / "evidence")
    evidence.write(out, ensembles, members, settings)
    again = evidence.read_table(os.path.join(out, "ensembles.csv"))
    assert [r["sharpness_0.05"] for r in again] == [r["sharpness_0.05"] for r in ensembles]  # exact round trip
    blocks, analysis = claims_report.render(out, min_seed_sets=2, draws=50)
    assert analysis["setting"] == (2, 4, 0.2) and "ln(" not in blocks["primary"]
    a = analysis["primary"][0]
    assert a["differences"] == pytest.approx([math.log(0.5)] * 2) and a["n"] == 2


def run_evidence(root, tmp_path):
    return subprocess.run([sys.executable, "-m", "reporting.evidence", "--runs", root, "--out", str(tmp_path / "ev")],
                          cwd=ROOT, capture_output=True, text=True)


def test_evidence_refuses_other_settings_with_one_line(tmp_path):
    root = str(tmp_path / "claims")
    write_run_and_results(root, "e2_w4_rho0.2", "sam", (13, 17, 27))
    write_run_and_results(root, "e2_w4_rho0.2", "sam", (43, 59, 223))
    other = write_run_and_results(root, "e2_w4_rho0.2", "sam", (113, 117, 127), batch_num=10)
    result = run_evidence(root, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and os.path.join(other, "APGD_worst.json") in lines[0]
    assert "batch_num = 10, but 2 other ensemble(s) have 2" in lines[0]

    shutil.rmtree(root)
    save = write_run_and_results(root, "e2_w4_rho0.2", "sam", (13, 17, 27))
    moved = save.replace(os.path.join("digits", "sam"), os.path.join("digits", "sharpbalance"))
    os.makedirs(os.path.dirname(moved))
    os.rename(save, moved)  # a DE + SAM result filed as SharpBalance
    result = run_evidence(root, tmp_path)
    assert result.returncode == 2 and "the folder says sharpbalance but its run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    shutil.rmtree(root)
    save = write_run_and_results(root, "e2_w4_rho0.2", "sam", (13, 17, 27))
    os.remove(os.path.join(save, "predict.json").replace("predict", "APGD_worst"))
    result = run_evidence(root, tmp_path)
    assert result.returncode == 2 and "APGD_worst.json is missing" in result.stderr


def test_missing_seed_set_is_named_not_averaged(tmp_path):
    rows = fabricated_claims()
    rows = [r for r in rows if not (r["method"] == "sharpbalance" and r["seed_set"] == SETS[5])]
    results = {r["key"]: r for r in claims.primary(rows, draws=200)}
    assert results["e"]["n"] == 11 and results["a"]["n"] == 12
    assert results["e"]["left_out"] == [f"{SETS[5]} (sharpbalance: no ensemble)"]


def test_report_decides_and_writes_from_evidence_files(tmp_path, capsys):
    """claims_report on evidence files: --decide's exit status, the tables and both figures."""
    rows = fabricated_claims()
    for r in rows:
        r.update(flat_ratio=0.5 if r["method"] == "sharpbalance" else NAN,
                 initial_epochs=9 if r["method"] == "sharpbalance" else None)
    members = [{"epochs": 20, "width": 8, "method": r["method"], "sam_rho": r["sam_rho"], "seed_set": r["seed_set"],
                "checkpoint": "best", "seed": int(r["seed_set"].split()[0]), "measured_epoch": 10,
                "partition_epoch": 10 if r["method"] == "sharpbalance" else None,
                "before_partition": "yes" if r["method"] == "sharpbalance" else ""} for r in rows]
    settings = {"shared": {"training": {"data": "digits", "model": "resnet18", "batch_size": 64, "lr": 0.1,
                                        "lrsche": "multistep", "momentum": 0.9, "weight_decay": 5e-4, "amp": "off"},
                           "sharpness": {"batch_num": 20, "batch_size": 5, "batch_seed": 13, "adaptive": True,
                                         "norms": ["l2"], "n_iters": 20}},
                "settings": [], "seed_sets": SETS, "versions": {}, "collected_on": "test"}
    folder = str(tmp_path / "evidence")
    evidence.write(folder, rows, members, settings)
    assert claims_report.main(["--evidence", folder, "--decide", "--out", str(tmp_path / "report")]) == 0
    assert "control: passed at 20 epochs, width 8, SAM rho 0.2" in capsys.readouterr().out
    tables = open(tmp_path / "report" / "claims_tables.md").read()
    assert "| 20 | 8 | 0.2 | 12 |" in tables and "**yes** (chosen)" in tables
    assert "SharpBalance: 12 of 12 members measured at or before the partition" in tables
    assert "| **yes** (chosen) | 10 (10–10) / 10 (10–10) |" in tables
    assert "Not measured: `bash scripts/claims.sh --control-last`" in tables
    # the epoch column: median and range, worked by hand for five members of one method
    odd = [dict(m, measured_epoch=e) for m, e in zip((m for m in members if m["method"] == "sam"), (4, 9, 7, 20, 11))]
    assert claims_report.measured_epochs(odd, 20, 8, "sam", 0.2) == "9 (4–20)"
    assert claims_report.measured_epochs(odd[:4], 20, 8, "sam", 0.2) == "8 (4–20)"
    assert claims_report.measured_epochs(odd, 20, 8, "sam", 0.05) == "—"
    for name in ("claims_primary.png", "claims_control.png"):
        assert os.path.getsize(tmp_path / "report" / name) > 10_000
    flat = [dict(r, fisher=60.0) if r["method"] == "sam" else r for r in rows]  # SAM no flatter by Fisher
    evidence.write(folder, flat, members, settings)
    assert claims_report.main(["--evidence", folder, "--decide"]) == claims_report.NO_DECISION
    assert "control: no setting passed" in capsys.readouterr().out
    blocks, analysis = claims_report.render(folder, draws=100)
    assert "Caution: the positive control does not pass in the claims setting" in blocks["primary"]

    # the control on last checkpoints (exploratory): its own block, never the decision
    last = [dict(r, checkpoint="last") for r in flat if r["method"] in ("deep_ensemble", "sam")]
    de = {r["seed_set"]: r for r in last if r["method"] == "deep_ensemble"}  # SAM exactly half of DE's, per seed set
    last = [dict(r, **{"sharpness_0.05": de[r["seed_set"]]["sharpness_0.05"] * 0.5,
                       "fisher": de[r["seed_set"]]["fisher"] * 0.5}) if r["method"] == "sam" else r for r in last]
    last_members = [dict(m, checkpoint="last", measured_epoch=20) for m in members if m["method"] != "sharpbalance"]
    evidence.write(folder, flat + last, members + last_members, settings)
    blocks, analysis = claims_report.render(folder, draws=100)
    assert [c["passed"] for c in analysis["control_last"]] == [True] and analysis["chosen"] is None
    assert "| 20 | 8 | 0.2 | 12 | -50.0% [-50.0%, -50.0%] | 12 of 12 |" in blocks["control_last"]
    assert "| **yes** | 20 (20–20) / 20 (20–20) |" in blocks["control_last"]
    assert "Exploratory, not part of the pre-registered decision" in blocks["control_last"]
    assert "**yes**" not in blocks["control"]

    # --write fills the markers of a page and keeps the rest; --check then finds it equal
    page = tmp_path / "page.md"
    page.write_text("".join(f"text {n}\n<!-- claims:{n} -->\nold\n<!-- /claims:{n} -->\n" for n in claims_report.BLOCKS[1:])
                    + "end\n")
    page.write_text("text settings\n<!-- claims:settings -->\n<!-- /claims:settings -->\n" + page.read_text())  # empty
    assert claims_report.main(["--evidence", folder, "--write", str(page), "--check", str(page)]) in (0, None)
    text = page.read_text()
    assert "\nold\n" not in text and text.startswith("text settings\n") and text.endswith("end\n")
    blocks, _ = claims_report.render(folder)  # the default bootstrap draws, as main() used
    for n in claims_report.BLOCKS:
        assert f"text {n}\n<!-- claims:{n} -->\n{blocks[n]}\n<!-- /claims:{n} -->\n" in text
    page.write_text("<!-- claims:settings -->\nold\n")
    with pytest.raises(UserError, match="no '<!-- claims:settings -->' ... '<!-- /claims:settings -->' pair"):
        claims_report.write_document(blocks, str(page))
    assert page.read_text() == "<!-- claims:settings -->\nold\n"


# ------------------------------------------------------------------------------------- the committed evidence
EVIDENCE = os.path.join(ROOT, "results", "claims")
DOCUMENT = os.path.join(ROOT, "docs", "claims.md")


def test_docs_tables_rebuild_from_the_committed_evidence():
    """docs/claims.md's tables are exactly what reporting.claims_report makes of results/claims/."""
    blocks, _ = claims_report.render(EVIDENCE)
    text = open(DOCUMENT).read()
    for name in claims_report.BLOCKS:
        start, end = f"<!-- claims:{name} -->\n", f"\n<!-- /claims:{name} -->"
        assert start in text and end in text, name
        assert text.split(start, 1)[1].split(end, 1)[0] == blocks[name], name
    assert claims_report.check_document(blocks, DOCUMENT) is None
    changed = str(DOCUMENT) + ".changed"
    try:  # a changed number in the document is found
        first = blocks["control"].split("|")[5]
        with open(changed, "w") as f:
            f.write(text.replace(first, first + "0", 1))
        assert claims_report.check_document(blocks, changed) == "control"
    finally:
        os.remove(changed)


# ------------------------------------------------------------------------------------- claims.sh
def run_claims(env, *args, returncode=0):
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "claims.sh"), *args], env=full,
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == returncode, log[-4000:]
    return log


def test_claims_refuses_bad_input_with_one_line(tmp_path):
    for env, message in ((dict(K="1"), "a confidence interval needs at least two seed sets"),
                         (dict(SEED_SETS="13 17 27"), "a confidence interval needs at least two seed sets"),
                         (dict(K="x"), "K must be a whole number"),
                         (dict(SHARPNESS_BATCHES="0"), "SHARPNESS_BATCHES must be a positive whole number")):
        log = run_claims(dict(OUT=str(tmp_path / "claims"), **env), returncode=1)
        assert log.startswith("error:") and message in log and len(log.strip().splitlines()) == 1, log
        assert not os.path.exists(tmp_path / "claims" / "data")
    log = run_claims(dict(OUT=str(tmp_path / "claims")), "--controls", returncode=1)
    assert "unknown argument '--controls'" in log
    log = run_claims(dict(OUT=str(tmp_path / "claims")), "--control-last", returncode=1)
    assert log.startswith("error: no control setting with SAM rho 0.2 is trained in") and len(log.splitlines()) == 1


def test_the_deep_ensemble_is_shared_between_rhos_and_measured_once(tmp_path):
    """The control trains a cell's Deep Ensemble once: the second rho's folder links to its runs and
    results. --control-last at that second rho measures the Deep Ensemble's last checkpoints in the
    folder that holds its runs, never again through the link (the evidence would then hold each of
    those ensembles twice and refuse the whole run). figure7.sh is replaced by a stub that records
    what it is asked to do; the report after it finds nothing and fails."""
    repo = tmp_path / "repo"
    (repo / "scripts" / "train").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "claims.sh"), repo / "scripts")
    shutil.copy(os.path.join(ROOT, "scripts", "train", "_common.sh"), repo / "scripts" / "train")
    calls = tmp_path / "calls.txt"
    stub = repo / "scripts" / "figure7.sh"
    stub.write_text(f'#!/usr/bin/env bash\necho "$OUT|$METHODS|${{CHECKPOINT:-best}}" >> {calls}\n')
    stub.chmod(0o755)
    out = tmp_path / "claims"
    home, other = out / "e20_w8_rho0.2", out / "e20_w8_rho0.05"
    for part in ("runs", "results"):
        (home / part / "digits" / "deep_ensemble").mkdir(parents=True)
    for setting in (home, other):
        (setting / "runs" / "digits" / "sam").mkdir(parents=True, exist_ok=True)

    def claims_sh(argument, rho="0.2"):
        calls.write_text("")
        env = dict(os.environ, OUT=str(out), RHO=rho, PYTHONPATH=ROOT)
        result = subprocess.run(["bash", str(repo / "scripts" / "claims.sh"), argument], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0, result.stderr
        return result.stderr, calls.read_text().splitlines()

    stderr, asked = claims_sh("--control")  # cell 1, both rhos; then the report fails
    assert "no measured ensemble under" in stderr
    assert asked == [f"{home}|deep_ensemble sam|best", f"{other}|deep_ensemble sam|best"]
    for part in ("runs", "results"):
        link = other / part / "digits" / "deep_ensemble"
        assert os.path.islink(link) and os.path.realpath(link) == str(home / part / "digits" / "deep_ensemble")

    assert claims_sh("--control-last", "0.05")[1] == [f"{home}/last|deep_ensemble|last", f"{other}/last|sam|last"]
    assert claims_sh("--control-last", "0.2")[1] == [f"{home}/last|deep_ensemble sam|last"]
    os.unlink(other / "runs" / "digits" / "deep_ensemble")
    (home / "runs" / "digits" / "deep_ensemble").rmdir()
    stderr, asked = claims_sh("--control-last", "0.05")
    assert stderr.startswith("error: no Deep Ensemble runs for 20 epochs, width 8") and stderr.count("\n") == 1
    assert asked == []


def test_claims_end_to_end_toy(tmp_path):
    """Two seed sets, 2 epochs, width 4, SharpBalance only (the comparisons are exercised on fabricated
    files above; each step here is a process importing torch): training, measurement (also of the last
    checkpoints), the evidence from the runs' records and the report, which names the missing methods;
    then the evidence refuses a result measured with other settings."""
    out = str(tmp_path / "claims")
    few = "--corruptions gaussian_noise,contrast"
    env = dict(OUT=out, K="2", EPOCHS="2", WIDTH="4", SHARPNESS_BATCHES="2", SHARPNESS_FLAGS="--n_iters 3",
               MIN_SEED_SETS="2", DIVERSITY_EXTRA=few, VARIANCE_EXTRA=few, METHODS="sharpbalance")
    log = run_claims(env)
    assert "claims finished" in log
    with open(os.path.join(out, "evidence", "ensembles.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["checkpoint"], r["seed_set"]) for r in rows) == sorted(
        ("sharpbalance", c, s) for c in ("best", "last") for s in ("13 17 27", "113 117 127"))
    sb = next(r for r in rows if r["method"] == "sharpbalance")
    assert (sb["epochs"], sb["width"], sb["sam_rho"], sb["initial_epochs"]) == ("2", "4", "0.2", "0")
    settings = json.load(open(os.path.join(out, "evidence", "settings.json")))
    assert settings["shared"]["sharpness"]["batch_num"] == 2 and settings["shared"]["sharpness"]["n_iters"] == 3
    tables = open(os.path.join(out, "report", "claims_tables.md")).read()
    assert "<!-- claims:primary -->" in tables and "(e) SharpBalance" in tables
    assert "| (a) SAM members are flatter than SGD members |" in tables
    assert "13 17 27 (sharpbalance: no ensemble)" not in tables and "13 17 27 (sam: no ensemble)" in tables
    members = list(csv.DictReader(open(os.path.join(out, "evidence", "members.csv"), newline="")))
    assert {m["measured_epoch"] for m in members if m["checkpoint"] == "last"} == {"2"}
    assert {m["partition_epoch"] for m in members if m["method"] == "sharpbalance"} == {"1"}
    assert os.path.getsize(os.path.join(out, "report", "claims_primary.png")) > 10_000
    with open(os.path.join(out, "report", "claims_control.png"), "rb") as f:  # no DE/SAM pair: a labelled blank
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a result measured with other settings among them (here: 3 sharpness batches): refused, one line
    folder = os.path.join(out, "e2_w4_rho0.2", "results", "digits", "sharpbalance", "seeds_113_117_127")
    for name in ("APGD_worst.json", "fisher.json"):
        payload = json.load(open(os.path.join(folder, name)))
        payload["meta"]["batch_num"] = 3
        with open(os.path.join(folder, name), "w") as f:
            json.dump(payload, f)
    result = run_evidence(out, tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert os.path.join(folder, "APGD_worst.json") in result.stderr and "batch_num = 3" in result.stderr
