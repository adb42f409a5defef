"""measure_diversity.py, measure_diversity_variance.py and measure_sharpness.py end to end.

One file for the three scripts: most tests run two or three of them on the same fabricated data (a
module fixture), and the scripts are thin entries over the measure/ package, whose checks they share
(measure/cli.py, inputs.py, loading.py, result_files.py have no test file of their own: they are
tested here, through the scripts, as a user meets them).

Fabricated CIFAR-10 + CIFAR-10-C and Tiny-ImageNet(-C) files (tests/fixtures.py) with checkpoints
written in main.py's format, and digits/digits-C with checkpoints trained by main.py itself.
"""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import main as main_script
import measure_diversity
import measure_diversity_variance
import measure_sharpness
from data import build_datasets
from measure import cli, forward, inputs, loading, metrics, result_files
from models import create_model
from tests.fixtures import make_cifar, make_cifar_c, make_run, make_tiny_imagenet, run_python, save_member
from tests.references import logit_variance, loop_squared_grad_norms
from utils.checkpoint import save_checkpoint
from utils.errors import run_main


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _, _, test_images, test_labels = make_cifar(str(root), "cifar10", n_train=40, n_test=24)
    make_cifar_c(str(root), test_images, test_labels, "cifar10")
    run = make_run(root / "run")
    return str(root), run


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_readme_commands_run_verbatim(cifar, tmp_path):
    data, run = cifar
    save = str(tmp_path / "out")
    commands = [("measure_diversity.py", "disagreement"), ("measure_diversity_variance.py", "variance_mse_c"),
                ("measure_sharpness.py", "APGD_worst")]
    for script, mode in commands:
        result = run_python([script, "--dataset", "cifar10", "--data_path", data, "--model", "resnet18",
                                      "--resume", run, "--mode", mode, "--save", save])
        assert result.returncode == 0, result.stderr[-2000:]
    dis = _load(os.path.join(save, "disagreement.json"))
    matrix = np.array(dis["test"]["disagreement"])
    assert matrix.shape == (2, 2) and np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    assert set(dis["corruptions"]["per_corruption"]) == set(dis["meta"]["corruptions"]) and len(dis["meta"]["corruptions"]) == 15
    assert dis["meta"]["checkpoints"][0].endswith(os.path.join("seed_13", "model_best.pth.tar"))
    assert {"torch", "numpy", "python"} <= set(dis["meta"]["versions"])
    var = _load(os.path.join(save, "variance_mse_c.json"))
    assert var["n"] == 15 * 5 * 24  # every cell of CIFAR-10-C (its values: test_variance_streams_to_the_direct_value)
    sharp = _load(os.path.join(save, "APGD_worst.json"))
    assert sharp["meta"]["rho"] == [0.5] and sharp["meta"]["batch_size"] == 5
    assert sharp["meta"]["apgd_checkpoints"] == [5, 9, 12, 15, 16, 18, 19]
    for member in sharp["individual_sharpness"]:
        assert set(member) == {"l2_0.5", "linf_0.5"}
    assert not [f for f in os.listdir(save) if f.endswith((".pkl", ".pickle"))]


def test_predict_agrees_with_a_direct_computation(cifar, tmp_path, monkeypatch):
    data, run = cifar
    calls = []
    original = forward.member_forward

    def counting(models, dataset, *a, **k):
        calls.append(len(models))
        return original(models, dataset, *a, **k)
    monkeypatch.setattr(forward, "member_forward", counting)
    save = str(tmp_path / "out")
    measure_diversity.main(["--dataset", "cifar10", "--data_path", data, "--resume", run, "--mode",
                            "predict,disagreement,KL", "--save", save, "--eval-batch-size", "7", "--device", "cpu"])
    assert calls == [2] * (2 + 75)  # one pass per split for all three modes and both members

    predict = _load(os.path.join(save, "predict.json"))
    test = build_datasets("cifar10", data).test
    logits = []
    for path in predict["meta"]["checkpoints"]:
        state = torch.load(path, weights_only=True)
        net = create_model("resnet18", 10, width=2).eval()
        net.load_state_dict(state["state_dict"])
        with torch.no_grad():
            logits.append(torch.cat([net(test[i][0][None]) for i in range(len(test))]).double().numpy())
    logits = np.stack(logits)
    expected = metrics.ensemble_report(logits, test.labels)
    for key in ("ensemble_accuracy", "ensemble_loss", "ensemble_ece", "ensemble_brier", "individual_loss"):
        assert predict["test"][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
    cells = predict["corruptions"]["cells"]
    assert len(cells) == 75
    assert predict["corruptions"]["ood"]["ensemble_accuracy"] == pytest.approx(
        np.mean([c["ensemble_accuracy"] for c in cells.values()]))
    assert predict["corruptions"]["per_corruption"]["fog"]["ensemble_loss"] == pytest.approx(
        np.mean([cells[f"fog_{s}"]["ensemble_loss"] for s in range(1, 6)]))
    assert predict["corruptions"]["per_severity"]["3"]["individual_accuracy"][1] == pytest.approx(
        np.mean([c["individual_accuracy"][1] for k, c in cells.items() if k.endswith("_3")]))

    dis = _load(os.path.join(save, "disagreement.json"))
    assert dis["test"]["mean_disagreement"] == pytest.approx(np.mean(logits[0].argmax(1) != logits[1].argmax(1)))
    kl = _load(os.path.join(save, "KL.json"))
    assert np.allclose(kl["test"]["kl"], metrics.kl_matrix(logits), rtol=1e-4, atol=1e-7)
    with open(os.path.join(save, "predict.csv")) as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(result_files.CSV_FIELDS)
    ood = [r for r in rows if r["split"] == "ood" and r["member"] == "ensemble" and r["metric"] == "accuracy"]
    assert float(ood[0]["value"]) == pytest.approx(predict["corruptions"]["ood"]["ensemble_accuracy"])


def test_saved_logits_are_reused(cifar, tmp_path, monkeypatch):
    data, run = cifar
    calls = []
    original = forward.member_forward
    monkeypatch.setattr(forward, "member_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    argv = ["--dataset", "cifar10", "--data_path", data, "--resume", run, "--mode", "predict", "--device", "cpu",
            "--corruptions", "none", "--logits_dir", str(tmp_path / "logits")]
    measure_diversity.main(argv + ["--save", str(tmp_path / "a")])
    assert len(calls) == 2 and len(os.listdir(tmp_path / "logits")) == 4
    measure_diversity.main(argv + ["--save", str(tmp_path / "b")])
    assert len(calls) == 2
    first, second = _load(str(tmp_path / "a" / "predict.json")), _load(str(tmp_path / "b" / "predict.json"))
    assert first["test"] == second["test"] and first["corruptions"] is None


def test_variance_streams_to_the_direct_value(cifar, tmp_path):
    data, run = cifar
    save = str(tmp_path / "out")
    argv = ["--dataset", "cifar10", "--data_path", data, "--resume", run, "--save", save, "--device", "cpu",
            "--eval-batch-size", "5"]
    measure_diversity_variance.main(argv + ["--mode", "variance_mse_c,variance_mse", "--corruptions", "fog,snow"])
    var_c = _load(os.path.join(save, "variance_mse_c.json"))
    var = _load(os.path.join(save, "variance_mse.json"))
    args = measure_diversity.get_parser().parse_args(argv + ["--corruptions", "fog,snow"])
    members, _ = loading.load_members(args, torch.device("cpu"), 2)
    cache = forward.LogitCache(members, torch.device("cpu"), 11)
    cell_logits = {s.key: cache.get(s)[0] for s in inputs.corrupted_splits(args, ["fog", "snow"])}
    every = np.concatenate(list(cell_logits.values()), axis=1)
    snow = np.concatenate([cell_logits[f"snow_{s}"] for s in range(1, 6)], axis=1)
    assert var_c["variance_unbias"] == pytest.approx(logit_variance(every), rel=1e-5)
    assert var_c["per_corruption"]["snow"] == pytest.approx(logit_variance(snow), rel=1e-5)
    assert var_c["n"] == 10 * 24 and set(var_c["cells"]) == {f"{c}_{s}" for c in ("fog", "snow") for s in range(1, 6)}
    test_logits = cache.get(next(inputs.clean_splits(args, which=("test",))))[0]
    assert var["variance_unbias"] == pytest.approx(logit_variance(test_logits), rel=1e-5)


def test_the_scripts_measure_digits_members_trained_by_main(tmp_path, capsys):
    data, run, save = str(tmp_path / "data"), str(tmp_path / "run"), str(tmp_path / "out")
    main_script.main(["--data", "digits", "--data_path", data, "--model", "resnet18", "--width", "4", "--epochs", "1",
                     "--seed", "13", "17", "--save_path", run, "--device", "cpu", "--no_progress"])
    main_script.main(["--data", "digits", "--data_path", data, "--seed", "13", "17", "--save_path", run,
                     "--device", "cpu", "--evaluate"])  # main.py --evaluate goes through ensemble_summary
    printed = capsys.readouterr().out
    assert "test: ensemble acc" in printed and "val : ensemble acc" in printed
    common = ["--dataset", "digits", "--data_path", data, "--model", "resnet18", "--resume", run, "--save", save,
              "--device", "cpu"]
    measure_diversity.main(common + ["--mode", "predict", "--checkpoint", "last"])
    measure_diversity_variance.main(common + ["--mode", "variance_mse_c"])
    measure_sharpness.main(common + ["--mode", "APGD_worst,APGD_average,fisher", "--batch-num", "2",
                                     "--avg_draws", "3", "--n_iters", "5", "--norm", "l2", "--rho", "0.1,0.5"])
    predict = _load(os.path.join(save, "predict.json"))
    summary_test = [line for line in printed.splitlines() if line.startswith("test:")][0]
    # after one epoch best and last hold the same weights, so both paths must agree
    assert f"members {predict['test']['individual_accuracy'][0]:.4f}" in summary_test
    assert predict["meta"]["checkpoints"][1].endswith(os.path.join("seed_17", "checkpoint.pth.tar"))
    assert predict["meta"]["member_seeds"] == [13, 17] and predict["meta"]["width"] == 4
    assert predict["test"]["n"] == 360 and len(predict["corruptions"]["cells"]) == 75
    assert _load(os.path.join(save, "variance_mse_c.json"))["n"] == 75 * 360  # 15 corruptions x 5 severities
    worst = _load(os.path.join(save, "APGD_worst.json"))
    average = _load(os.path.join(save, "APGD_average.json"))
    assert set(worst["mean_sharpness"]) == {"l2_0.1", "l2_0.5"}
    assert worst["meta"]["sample_indices"] == average["meta"]["sample_indices"]
    assert len(worst["meta"]["sample_indices"]) == 10
    # fisher: each member's mean squared gradient norm over the measured training samples, one plain
    # backward pass per sample on images standardised here (tests/references.py)
    fisher = _load(os.path.join(save, "fisher.json"))
    train = build_datasets("digits", data).train_eval
    chosen = fisher["meta"]["sample_indices"]
    assert chosen == worst["meta"]["sample_indices"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (train.mean, train.std))
    images = (torch.from_numpy(train.images[chosen]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    samples = [(images, torch.from_numpy(train.labels[chosen]), torch.arange(len(chosen)))]
    assert len(fisher["individual_fisher"]) == 2
    for path, value in zip(fisher["meta"]["checkpoints"], fisher["individual_fisher"]):
        net = create_model("resnet18", 10, width=4, dataset="digits")
        net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        expected = loop_squared_grad_norms(net, samples, num_samples=len(chosen)).double().mean().item()
        assert value == pytest.approx(expected, rel=1e-4)


def test_the_scripts_measure_tiny_imagenet_and_its_corruptions(tmp_path):
    root = str(tmp_path)
    make_tiny_imagenet(root, num_classes=3, train_per_class=4, val_per_class=2, with_c=True)
    run = make_run(tmp_path / "run", dataset="tiny_imgnet", num_classes=200)
    common = ["--dataset", "tiny_imgnet", "--data_path", root, "--resume", run, "--save", root + "/out",
              "--device", "cpu"]
    measure_diversity_variance.main(common + ["--mode", "variance_mse_c"])
    measure_diversity.main(common + ["--mode", "predict", "--corruptions", "fog"])
    measure_sharpness.main(common + ["--mode", "fisher", "--batch-num", "2", "--eval-batch-size", "2"])
    var = _load(os.path.join(root, "out", "variance_mse_c.json"))
    assert var["n"] == 75 * 3  # 15 corruptions x 5 severities x one image of each of the 3 classes
    predict = _load(os.path.join(root, "out", "predict.json"))
    assert predict["test"]["n"] == 6 and len(predict["corruptions"]["cells"]) == 5


# ---------------------------------------------------------------------------------- bad input
def _error_line(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_give_one_clear_line(cifar, tmp_path, capsys):
    data, run = cifar
    base = ["--dataset", "cifar10", "--data_path", data, "--save", str(tmp_path / "o"), "--device", "cpu"]
    a = save_member(str(tmp_path / "a.pth.tar"), 1, width=2)
    wide = save_member(str(tmp_path / "b.pth.tar"), 2, width=4)
    hundred = save_member(str(tmp_path / "c.pth.tar"), 3, num_classes=100, dataset="cifar10")
    foreign = save_member(str(tmp_path / "d.pth.tar"), 4, width=4, with_meta=False)
    garbage = tmp_path / "e.pth.tar"
    garbage.write_bytes(b"not a checkpoint at all")

    line = _error_line(capsys, measure_diversity.main, base + ["--resume", a, wide, "--mode", "predict"])
    assert "checkpoints differ" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--resume", a, hundred, "--mode", "predict"])
    assert "100 classes" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--resume", a, foreign, "--mode", "predict", "--width", "2"])
    assert "does not fit" in line and "d.pth.tar" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--resume", a, str(garbage), "--mode", "predict"])
    assert "e.pth.tar" in line and "checkpoint" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--resume", a, "--mode", "disagreement"])
    assert "at least 2" in line
    line = _error_line(capsys, measure_diversity_variance.main, base + ["--resume", a, "--mode", "variance_mse_c"])
    assert "at least 2" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--resume", run, "--mode", "predict,disagrement"])
    assert "disagrement" in line and "predict, disagreement, KL" in line
    line = _error_line(capsys, measure_sharpness.main, base + ["--resume", run, "--mode", "APGD"])
    assert "APGD_worst, APGD_average, fisher" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--resume", str(tmp_path / "nothing"), "--mode", "predict"])
    assert "nothing" in line

    partial = tmp_path / "partial"
    _, _, images, labels = make_cifar(str(partial), "cifar10", n_train=20, n_test=10)
    make_cifar_c(str(partial), images, labels, "cifar10", corruptions=["gaussian_noise"])
    argv = ["--dataset", "cifar10", "--data_path", str(partial), "--resume", run, "--save", str(tmp_path / "o"),
            "--device", "cpu"]
    for main, mode in ((measure_diversity.main, "predict"), (measure_diversity_variance.main, "variance_mse_c")):
        line = _error_line(capsys, main, argv + ["--mode", mode])
        assert os.path.join("CIFAR-10-C", "shot_noise.npy") in line


def test_bad_input_exits_with_status_2_from_the_command_line(cifar, tmp_path):
    data, run = cifar
    result = run_python(["measure_diversity.py", "--dataset", "cifar10", "--data_path", data, "--resume", run,
                                                  "--mode", "predcit", "--save", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown mode 'predcit'; valid modes: predict, disagreement, KL"]


# ----------------------------------------------------- checked before the long passes
def _count_passes(monkeypatch):
    calls = []
    original = forward.member_forward
    monkeypatch.setattr(forward, "member_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("damage, expected", [
    # 5n-5 rows: a file that ends one image short per severity (the 49,995-row jpeg_compression.npy)
    (lambda d: np.save(os.path.join(d, "jpeg_compression.npy"), np.load(os.path.join(d, "fog.npy"))[:-5]),
     r"jpeg_compression\.npy' has shape \(95, 32, 32, 3\) \(19 images per severity\), but .*labels\.npy' has 100"),
    (lambda d: np.save(os.path.join(d, "jpeg_compression.npy"), np.load(os.path.join(d, "fog.npy")) / 255.0),
     r"jpeg_compression\.npy' has dtype float64 and shape \(100, 32, 32, 3\); expected uint8"),
    (lambda d: np.save(os.path.join(d, "labels.npy"), np.full(100, 10)),
     r"labels\.npy' holds labels from 10 to 10; expected classes 0\.\.9"),
])
def test_damaged_corruption_file_stops_before_the_first_pass(tmp_path, capsys, monkeypatch, damage, expected):
    _, _, images, labels = make_cifar(str(tmp_path), "cifar10", n_train=20, n_test=20)
    damage(make_cifar_c(str(tmp_path), images, labels, "cifar10", corruptions=["fog", "jpeg_compression"]))
    run = make_run(tmp_path / "run")
    calls = _count_passes(monkeypatch)
    argv = ["--dataset", "cifar10", "--data_path", str(tmp_path), "--resume", run, "--device", "cpu",
            "--corruptions", "fog,jpeg_compression", "--save", str(tmp_path / "out")]
    for main, mode in ((measure_diversity.main, "predict"), (measure_diversity_variance.main, "variance_mse_c")):
        line = _error_line(capsys, main, argv + ["--mode", mode])
        assert __import__("re").search(expected, line), line
    assert calls == [] and not os.path.exists(tmp_path / "out")


def test_tiny_imagenet_c_empty_class_folder_stops_before_the_first_pass(tmp_path, capsys, monkeypatch):
    root = str(tmp_path)
    _, wnids = make_tiny_imagenet(root, num_classes=2, train_per_class=2, val_per_class=1, with_c=True)
    empty = os.path.join(root, "Tiny-ImageNet-C", "pixelate", "4", wnids[1])
    for name in os.listdir(empty):
        os.remove(os.path.join(empty, name))
    run = make_run(tmp_path / "run", dataset="tiny_imgnet", num_classes=200)
    calls = _count_passes(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        run_main(measure_diversity_variance.main, ["--dataset", "tiny_imgnet", "--data_path", root, "--resume", run,
                                                   "--device", "cpu", "--save", str(tmp_path / "out")])
    *warnings, line = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and all(w.startswith("warning: ") for w in warnings)  # 1 image per class
    assert line.startswith("error: ") and f"class folder '{empty}' holds no images" in line and calls == []


def test_unwritable_save_folder_stops_before_the_first_pass(cifar, tmp_path, capsys, monkeypatch):
    data, run = cifar
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    calls = _count_passes(monkeypatch)
    base = ["--dataset", "cifar10", "--data_path", data, "--resume", run, "--device", "cpu", "--corruptions", "none"]
    line = _error_line(capsys, measure_diversity.main, base + ["--save", str(blocker / "out")])
    assert f"--save '{blocker / 'out'}' cannot be created or written" in line
    line = _error_line(capsys, measure_diversity.main, base + ["--save", str(blocker)])
    assert "is a file" in line
    line = _error_line(capsys, measure_sharpness.main, base[:-2] + ["--mode", "fisher", "--save", str(blocker / "o")])
    assert "cannot be created or written" in line
    assert calls == []


# --------------------------------------------------- a late failure keeps the finished eval sets
def _interrupt_after(monkeypatch, passes):
    """Ctrl-C (KeyboardInterrupt) at the start of pass number ``passes`` + 1."""
    calls = []
    original = forward.member_forward

    def member_forward(*a, **k):
        calls.append(1)
        if len(calls) > passes:
            raise KeyboardInterrupt
        return original(*a, **k)
    monkeypatch.setattr(forward, "member_forward", member_forward)
    return calls


def _without_run_details(payload):
    meta = {k: v for k, v in payload["meta"].items() if k not in ("created", "command")}
    return dict(payload, meta=meta)


@pytest.mark.parametrize("script, modes", [(measure_diversity, "predict,disagreement"),
                                           (measure_diversity_variance, "variance_mse_c,variance_mse")])
def test_interrupted_measurement_keeps_and_resumes_finished_splits(cifar, tmp_path, capsys, monkeypatch, script,
                                                                    modes):
    data, run = cifar
    argv = ["--dataset", "cifar10", "--data_path", data, "--resume", run, "--device", "cpu", "--mode", modes,
            "--corruptions", "fog,snow"]
    script.main(argv + ["--save", str(tmp_path / "whole")])
    first = modes.split(",")[0]
    save = str(tmp_path / "parts")
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(SystemExit) as exit_info:
        run_main(script.main, argv + ["--save", save], interrupted=cli.EVAL_SETS_INTERRUPTED)
    assert exit_info.value.code == 130 and "partial.json" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(save, f"{first}.json"))  # <mode>.json always means complete
    partial = _load(os.path.join(save, f"{first}.partial.json"))
    # -C cells in CORRUPTIONS order: snow before fog
    # (variance_mse, the clean test set, is measured first: then 3 cells)
    done = ["val", "test", "snow_1", "snow_2"] if script is measure_diversity else [f"snow_{s}" for s in range(1, 4)]
    assert partial["complete"] is False and partial["finished_splits"] == done

    # Rerun: the finished splits are reused, only the rest is measured, and the numbers equal one run's.
    monkeypatch.undo()
    counted = _count_passes(monkeypatch)
    script.main(argv + ["--save", save])
    printed = capsys.readouterr().out
    assert f"continuing from {os.path.join(save, first + '.partial.json')}: {len(done)} split(s)" in printed
    remaining = 12 - 4 if script is measure_diversity else 10 - 3
    assert len(counted) == remaining
    for mode in modes.split(","):
        assert not os.path.exists(os.path.join(save, f"{mode}.partial.json"))
        whole, resumed = _load(str(tmp_path / "whole" / f"{mode}.json")), _load(os.path.join(save, f"{mode}.json"))
        assert _without_run_details(resumed) == _without_run_details(whole)  # bit-identical numbers


def test_changed_input_file_is_measured_again(cifar, tmp_path, monkeypatch):
    data, run = str(tmp_path / "data"), cifar[1]
    shutil.copytree(cifar[0], data)
    save = str(tmp_path / "out")
    argv = ["--dataset", "cifar10", "--data_path", data, "--resume", run, "--device", "cpu", "--mode", "predict",
            "--corruptions", "fog,snow", "--save", save]
    _interrupt_after(monkeypatch, 11)  # val, test, snow 1-5, fog 1-4 done
    with pytest.raises(KeyboardInterrupt):
        measure_diversity.main(argv)
    os.utime(os.path.join(data, "CIFAR-10-C", "snow.npy"), ns=(1, 1))  # replaced since: measure snow again
    monkeypatch.undo()
    calls = _count_passes(monkeypatch)
    measure_diversity.main(argv)
    assert len(calls) == 5 + 1  # snow 1-5 again, and fog 5


# ---------------------------------------------------------- incomplete ensembles
def _set_epoch(path, epoch):
    state = torch.load(path, weights_only=True)
    state["epoch"] = epoch
    save_checkpoint(state, path)


def _planned_run(directory, seeds, epochs, trained, best):
    """A run folder as main.py leaves it: args.json and, per seed, last and best checkpoints."""
    run = make_run(directory, seeds=seeds)
    with open(os.path.join(run, "args.json"), "w") as f:
        json.dump({"seeds": [13, 17, 27], "epochs": epochs, "data": "cifar10"}, f)
    for seed in seeds:
        _set_epoch(os.path.join(run, f"seed_{seed}", "checkpoint.pth.tar"), trained[seed])
        _set_epoch(os.path.join(run, f"seed_{seed}", "model_best.pth.tar"), best[seed])
    return run


def test_missing_member_folder_is_refused_unless_allowed(cifar, tmp_path, capsys):
    run = _planned_run(tmp_path / "run", (13, 17), 6, trained={13: 6, 17: 6}, best={13: 6, 17: 4})
    common = ["--dataset", "cifar10", "--data_path", cifar[0], "--resume", run, "--device", "cpu",
              "--save", str(tmp_path / "out")]
    argv = common + ["--corruptions", "none"]
    for main, flags in ((measure_diversity.main, argv + ["--mode", "predict"]),
                        (measure_diversity_variance.main, argv + ["--mode", "variance_mse"]),
                        (measure_sharpness.main, common + ["--mode", "fisher"])):
        line = _error_line(capsys, main, flags)
        assert f"incomplete ensemble: '{run}' has no seed_27/ (its args.json lists seeds 13 17 27)" in line
        assert "--allow_incomplete" in line
    measure_diversity.main(argv + ["--mode", "predict", "--allow_incomplete"])
    captured = capsys.readouterr()
    assert f"member seed 17: {run}/seed_17/model_best.pth.tar (weights of epoch 4, trained 6 of 6 epochs)" \
        in captured.out.splitlines()
    assert "warning: measuring an incomplete ensemble" in captured.err
    meta = _load(str(tmp_path / "out" / "predict.json"))["meta"]
    assert [(m["seed"], m["epoch"], m["trained_epochs"], m["planned_epochs"]) for m in meta["members"]] == \
        [(13, 6, 6, 6), (17, 4, 6, 6)]
    assert len(meta["incomplete_ensemble"]) == 1 and "seed_27/" in meta["incomplete_ensemble"][0]


def test_member_stopped_early_is_refused_unless_allowed(cifar, tmp_path, capsys):
    run = _planned_run(tmp_path / "run", (13, 17, 27), 6, trained={13: 6, 17: 2, 27: 6}, best={13: 5, 17: 2, 27: 6})
    argv = ["--dataset", "cifar10", "--data_path", cifar[0], "--resume", run, "--device", "cpu", "--corruptions",
            "none", "--mode", "predict", "--save", str(tmp_path / "out")]
    line = _error_line(capsys, measure_diversity.main, argv)
    assert f"incomplete ensemble: seed 17 stopped after epoch 2 of 6 ({run}/seed_17)" in line
    measure_diversity.main(argv + ["--allow_incomplete", "--checkpoint", "last"])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("member ")] == [
        f"member seed {s}: {run}/seed_{s}/checkpoint.pth.tar (weights of epoch {e}, trained {e} of 6 epochs)"
        for s, e in ((13, 6), (17, 2), (27, 6))]
    meta = _load(str(tmp_path / "out" / "predict.json"))["meta"]
    assert [m["trained_epochs"] for m in meta["members"]] == [6, 2, 6]
    # A finished run is measured without a word: every member trained 6 of 6 (best weights from earlier epochs).
    _set_epoch(os.path.join(run, "seed_17", "checkpoint.pth.tar"), 6)
    measure_diversity.main(argv)
    assert _load(str(tmp_path / "out" / "predict.json"))["meta"]["incomplete_ensemble"] == []
    # A checkpoint file passed on its own: main.py records the run's arguments in it.
    loose = str(tmp_path / "loose.pth.tar")
    state = torch.load(os.path.join(run, "seed_17", "checkpoint.pth.tar"), weights_only=True)
    state.update(epoch=2, run_args={"epochs": 6})
    save_checkpoint(state, loose)
    files = argv[:5] + [os.path.join(run, "seed_13"), loose] + argv[6:]
    assert files[4:7] == ["--resume", os.path.join(run, "seed_13"), loose]
    capsys.readouterr()
    line = _error_line(capsys, measure_diversity.main, files)
    assert f"incomplete ensemble: seed 17 stopped after epoch 2 of 6 ({tmp_path})" in line


# ---------------------------------------------------------- measure_sharpness.py's records and notes
def test_measure_sharpness_records_the_restart(tmp_path):
    torch.manual_seed(0)
    member = tmp_path / "member.pth.tar"
    torch.save({"state_dict": create_model("resnet18", 10, width=4).state_dict(), "model": "resnet18",
                "width": 4, "dataset": "digits", "num_classes": 10}, member)
    common = ["--dataset", "digits", "--resume", str(member), "--mode", "APGD_worst", "--batch-num", "1",
              "--eval-batch-size", "2", "--n_iters", "3", "--norm", "l2", "--device", "cpu"]
    assert measure_sharpness.get_parser().parse_args(common).apgd_restart == "release"
    measure_sharpness.main(common + ["--apgd_restart", "worst", "--save", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "APGD_worst.json").read_text())
    assert result["meta"]["apgd_restart"] == "worst"
    assert result["meta"]["ellipsoid_search"] == "host scalars"      # a CPU's default
    assert result["individual_sharpness"][0]["l2_0.5"]["projection_gap"] <= 1e-4


def test_measure_sharpness_prints_one_note_for_a_saturated_setting(capsys):
    member = {"linf_0.5": {"saturated_fraction": 1.0, "uniform_loss": float(np.log(10))},
              "l2_0.05": {"saturated_fraction": 0.0, "uniform_loss": float(np.log(10))}}
    for key in member:
        measure_sharpness.saturation_note("APGD_worst", key, [member, member])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: linf_0.5 is saturated") and "2.303" in lines[0]


# ---------------------------------------------------------- --skip_finished
def test_measurement_is_skipped_only_for_the_same_arguments_and_files(finished_sb_run, tmp_path, capsys):
    run = shutil.copytree(finished_sb_run, tmp_path / "run")
    common = ["--dataset", "digits", "--data_path", str(tmp_path / "ds"), "--resume", str(run), "--mode", "fisher",
              "--batch-num", "2", "--device", "cpu", "--save", str(tmp_path / "out"), "--skip_finished"]
    result = tmp_path / "out" / "fisher.json"

    def measured(*extra):
        capsys.readouterr()
        measure_sharpness.main(common + list(extra))
        out = capsys.readouterr().out
        assert ("wrote " in out) != ("skip measuring fisher" in out), out
        return "wrote " in out
    assert measured()
    assert (tmp_path / "out" / "fisher.key.json").is_file()
    assert not measured()                    # the same command, the same files
    assert measured("--batch-num", "3")      # another setting
    assert json.loads(result.read_text())["meta"]["batch_num"] == 3
    assert not measured("--batch-num", "3")
    best = run / "seed_17" / "model_best.pth.tar"
    os.utime(best, ns=(os.stat(best).st_atime_ns, os.stat(best).st_mtime_ns + 10 ** 9))  # a member file rewritten
    assert measured("--batch-num", "3")
    os.remove(tmp_path / "out" / "fisher.key.json")  # a result from before keys were written
    assert measured("--batch-num", "3")
    capsys.readouterr()
    measure_sharpness.main([a for a in common if a != "--skip_finished"] + ["--batch-num", "3"])  # FORCE=1
    assert "wrote " in capsys.readouterr().out
