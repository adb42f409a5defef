"""main.py end to end: the three methods on digits, the seed README's commands on fabricated CIFAR,
bad arguments refused with one line before any work, and the data loaded on rank 0 first.

What a run does across epochs (resume, kills, divergence) is in tests/test_trainer.py, its folder's
checks in tests/test_run_folder.py, torchrun's ranks in tests/test_distributed.py."""
import json

import numpy as np
import pytest
import torch

import main as main_script
import measure_sharpness
from tests.fixtures import DE, TINY, error_line, make_cifar, run_python
from tests.references import brute_force_masks
from utils.errors import UserError


def test_the_three_methods_train_on_digits_with_their_phases(tmp_path):
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
    assert split["scores"].shape == split["sam_masks"].shape == (3, 1294) and split["split_rule"] == "share"
    # The masks are the share rule's split of the recorded scores, by set algebra (tests/references.py).
    _, expected = brute_force_masks(split["scores"].numpy(), 0.5, "share", "flattest")
    assert [set(np.flatnonzero(row).tolist()) for row in split["sam_masks"].numpy()] == expected
    # The SAM fraction logged in the mixed epoch is the member's share of SAM samples.
    row = (tmp_path / "sb" / "seed_17" / "log.csv").read_text().strip().splitlines()[-1].split(",")
    assert abs(float(row[8]) - float(split["sam_masks"][1].float().mean())) < 1e-4
    state = torch.load(tmp_path / "sb" / "seed_17" / "checkpoint.pth.tar", weights_only=True)
    assert torch.equal(state["sam_mask"], split["sam_masks"][1])
    args = json.loads((tmp_path / "sb" / "args.json").read_text())
    assert args["seeds"] == [13, 17, 27] and args["flat_ratio"] == 0.5


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(str(root), "cifar10", n_train=200, n_test=40)
    make_cifar(str(root), "cifar100", n_train=200, n_test=40)
    return str(root)


def test_released_cifar_commands_run_verbatim(cifar_root, tmp_path):
    # The seed README's three commands, with the paths filled in and the size shrunk.
    shrink = ["--width", "4", "--epochs", "2", "--device", "cpu", "--no_progress"]
    de = run_python(["main.py", "--data", "cifar100", "--data_path", cifar_root, "--model", "resnet18",
                     "--seed", "13 17 27", "--save_path", str(tmp_path / "de")] + shrink)
    assert de.returncode == 0, de.stderr
    sb = run_python(["main.py", "--data", "cifar10", "--data_path", cifar_root, "--model", "resnet18",
                     "--seed", "13 17 27", "--sam", "True", "--rho", "0.2", "--flat_ratio", "0.5",
                     "--initial_epochs", "0", "--save_path", str(tmp_path / "sb")] + shrink)
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
    result = run_python(["main.py", "--data", "digits", "--data_path", str(tmp_path),
                         "--save_path", str(tmp_path / "run")] + TINY + ["--epochs", "3"] + extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith(("error", "main.py: error"))]) == 1


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-0.1", "--lr must be >= 0"), ("--lr", "nan", "--lr must be >= 0 (and finite), got nan"),
    ("--momentum", "-0.9", "--momentum must be >= 0"), ("--momentum", "1.5", "--momentum must be < 1"),
    ("--weight_decay", "-0.0005", "--weight_decay must be >= 0"), ("--rho", "inf", "--rho must be >= 0 (and finite)"),
    ("--width", "0", "--width must be a positive integer"),
])
def test_impossible_values_are_one_line(tmp_path, flag, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        main_script.main(DE + ["--save_path", str(tmp_path / "run"), flag, value])
    assert not (tmp_path / "run").exists()


def test_seeds_outside_numpys_range_are_one_line(tmp_path):
    save = tmp_path / "run"
    line = error_line(run_python(["main.py", "--data", "digits", "--seed", "13", "-5", "--save_path", str(save)]))
    assert line == "error: --seed -5 is out of range: seeds are integers from 0 to 4294967295 (numpy seeds each " \
                   "member's initialisation with it)"
    with pytest.raises(UserError, match="--seed 4294967296 is out of range"):
        main_script.main(["--data", "digits", "--seed", str(2 ** 32), "--save_path", str(save)])
    main_script.check_args(main_script.get_parser().parse_args(["--seed", "0", str(2 ** 32 - 1)]))
    with pytest.raises(UserError, match="--seed -1 is out of range"):
        measure_sharpness.main(["--dataset", "digits", "--resume", str(tmp_path), "--seed", "-1",
                                "--save", str(tmp_path / "out")])
    assert not save.exists()


def test_missing_cifar_offline_is_one_line(tmp_path):
    result = run_python(["main.py", "--data", "cifar10", "--data_path", str(tmp_path / "empty"), "--epochs", "1"]
                        + TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cifar-10-batches-py" in result.stderr and "--data_path" in result.stderr


def test_datasets_load_on_rank_zero_first(monkeypatch):
    events = []
    monkeypatch.setattr(main_script, "barrier", lambda world_size: events.append("barrier"))
    monkeypatch.setattr(main_script, "build_datasets", lambda *a, download, **k: events.append(f"load {download}"))
    args = main_script.get_parser().parse_args([])
    main_script.load_splits(args, rank=1, world_size=2)
    main_script.load_splits(args, rank=0, world_size=2)
    assert events == ["barrier", "load False", "load True", "barrier"]
