"""The reproduction scripts end to end: scripts/demo.sh (fast settings), scripts/figure7.sh on fabricated CIFAR-10 / CIFAR-10-C, including the report, its files and a
rerun that skips everything.
"""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures import make_cifar, make_cifar_c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("scripts/demo.sh", "scripts/figure7.sh", "scripts/claims.sh", "scripts/train/_common.sh",
           "scripts/train/_train.sh", "scripts/train/deep_ensemble.sh", "scripts/train/sam.sh",
           "scripts/train/sharpbalance.sh", "scripts/train/sharpbalance_sharpest.sh",
           "scripts/measure/_measure.sh", "scripts/measure/measure_diversity.sh",
           "scripts/measure/measure_diversity_variance.sh", "scripts/measure/measure_sharpness.sh")
REPORT_FILES = ("figure7_table.csv", "figure7_table.md", "diversity_table.csv", "ensembles.csv", "figure7.png",
                "sharpness_diversity.png", "missing.txt")


def run_script(script, env_extra, timeout=240, returncode=0):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update(env_extra)
    env.pop("OMP_NUM_THREADS", None)  # the scripts choose threads per job themselves
    result = subprocess.run(["bash", os.path.join(ROOT, script)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == returncode, (result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout + result.stderr


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_report(report, methods=("deep_ensemble", "sam", "sharpbalance"), n_ensembles=1):
    for name in REPORT_FILES:
        assert os.path.isfile(os.path.join(report, name)), name
    rows = read_csv(os.path.join(report, "figure7_table.csv"))
    assert [(r["split"], r["method"]) for r in rows] == [(s, m) for s in ("ID", "OOD") for m in methods]
    for r in rows:
        assert int(r["n_ensembles"]) == n_ensembles
        for key in ("ensemble_acc_mean", "individual_acc_mean", "ensemble_gain_mean"):
            assert math.isfinite(float(r[key])) and 0 <= float(r["ensemble_acc_mean"]) <= 100, (key, r)
        if n_ensembles > 1:
            assert math.isfinite(float(r["ensemble_acc_std"])) and math.isfinite(float(r["individual_acc_std"]))
    for r in read_csv(os.path.join(report, "diversity_table.csv")):
        for key in ("sharpness_mean", "ood_variance_mean", "id_disagreement_mean", "ood_disagreement_mean"):
            assert math.isfinite(float(r[key])), (key, r)
    markdown = open(os.path.join(report, "figure7_table.md")).read()
    assert "| Ensemble acc. |" in markdown and "nan" not in markdown.lower()
    assert ("| Paper |" in markdown) == any(r["paper_ensemble_acc"] for r in rows)
    assert open(os.path.join(report, "missing.txt")).read() == ""
    import matplotlib.image
    for name in ("figure7.png", "sharpness_diversity.png"):
        image = matplotlib.image.imread(os.path.join(report, name))
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        assert np.isfinite(image).all() and image[..., :3].std() > 0.05  # something is drawn
    return rows


def test_scripts_parse_and_are_executable():
    for script in SCRIPTS:
        path = os.path.join(ROOT, script)
        assert subprocess.run(["bash", "-n", path]).returncode == 0, script
        with open(path) as f:
            assert f.readline().strip() == "#!/usr/bin/env bash", script
        if not os.path.basename(script).startswith("_common"):
            assert os.access(path, os.X_OK), script


def test_demo_fast_variant(tmp_path):
    """scripts/demo.sh with tiny settings (every measurement, the report), limited to Deep Ensemble and
    DE + SAM to keep the test short: each step is a process that spends seconds importing torch; the
    SharpBalance steps of the same figure7.sh run in test_figure7_toy_cifar10, and scripts/claims.sh
    runs end to end in tests/test_claims.py."""
    out = str(tmp_path / "demo")
    few = "--corruptions gaussian_noise,contrast"  # 2 of the 15 digits-C corruptions, to keep the test short
    methods = ("deep_ensemble", "sam")
    env = dict(OUT=out, EPOCHS="1", WIDTH="4", BATCH_SIZE="128", JOBS="2", DIVERSITY_EXTRA=few, VARIANCE_EXTRA=few,
               SHARPNESS_EXTRA="--batch-num 2 --n_iters 5 --norm l2", METHODS=" ".join(methods))
    log = run_script("scripts/demo.sh", dict(env, SHARPNESS_MODES="APGD_worst,fisher"))
    assert "demo finished" in log and os.path.join(out, "report", "figure7.png") in log
    report = os.path.join(out, "report")
    rows = check_report(report, methods)
    assert {r["test_set"] for r in rows} == {"digits", "digits-C"}
    assert len(read_csv(os.path.join(report, "ensembles.csv"))) == 2


def test_train_scripts_command_lines(tmp_path):
    """Each method script's main.py command (PYTHON=echo prints it instead of training): the fourth
    method is SharpBalance with the paper's --select sharpest, everything else as released."""
    expected = {"deep_ensemble": "--sam False", "sam": "--sam True --rho 0.2",
                "sharpbalance": "--sam True --rho 0.2 --flat_ratio 0.5 --initial_epochs 4",
                "sharpbalance_sharpest": "--sam True --rho 0.2 --flat_ratio 0.5 --initial_epochs 4 --select sharpest"}
    for method, flags in expected.items():
        log = run_script(f"scripts/train/{method}.sh", dict(PYTHON="echo", DATASET="digits", EPOCHS="8",
                                                            SAVE_PATH=str(tmp_path / method)))
        command = next(line for line in log.splitlines() if line.startswith(os.path.join(ROOT, "main.py")))
        assert f" {flags} --seed 13 17 27 " in command and "--epochs 8 " in command, command
        assert ("--select" in command) == (method == "sharpbalance_sharpest")


def test_measure_scripts_let_the_script_decide_what_is_finished(tmp_path):
    """The measure step passes --skip_finished (the script compares its arguments and input files with
    the result's key); FORCE=1 measures again."""
    run = tmp_path / "run"
    run.mkdir()
    for force, expected in (("0", True), ("1", False)):
        log = run_script("scripts/measure/measure_sharpness.sh", dict(PYTHON="echo", RUN=str(run), FORCE=force))
        command = next(line for line in log.splitlines() if line.startswith(os.path.join(ROOT, "measure_sharpness.py")))
        assert ("--skip_finished" in command) == expected, command


def test_figure7_toy_cifar10(tmp_path):
    """figure7.sh on fabricated CIFAR-10/-C (one ensemble of two members, 2 epochs); then a rerun skips
    everything, and the report lists a deleted measurement instead of failing."""
    data = str(tmp_path / "data")
    _, _, test_images, test_labels = make_cifar(data, "cifar10", n_train=100, n_test=20)
    make_cifar_c(data, test_images, test_labels, "cifar10")
    out = str(tmp_path / "fig7")
    env = dict(OUT=out, DATASETS="cifar10", DATA_PATH=data, SEED_SETS="13 17", EPOCHS="2", WIDTH="2",
               BATCH_SIZE="32", DEVICE="cpu", JOBS="2", SHARPNESS_EXTRA="--batch-num 2 --n_iters 5")
    log = run_script("scripts/figure7.sh", env)
    assert "step 3/3: report" in log
    rows = check_report(os.path.join(out, "report"))
    cifar = {(r["split"], r["method"]): r for r in rows}
    assert float(cifar[("ID", "sharpbalance")]["paper_ensemble_acc"]) == 96.18
    assert float(cifar[("OOD", "deep_ensemble")]["paper_individual_acc"]) == 74.19
    diff = float(cifar[("ID", "sam")]["ensemble_acc_diff"])
    assert diff == pytest.approx(float(cifar[("ID", "sam")]["ensemble_acc_mean"]) - 96.06)
    assert os.path.isfile(os.path.join(out, "runs", "cifar10", "sharpbalance", "seeds_13_17", "sharpbalance_split.pt"))
    sharpness = read_csv(os.path.join(out, "report", "ensembles.csv"))[0]["sharpness_setting"]
    assert sharpness == "l2_0.5"  # the released setting: l2 and linf at rho 0.5; the report shows l2

    rerun = run_script("scripts/figure7.sh", dict(env, JOBS="1"))
    # Every step ran its script, which found its work done: no epoch trained, no file measured.
    assert rerun.count("nothing to train") == 3 and rerun.count("skip measuring") == 12, rerun[-3000:]
    assert " epoch   1/2 " not in rerun and "wrote " not in rerun

    # Other settings in the same OUT: the run is refused with one line naming the setting, its old
    # measurements are not reported under the new settings, and the status says so.
    report_time = os.stat(os.path.join(out, "report", "figure7_table.csv")).st_mtime_ns
    changed = run_script("scripts/figure7.sh", dict(env, JOBS="1", WIDTH="4", METHODS="sam"), returncode=1)
    assert "holds a run with other arguments (width: 2 -> 4" in changed, changed[-3000:]
    assert "skip measuring cifar10 sam seeds_13_17: its training failed" in changed and "!!! no report" in changed
    assert os.stat(os.path.join(out, "report", "figure7_table.csv")).st_mtime_ns == report_time
    # Other sharpness settings: that measurement is made again, the others are skipped.
    sharper = run_script("scripts/figure7.sh", dict(env, JOBS="1", METHODS="sam",
                                                       SHARPNESS_EXTRA="--batch-num 3 --n_iters 5"))
    assert sharper.count("skip measuring") == 3 and sharper.count("wrote ") == 1, sharper[-3000:]
    apgd = os.path.join(out, "results", "cifar10", "sam", "seeds_13_17", "APGD_worst.json")
    with open(apgd) as f:
        assert json.load(f)["meta"]["batch_num"] == 3

    os.remove(os.path.join(out, "results", "cifar10", "sam", "seeds_13_17", "APGD_worst.json"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report.py"), "--results",
                             os.path.join(out, "results"), "--out", str(tmp_path / "partial")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    missing = open(tmp_path / "partial" / "missing.txt").read()
    assert "sam/seeds_13_17/APGD_worst.json (file missing)" in missing
    assert "missing input" in result.stdout
    assert os.path.isfile(tmp_path / "partial" / "sharpness_diversity.png")


def fake_results(root, datasets, methods, ensembles, rng):
    """Measurement JSON files in the measure scripts' format, with random plausible numbers."""
    import json
    for dataset in datasets:
        for method in methods:
            for ensemble in ensembles:
                folder = os.path.join(root, dataset, method, ensemble)
                os.makedirs(folder)
                acc = lambda low: float(rng.uniform(low, low + 0.05))  # noqa: E731
                calibration = {"ensemble_loss": 0.3, "average_individual_loss": 0.4, "ensemble_ece": 0.02,
                               "average_individual_ece": 0.03}
                predict = {"test": {"ensemble_accuracy": acc(0.9), "average_individual_accuracy": acc(0.85),
                                    "individual_accuracy": [0.8, 0.8, 0.8], **calibration},
                           "corruptions": {"ood": {"ensemble_accuracy": acc(0.7),
                                                   "average_individual_accuracy": acc(0.65), **calibration}}}
                files = {"predict": predict,
                         "disagreement": {"test": {"mean_disagreement": acc(0.05)},
                                          "corruptions": {"ood": {"mean_disagreement": acc(0.2)}}},
                         "variance_mse_c": {"variance_unbias": float(rng.uniform(1, 3))},
                         "APGD_worst": {"mean_sharpness": {"linf_0.5": 1e12, "l2_0.5": float(rng.uniform(0.5, 2))}}}
                for name, payload in files.items():
                    with open(os.path.join(folder, f"{name}.json"), "w") as f:
                        json.dump(dict(meta={}, **payload), f)


def test_report_three_datasets_mean_std_and_missing(tmp_path):
    """The report on fabricated measurements of the full Figure 7 grid (3 datasets × 3 methods × 3
    ensembles): means and sample stds over ensembles, the paper's columns, the 2×3 figure, missing inputs."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("figure7_report", os.path.join(ROOT, "scripts", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    from reporting import results as rp
    results = str(tmp_path / "results")
    datasets = ("cifar10", "cifar100", "tiny_imgnet")
    ensembles = ("seeds_13_17_27", "seeds_113_117_127", "seeds_43_59_223")
    fake_results(results, datasets, rp.METHODS, ensembles, np.random.RandomState(0))
    os.remove(os.path.join(results, "cifar100", "sam", "seeds_43_59_223", "predict.json"))
    out = str(tmp_path / "report")
    assert report.main(["--results", results, "--out", out, "--seed_sets", "13 17 27;113 117 127;43 59 223;1 2 3"]) == 0
    table = read_csv(os.path.join(out, "figure7_table.csv"))
    assert len(table) == 18
    records = read_csv(os.path.join(out, "ensembles.csv"))
    values = [float(r["ood_ensemble_acc"]) for r in records if r["dataset"] == "tiny_imgnet" and r["method"] == "sam"]
    row = next(r for r in table if r["dataset"] == "tiny_imgnet" and r["split"] == "OOD" and r["method"] == "sam")
    assert float(row["ensemble_acc_mean"]) == pytest.approx(np.mean(values))
    assert float(row["ensemble_acc_std"]) == pytest.approx(np.std(values, ddof=1))
    assert float(row["paper_ensemble_acc"]) == 30.82
    assert float(row["ensemble_acc_diff"]) == pytest.approx(np.mean(values) - 30.82)
    short = next(r for r in table if r["dataset"] == "cifar100" and r["split"] == "ID" and r["method"] == "sam")
    assert int(short["n_ensembles"]) == 2  # the ensemble without predict.json is left out, not a crash
    missing = open(os.path.join(out, "missing.txt")).read()
    assert "cifar100/sam/seeds_43_59_223/predict.json (file missing)" in missing
    assert "seeds_1_2_3 (folder missing)" in missing
    assert {r["sharpness_setting"] for r in records} == {"l2_0.5"}
    import matplotlib.image
    height, width = matplotlib.image.imread(os.path.join(out, "figure7.png")).shape[:2]
    assert width > 1.3 * height  # 2 rows × 3 dataset columns

    empty = str(tmp_path / "empty")
    assert report.main(["--results", str(tmp_path / "nothing"), "--out", empty]) == 0
    assert "results folder missing" in open(os.path.join(empty, "missing.txt")).read()
    assert os.path.isfile(os.path.join(empty, "figure7.png"))
