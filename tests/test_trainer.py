"""The trainer (training/trainer.py): members independent of each other, an exact resume after a real
SIGKILL (also between a checkpoint and its model_best copy), a finished run left alone, a member whose
loss diverges, SIGTERM releasing the run folder's lock, the fp16 loss scale in a member's checkpoint,
the hint for a Tiny-ImageNet run from before the shortcut scales, and what the trainer does when the
hooks scoring backend disagrees with a plain backward pass (before the first epoch, at the partition).

The run folder's own checks (arguments, lock, damaged or foreign files) are in tests/test_run_folder.py.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

import main as main_script
import training.scores
from tests.fixtures import (DE, SB, TINY, checkpoint_weights, files, load_saved, make_tiny_imagenet, run_python,
                            same_weights, start_python)
from utils.errors import UserError


def test_a_member_trained_alone_equals_the_same_member_in_an_ensemble(tmp_path):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "1"] + TINY
    main_script.main(common + ["--seed", "17", "--save_path", str(tmp_path / "alone")])
    main_script.main(common + ["--seed", "13 17", "--save_path", str(tmp_path / "ensemble")])
    assert same_weights(checkpoint_weights(tmp_path / "alone" / "seed_17" / "checkpoint.pth.tar"),
                        checkpoint_weights(tmp_path / "ensemble" / "seed_17" / "checkpoint.pth.tar"))
    assert not same_weights(checkpoint_weights(tmp_path / "ensemble" / "seed_13" / "checkpoint.pth.tar"),
                            checkpoint_weights(tmp_path / "ensemble" / "seed_17" / "checkpoint.pth.tar"))


def test_killed_run_resumes_bit_identical(tmp_path):
    args = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "4", "--seed", "13", "17",
            "--sam", "True", "--flat_ratio", "0.5", "--initial_epochs", "1"] + TINY
    # The reference and the run to kill at the same time, one thread each (the test's wall time on
    # two cores; one thread gives the same numbers whatever else runs).
    reference = start_python(["main.py"] + args + ["--save_path", str(tmp_path / "reference")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    save = tmp_path / "killed"
    process = start_python(["main.py"] + args + ["--save_path", str(save)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    resumed = run_python(["main.py"] + args + ["--save_path", str(save)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch" in resumed.stdout
    for seed in (13, 17):
        ref = torch.load(tmp_path / "reference" / f"seed_{seed}" / "checkpoint.pth.tar", weights_only=True)
        got = torch.load(save / f"seed_{seed}" / "checkpoint.pth.tar", weights_only=True)
        assert same_weights(ref["state_dict"], got["state_dict"])
        assert torch.equal(ref["sam_mask"], got["sam_mask"])
        rows = (save / f"seed_{seed}" / "log.csv").read_text().strip().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_rerunning_a_finished_run_trains_nothing_and_changes_no_file(finished_sb_run, tmp_path, capsys):
    run = shutil.copytree(finished_sb_run, tmp_path / "run")
    before = files(run)
    main_script.main(SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run)])
    assert "nothing to train: every member in" in capsys.readouterr().out
    after = files(run)
    assert after.keys() == before.keys()
    assert [name for name in before if before[name] != after[name]] in ([], ["args.json"])
    # args.json is written again by every start: here only the folder's new place differs.
    old, new = (json.loads(contents["args.json"]) for contents in (before, after))
    assert {k: v for k, v in old.items() if old[k] != new[k]}.keys() <= {"save_path", "data_path"}


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


def test_sigkill_between_checkpoint_and_best_is_repaired(tmp_path):
    """A real SIGKILL after checkpoint.pth.tar of an improving epoch, before model_best.pth.tar."""
    save = tmp_path / "run"
    argv = DE + ["--data_path", str(tmp_path / "ds"), "--save_path", str(save)]
    # Killed before the trainer's second model_best copy: epoch 2's, after its checkpoint.
    killed = run_python(["tests/kill_at.py", "training.trainer.copy_checkpoint", "2", "main.py"] + argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last, best = load_saved(save / "seed_13" / "checkpoint.pth.tar"), load_saved(save / "seed_13" / "model_best.pth.tar")
    # What a kill between the two writes leaves: the checkpoint says epoch 2 is the best, model_best holds epoch 1.
    assert (last["epoch"], last["best_epoch"], best["epoch"]) == (2, 2, 1) and last["best_acc"] > best["best_acc"]
    lock = json.loads((save / ".lock").read_text())
    assert lock["pid"] != os.getpid() and lock["host"] == socket.gethostname()
    (save / "seed_13" / ".tmp_abc.pth.tar").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves
    # Until the training command runs again, the measure scripts refuse the stale model_best.
    from measure.loading import load_member_files
    with pytest.raises(UserError, match="records epoch 2 as the best .*interrupted between the two writes"):
        load_member_files([str(save / "seed_13" / "model_best.pth.tar")], "digits", torch.device("cpu"))

    main_script.main(argv)  # the same command: stale lock and leftovers removed, model_best repaired
    last, best = load_saved(save / "seed_13" / "checkpoint.pth.tar"), load_saved(save / "seed_13" / "model_best.pth.tar")
    assert best["epoch"] == last["best_epoch"] == 2 and best["best_acc"] == last["best_acc"]
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    assert not (save / ".lock").exists() and not list(save.glob("**/.tmp_*"))
    rows = (save / "seed_13" / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    load_member_files([str(save / "seed_13" / "model_best.pth.tar")], "digits", torch.device("cpu"))


def test_sigterm_releases_the_lock(tmp_path, monkeypatch):
    # A scheduler's stop (or torchrun's teardown) must not leave a lock a rerun on another host
    # could not judge.
    import training.trainer

    def terminated(self, end_epoch, progress=True):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(training.trainer.Member, "train_until", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        main_script.main(DE + ["--data_path", str(tmp_path), "--save_path", str(tmp_path / "run")])
    assert info.value.code == 128 + signal.SIGTERM and not (tmp_path / "run" / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_tiny_run_from_before_the_shortcut_scales_is_told_which_flag_resumes_it(tmp_path, capsys):
    # A Tiny-ImageNet run trained without the shortcut scales by code that did not record the flag
    # (the scales became the default later): resuming with the new default must say what to pass.
    tiny_dir, _ = make_tiny_imagenet(str(tmp_path / "data"), num_classes=3, train_per_class=4, val_per_class=2)
    run = tmp_path / "run"
    command = ["--data", "tiny_imgnet", "--data_path", tiny_dir, "--seed", "13", "--epochs", "1",
               "--save_path", str(run)] + TINY
    main_script.main(command + ["--shortcut_scale", "False"])
    path = run / "seed_13" / "checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    state["run_args"].pop("shortcut_scale")
    state.pop("shortcut_scale", None)
    torch.save(state, path)
    args = json.loads((run / "args.json").read_text())
    args.pop("shortcut_scale")
    (run / "args.json").write_text(json.dumps(args))
    with pytest.raises(UserError, match="trained with --shortcut_scale False: pass that flag"):
        main_script.main(command)


def test_member_checkpoint_carries_the_scaler(digits, tmp_path):
    from training.trainer import Member
    from utils.checkpoint import save_checkpoint
    args = main_script.get_parser().parse_args(["--data", "digits", "--width", "4", "--seed", "13", "--amp", "fp16",
                                                "--save_path", str(tmp_path), "--sam", "True"])
    main_script.check_args(args)
    member = Member(args, 0, 13, digits, torch.device("cpu"))
    member.fast.scaler = torch.amp.GradScaler("cpu", init_scale=1234.0)
    path = os.path.join(member.directory, "checkpoint.pth.tar")
    os.makedirs(member.directory)
    save_checkpoint(member.state(), path)
    again = Member(args, 0, 13, digits, torch.device("cpu"))
    assert again.fast.scaler.get_scale() == 65536.0
    assert again.resume()
    assert again.fast.scaler.get_scale() == 1234.0


def sharpbalance(tmp_path, name):
    """A two-epoch SharpBalance command of two members that scores them at the split (after epoch 1)."""
    return ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "2", "--seed", "13", "17",
            "--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "256", "--sam", "True",
            "--flat_ratio", "0.5", "--initial_epochs", "0", "--save_path", str(tmp_path / name)]


def test_hooks_disagreeing_at_the_partition_is_one_line_per_member(tmp_path, monkeypatch, capsys):
    """The check passes before the first epoch and fails on the trained members at the partition
    (as TF32 on trained weights did): each member is scored with torch.func after one line."""
    import training.trainer
    real_loop, calls = training.scores._loop_squared_norms, []

    def disagreeing_after_the_first_check(*args):
        calls.append(1)
        return real_loop(*args) * (1.0 if len(calls) == 1 else 1 + 1.2e-3)
    monkeypatch.setattr(training.scores, "_loop_squared_norms", disagreeing_after_the_first_check)
    real_scores, pairs = training.trainer.squared_grad_norms, []

    def scored_and_by_func(model, loader, device, **kwargs):
        scores = real_scores(model, loader, device, **kwargs)
        by_func = real_scores(model, loader, device, chunk_size=kwargs["chunk_size"],
                              num_samples=kwargs["num_samples"], backend="func")
        pairs.append((scores, by_func))
        return scores
    monkeypatch.setattr(training.trainer, "squared_grad_norms", scored_and_by_func)
    main_script.main(sharpbalance(tmp_path, "hooks") + ["--score_backend", "hooks"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 3  # the check before the first epoch, then one per member at the partition
    assert [line.split(" hooks gave")[0] for line in err] == [
        f"warning: [seed {seed}] the hooks backend cannot score this model (checked on the first chunk):"
        for seed in (13, 17)]
    assert len(pairs) == 2 and all(torch.equal(scores, by_func) for scores, by_func in pairs)
    split = torch.load(tmp_path / "hooks" / "sharpbalance_split.pt", weights_only=True)
    assert torch.equal(split["scores"], torch.stack([scores for scores, _ in pairs]))


def test_hooks_disagreeing_before_the_first_epoch_settle_on_func(tmp_path, monkeypatch, capsys):
    real_loop, calls = training.scores._loop_squared_norms, []

    def disagreeing(*args):
        calls.append(1)
        return real_loop(*args) * 1.01
    monkeypatch.setattr(training.scores, "_loop_squared_norms", disagreeing)
    main_script.main(sharpbalance(tmp_path, "run") + ["--score_backend", "hooks"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1  # the partition scored with func, the hooks were not tried again
    assert len(err) == 1 and err[0].startswith("warning: --score_backend hooks: the hooks backend cannot score this "
                                               "model (checked on the first chunk): hooks gave ")
