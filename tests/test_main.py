"""main.py end to end: the three methods on digits, the released commands on fabricated CIFAR,
bad input, exact resume after a real kill, torchrun with 3 gloo ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as main_script
from tests.fixtures import make_cifar
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
TINY = ["--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "64"]


def run_cli(args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + args, cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(str(root), "cifar10", n_train=200, n_test=40)
    make_cifar(str(root), "cifar100", n_train=200, n_test=40)
    return str(root)


def test_three_methods_on_digits(tmp_path):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "2", "--seed", "13", "17", "27"] + TINY
    main_script.main(common + ["--save_path", str(tmp_path / "de")])
    main_script.main(common + ["--sam", "True", "--save_path", str(tmp_path / "sam")])
    main_script.main(common + ["--sam", "True", "--flat_ratio", "0.5", "--initial_epochs", "0",
                               "--save_path", str(tmp_path / "sb")])
    for method, phases in [("de", ["sgd", "sgd"]), ("sam", ["sam", "sam"]), ("sb", ["warm-up", "mixed"])]:
        for seed in (13, 17, 27):
            directory = tmp_path / method / f"seed_{seed}"
            state = torch.load(directory / "checkpoint.pth.tar", weights_only=True)
            assert state["epoch"] == 2 and state["seed"] == seed and "optimizer" in state
            assert (directory / "model_best.pth.tar").is_file()
            lines = (directory / "log.csv").read_text().strip().splitlines()
            assert lines[0].startswith("epoch,phase,lr,train_loss,train_acc,val_loss,val_acc")
            assert [line.split(",")[1] for line in lines[1:]] == phases
    split = torch.load(tmp_path / "sb" / "sharpbalance_split.pt", weights_only=True)
    assert split["scores"].shape == split["sam_masks"].shape == (3, 1294)
    assert torch.all(split["scores"] >= 0) and split["split_rule"] == "share"
    # The SAM fraction logged in the mixed epoch is the member's share of SAM samples.
    row = (tmp_path / "sb" / "seed_17" / "log.csv").read_text().strip().splitlines()[-1].split(",")
    assert abs(float(row[8]) - float(split["sam_masks"][1].float().mean())) < 1e-4
    state = torch.load(tmp_path / "sb" / "seed_17" / "checkpoint.pth.tar", weights_only=True)
    assert torch.equal(state["sam_mask"], split["sam_masks"][1])
    args = json.loads((tmp_path / "sb" / "args.json").read_text())
    assert args["seeds"] == [13, 17, 27] and args["flat_ratio"] == 0.5


def test_member_alone_equals_member_in_ensemble(tmp_path):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "1"] + TINY
    main_script.main(common + ["--seed", "17", "--save_path", str(tmp_path / "alone")])
    main_script.main(common + ["--seed", "13 17", "--save_path", str(tmp_path / "ensemble")])
    assert same_weights(weights(tmp_path / "alone" / "seed_17" / "checkpoint.pth.tar"),
                        weights(tmp_path / "ensemble" / "seed_17" / "checkpoint.pth.tar"))
    assert not same_weights(weights(tmp_path / "ensemble" / "seed_13" / "checkpoint.pth.tar"),
                            weights(tmp_path / "ensemble" / "seed_17" / "checkpoint.pth.tar"))


def test_released_cifar_commands_run_verbatim(cifar_root, tmp_path):
    # The seed README's three commands, with the paths filled in and the size shrunk.
    shrink = ["--width", "4", "--epochs", "2", "--device", "cpu", "--no_progress"]
    de = run_cli(["--data", "cifar100", "--data_path", cifar_root, "--model", "resnet18", "--seed", "13 17 27",
                  "--save_path", str(tmp_path / "de")] + shrink)
    assert de.returncode == 0, de.stderr
    sb = run_cli(["--data", "cifar10", "--data_path", cifar_root, "--model", "resnet18", "--seed", "13 17 27",
                  "--sam", "True", "--rho", "0.2", "--flat_ratio", "0.5", "--initial_epochs", "0",
                  "--save_path", str(tmp_path / "sb")] + shrink)
    assert sb.returncode == 0, sb.stderr
    assert "SharpBalance split done" in sb.stdout
    split = torch.load(tmp_path / "sb" / "sharpbalance_split.pt", weights_only=True)
    assert split["split_rule"] == "boost" and split["sam_masks"].shape == (3, 180)
    for seed in (13, 17, 27):
        assert (tmp_path / "de" / f"seed_{seed}" / "model_best.pth.tar").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--data", "mnist"], "invalid choice: 'mnist'"),
    (["--model", "vgg"], "unknown model 'vgg'; valid names: resnet18, wrn-40-2"),
    (["--flat_ratio", "1.0", "--sam", "True"], "--flat_ratio must be in [0, 1)"),
    (["--rho", "-0.1", "--sam", "True"], "--rho must be >= 0"),
    (["--sam", "True", "--flat_ratio", "0.5", "--initial_epochs", "2", "--epochs", "3"], "would never happen"),
    (["--seed", "13", "13"], "--seed has duplicates"),
    (["--sam", "maybe"], "expected True or False"),
])
def test_bad_arguments_give_one_line(tmp_path, extra, message):
    result = run_cli(["--data", "digits", "--data_path", str(tmp_path), "--save_path", str(tmp_path / "run")]
                     + TINY + ["--epochs", "3"] + extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith(("error", "main.py: error"))]) == 1


def test_missing_cifar_offline_is_one_line(tmp_path):
    result = run_cli(["--data", "cifar10", "--data_path", str(tmp_path / "empty"), "--epochs", "1"] + TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cifar-10-batches-py" in result.stderr and "--data_path" in result.stderr


def test_save_path_that_is_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        main_script.main(["--data", "digits", "--data_path", str(tmp_path), "--epochs", "1",
                          "--save_path", str(target)] + TINY)


def test_resume_with_different_method_arguments_lists_them(tmp_path):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "1", "--seed", "13",
              "--save_path", str(tmp_path / "run")] + TINY
    main_script.main(common)
    with pytest.raises(UserError, match=r"sam: False -> True; rho: 0.05 -> 0.1"):
        main_script.main(common + ["--sam", "True", "--rho", "0.1"])


def test_non_finite_loss_names_member_and_keeps_checkpoint(tmp_path, monkeypatch):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--seed", "13", "--epochs", "3",
              "--save_path", str(tmp_path / "run")] + TINY
    import training.engine
    real_step, calls = training.engine.sgd_step, {"n": 0}  # a deep ensemble: plain SGD steps

    def step_that_diverges(*args, **kwargs):
        # The 3rd step of epoch 2 (21 steps per epoch at batch 64) returns a NaN loss.
        calls["n"] += 1
        loss_sum, correct = real_step(*args, **kwargs)
        return (float("nan") if calls["n"] == 21 + 3 else loss_sum), correct
    monkeypatch.setattr(training.engine, "sgd_step", step_that_diverges)
    with pytest.raises(UserError, match=r"member seed 13: loss became nan .*epoch 2.*; its checkpoint of epoch 1 is kept"):
        main_script.main(common)
    state = torch.load(tmp_path / "run" / "seed_13" / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1


def test_killed_run_resumes_bit_identical(tmp_path):
    args = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "4", "--seed", "13", "17",
            "--sam", "True", "--flat_ratio", "0.5", "--initial_epochs", "1"] + TINY
    # The reference and the run to kill at the same time, one thread each (the test's wall time on
    # two cores; one thread gives the same numbers whatever else runs).
    reference = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")] + args
                                 + ["--save_path", str(tmp_path / "reference")], cwd=ROOT, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    save = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")] + args + ["--save_path", str(save)],
                               cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it for real once the second member is in its second epoch (after the first split epoch).
    marker = save / "seed_17" / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if marker.is_file() and len(marker.read_text().strip().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(save / "seed_13" / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] < 4, "the run finished before it could be killed"
    _, reference_errors = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_errors

    resumed = run_cli(args + ["--save_path", str(save)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch" in resumed.stdout
    for seed in (13, 17):
        ref = torch.load(tmp_path / "reference" / f"seed_{seed}" / "checkpoint.pth.tar", weights_only=True)
        got = torch.load(save / f"seed_{seed}" / "checkpoint.pth.tar", weights_only=True)
        assert same_weights(ref["state_dict"], got["state_dict"])
        assert torch.equal(ref["sam_mask"], got["sam_mask"])
        rows = (save / f"seed_{seed}" / "log.csv").read_text().strip().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_torchrun_three_gloo_ranks_match_single_process(tmp_path):
    args = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "2", "--seed", "13", "17", "27",
            "--sam", "True", "--flat_ratio", "0.5", "--initial_epochs", "0"] + TINY
    # both at once (one thread per process: the same numbers whatever else runs)
    single = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")] + args
                              + ["--save_path", str(tmp_path / "single")], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
                            "--master_port=29533", os.path.join(ROOT, "main.py")] + args
                           + ["--save_path", str(tmp_path / "multi")],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    _, single_errors = single.communicate(timeout=300)
    assert single.returncode == 0, single_errors
    assert multi.returncode == 0, multi.stderr[-2000:]
    a = torch.load(tmp_path / "single" / "sharpbalance_split.pt", weights_only=True)
    b = torch.load(tmp_path / "multi" / "sharpbalance_split.pt", weights_only=True)
    assert torch.equal(a["sam_masks"], b["sam_masks"]) and torch.allclose(a["scores"], b["scores"])
    for seed in (13, 17, 27):
        assert same_weights(weights(tmp_path / "single" / f"seed_{seed}" / "checkpoint.pth.tar"),
                            weights(tmp_path / "multi" / f"seed_{seed}" / "checkpoint.pth.tar"))
