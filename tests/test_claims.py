"""The claims statistics (reporting/claims.py) against hand-worked examples, and scripts/report.py --claims
on fabricated measurement files: pairing by seed set, incomplete seed sets named and left out, K < 2."""
import csv
import json
import math
import os

import pytest

from reporting import claims

T_975 = {2: 4.302653, 3: 3.182446, 4: 2.776445}  # t_{0.975, df} from a printed t table


def test_t_interval_hand_worked():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/√3, t_{0.975,2} = 4.302653
    interval = claims.t_interval([1.0, 2.0, 3.0])
    half = T_975[2] * 1.0 / math.sqrt(3)
    assert interval["n"] == 3 and interval["mean"] == pytest.approx(2.0) and interval["sd"] == pytest.approx(1.0)
    assert interval["t"] == pytest.approx(T_975[2], abs=1e-6)
    assert (interval["low"], interval["high"]) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    assert interval["low"] == pytest.approx(-0.484138, abs=1e-6)  # contains 0
    assert claims.verdict(interval["low"], interval["high"], "higher") == "inconclusive"

    # d = [1, 2, 3, 4]: mean 2.5, sd √(5/3), t_{0.975,3} = 3.182446 -> [0.4457, 4.5543], above 0
    interval = claims.t_interval([1.0, 2.0, 3.0, 4.0])
    half = T_975[3] * math.sqrt(5 / 3) / 2
    assert interval["low"] == pytest.approx(2.5 - half, abs=1e-6) and interval["low"] == pytest.approx(0.4457, abs=1e-4)
    assert claims.verdict(interval["low"], interval["high"], "higher") == "holds"
    assert claims.verdict(interval["low"], interval["high"], "lower") == "contradicted"
    negated = claims.t_interval([-1.0, -2.0, -3.0, -4.0])
    assert claims.verdict(negated["low"], negated["high"], "lower") == "holds"

    # constant differences: no spread, the interval is the point itself
    point = claims.t_interval([0.5, 0.5])
    assert point["low"] == point["high"] == 0.5


def test_fewer_than_two_seed_sets_has_no_interval():
    for differences in ([], [1.0]):
        with pytest.raises(ValueError, match="at least two seed sets"):
            claims.t_interval(differences)


def test_sign_flip_p_hand_worked():
    # [1, 2, 3]: of the 8 sign patterns the sums are 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice -> 2/8
    assert claims.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # all 2^n patterns of n equal positive values: only all-plus and all-minus reach the observed |mean|
    assert claims.sign_flip_p([1.0] * 8) == pytest.approx(2 / 256)
    # [1, -1]: sums 0, 2, -2, 0 -> every |sum| >= 0 -> p = 1
    assert claims.sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    # the Monte Carlo path for large n agrees with the exact count on a case whose p is known: 2/2^n ~ 0
    assert claims.sign_flip_p([1.0] * 20, exact_up_to=16, draws=2000) < 0.01


def test_non_inferiority_verdict():
    margin = 0.10
    assert claims.verdict(-0.05, 0.08, "not_higher", margin) == "holds"      # at most 8 % sharper
    assert claims.verdict(-0.30, -0.20, "not_higher", margin) == "holds"     # flatter still holds
    assert claims.verdict(0.02, 0.15, "not_higher", margin) == "inconclusive"
    assert claims.verdict(0.12, 0.30, "not_higher", margin) == "contradicted"
    assert claims.verdict(float("nan"), 1.0, "higher") == "no interval"


def test_default_seed_sets_disjoint_and_start_with_the_papers():
    sets = claims.default_seed_sets(8)
    assert sets[:3] == [(13, 17, 27), (113, 117, 127), (43, 59, 223)]
    assert sets[3:5] == [(213, 217, 227), (313, 317, 327)]
    seeds = [s for triple in sets for s in triple]
    assert len(sets) == 8 and len(seeds) == len(set(seeds)) == 24
    assert claims.default_seed_sets(2) == [(13, 17, 27), (113, 117, 127)]
    assert claims.ensemble_name((13, 17, 27)) == claims.ensemble_name("13 17 27") == "seeds_13_17_27"
    assert claims.seed_count("seeds_13_17_27") == 3 and claims.seed_count("run_a") is None


def record(method, ensemble, members=3, **values):
    base = dict(dataset="digits", method=method, ensemble=ensemble, members=members)
    base.update(values)
    return base


def test_claim_pairs_by_seed_set_and_names_what_it_leaves_out():
    names = ["seeds_1_2_3", "seeds_4_5_6", "seeds_7_8_9", "seeds_10_11_12", "seeds_13_14_15"]
    sam = [2.0, 3.0, 4.0, 5.0, 6.0]
    de = [1.0, 1.0, 1.0, 1.0, 1.0]
    records = [record("sam", n, ood_ensemble_acc=a) for n, a in zip(names, sam)]
    records += [record("deep_ensemble", n, ood_ensemble_acc=a) for n, a in zip(names, de)]
    records[2]["members"] = 2                                   # seeds_7_8_9: a member missing for sam
    records[8]["ood_ensemble_acc"] = float("nan")               # seeds_10_11_12: deep_ensemble has no value
    records = [r for r in records if not (r["method"] == "deep_ensemble" and r["ensemble"] == "seeds_13_14_15")]
    claim = next(c for c in claims.paper_claims() if c.key == "sam_beats_de_ood")
    row = claims.evaluate_claim(claim, records, "digits", names + ["seeds_16_17_18"])
    # used: seeds_1_2_3 (2 - 1 = 1) and seeds_4_5_6 (3 - 1 = 2) only
    assert row["differences"] == [1.0, 2.0] and row["n"] == 2 and row["used"] == "seeds_1_2_3 seeds_4_5_6"
    half = 12.706205 * math.sqrt(0.5) / math.sqrt(2)  # t_{0.975,1} = 12.706205, sd = √0.5
    assert row["mean"] == pytest.approx(1.5) and row["ci_low"] == pytest.approx(1.5 - half, abs=1e-5)
    assert row["verdict"] == "inconclusive"
    left = row["left_out"]
    assert "seeds_7_8_9 (sam: 2 of 3 members measured)" in left
    assert "seeds_10_11_12 (deep_ensemble: no ood_ensemble_acc)" in left
    assert "seeds_13_14_15 (deep_ensemble: no results)" in left
    assert "seeds_16_17_18 (sam: no results; deep_ensemble: no results)" in left
    status = claims.seed_set_status(records, "digits", names, ["sam", "deep_ensemble"])
    assert status == ["seeds_7_8_9: sam: 2 of 3 members measured", "seeds_13_14_15: deep_ensemble: no results"]

    one = claims.evaluate_claim(claim, records, "digits", names[:1])
    assert one["n"] == 1 and "an interval needs two seed sets" in one["verdict"] and math.isnan(one["ci_low"])


def test_relative_flatness_and_gain():
    names = ["seeds_1", "seeds_2", "seeds_3"]
    records = [record("sam", n, members=1, sharpness=s, fisher=f, ood_ensemble_acc=80.0, ood_individual_acc=i)
               for n, s, f, i in zip(names, (1.0, 2.0, 4.0), (10.0, 10.0, 10.0), (78.0, 77.0, 76.0))]
    records += [record("sharpbalance", n, members=1, sharpness=s, fisher=f, ood_ensemble_acc=81.0,
                       ood_individual_acc=i)
                for n, s, f, i in zip(names, (1.05, 2.0, 3.8), (20.0, 20.0, 20.0), (78.0, 77.0, 76.0))]
    rows = {r["key"]: r for r in claims.evaluate(records, "digits", names, ["sam", "sharpbalance"])}
    assert set(rows) == {c.key for c in claims.paper_claims() if {c.method, c.baseline} <= {"sam", "sharpbalance"}}
    flat = rows["sharpbalance_as_flat_apgd"]
    assert flat["differences"] == pytest.approx([0.05, 0.0, -0.05])  # 1.05/1 - 1, 2/2 - 1, 3.8/4 - 1
    half = T_975[2] * 0.05 / math.sqrt(3)  # sd 0.05: the interval is ±0.1242, past the +10 % margin
    assert flat["ci_high"] == pytest.approx(half, abs=1e-6) and flat["verdict"] == "inconclusive"
    assert rows["sharpbalance_as_flat_fisher"]["differences"] == pytest.approx([1.0, 1.0, 1.0])
    assert rows["sharpbalance_as_flat_fisher"]["verdict"] == "contradicted"  # twice as sharp, every time
    gain = rows["sharpbalance_larger_gain_ood"]
    assert gain["differences"] == pytest.approx([1.0, 1.0, 1.0]) and gain["verdict"] == "holds"


def write_result_files(folder, ood_acc, sharpness, fisher, members=3):
    """Measurement JSON files in the measure scripts' format (only the keys the report reads)."""
    os.makedirs(folder)
    split = lambda acc: {"ensemble_accuracy": acc, "average_individual_accuracy": acc - 0.02,  # noqa: E731
                         "individual_accuracy": [acc - 0.02] * members, "ensemble_loss": 0.3,
                         "average_individual_loss": 0.4, "ensemble_ece": 0.02, "average_individual_ece": 0.03}
    files = {"predict": {"test": split(0.98), "corruptions": {"ood": split(ood_acc)}},
             "disagreement": {"test": {"mean_disagreement": 0.02}, "corruptions": {"ood": {"mean_disagreement": 0.2}}},
             "variance_mse_c": {"variance_unbias": 30.0},
             "APGD_worst": {"mean_sharpness": {"l2_0.5": sharpness}},
             "fisher": {"mean_fisher": fisher}}
    for name, payload in files.items():
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(dict(meta={}, **payload), f)


def run_report(argv):
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("report_claims", os.path.join(root, "scripts", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report.main(argv)


def test_report_claims_files(tmp_path, capsys):
    results = tmp_path / "results"
    methods = ("deep_ensemble", "sam", "sharpbalance", "sharpbalance_sharpest")
    sets = ["13 17 27", "113 117 127", "43 59 223"]
    for k, seeds in enumerate(sets):
        for m, method in enumerate(methods):
            folder = results / "digits" / method / claims.ensemble_name(seeds)
            if method == "sharpbalance_sharpest" and k == 2:
                continue  # this seed set failed for one method
            write_result_files(str(folder), 0.70 + 0.01 * m + 0.002 * k, 1.0 + 0.1 * k, 10.0 - m,
                               members=2 if (method == "sam" and k == 1) else 3)
    out = tmp_path / "report"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"epochs": 2, "machine": "test"}))
    assert run_report(["--results", str(results), "--out", str(out), "--methods", *methods, "--seed_sets",
                       ";".join(sets), "--claims", "--error_bars", "ci95", "--settings", str(settings)]) == 0
    with open(out / "claims.csv", newline="") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(claims.paper_claims())
    sam_vs_de = rows["sam_beats_de_ood"]  # seeds 113... left out (sam has 2 of 3 members): n = 2
    assert int(sam_vs_de["n"]) == 2 and "seeds_113_117_127 (sam: 2 of 3 members measured)" in sam_vs_de["left_out"]
    assert float(sam_vs_de["mean"]) == pytest.approx(1.0)  # 0.01 apart, in %
    assert sam_vs_de["verdict"] == "holds"  # constant difference: a zero-width interval above 0
    sharpest = rows["sharpbalance_sharpest_beats_sam_ood"]
    assert int(sharpest["n"]) == 1 and "seeds_43_59_223 (sharpbalance_sharpest: no results)" in sharpest["left_out"]
    assert sharpest["verdict"].startswith("no interval")
    text = (out / "claims.md").read_text()
    assert "Settings: epochs = 2, machine = test" in text and "| Claim |" in text
    assert "seeds_43_59_223: sharpbalance_sharpest: no results" in text  # the incomplete seed sets, named
    payload = json.loads((out / "claims.json").read_text())
    assert payload["meta"]["seed_sets"] == ["seeds_13_17_27", "seeds_113_117_127", "seeds_43_59_223"]
    assert payload["claims"][0]["differences"] and "NaN" not in (out / "claims.json").read_text()
    table = list(csv.DictReader(open(out / "figure7_table.csv", newline="")))
    assert {r["members"] for r in table} >= {"3"}
    ci = next(r for r in table if r["method"] == "deep_ensemble" and r["split"] == "OOD")
    assert float(ci["ensemble_acc_ci95"]) == pytest.approx(T_975[2] * float(ci["ensemble_acc_std"]) / math.sqrt(3),
                                                           rel=1e-5)
    for name in ("figure7.png", "sharpness_diversity.png"):
        assert (out / name).stat().st_size > 10_000

    # one seed set: the claims are written without intervals, and a line says why
    assert run_report(["--results", str(results), "--out", str(tmp_path / "one"), "--methods", *methods,
                       "--seed_sets", sets[0], "--claims"]) == 0
    assert "a confidence interval needs at least two seed sets" in capsys.readouterr().err
