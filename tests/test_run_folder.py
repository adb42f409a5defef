"""Run folders (utils/run_folder.py and utils/checkpoint.py): resume from another run refused
before any training, model_best never behind the checkpoint after a real SIGKILL or a full disk, the
lock, failed first attempts, impossible flags, write failures, file permissions, --help."""
import errno
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

import main as main_script
from tests.fixtures import make_cifar
from utils import checkpoint, run_folder
from utils.errors import MEASURE_INTERRUPTED, UserError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "64"]
# The cheapest run with a split file and SAM masks: split at epoch 0, random subsets (no scoring).
SB = ["--data", "digits", "--seed", "13", "17", "--epochs", "1", "--sam", "True", "--flat_ratio", "0.5",
      "--initial_epochs", "-1", "--train_subset", "random"] + TINY
DE = ["--data", "digits", "--seed", "13", "--epochs", "2"] + TINY


def meta(path):
    return torch.load(path, weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def sb_run(tmp_path_factory):
    """A finished 2-member SharpBalance run, written under umask 027 (tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("sb")
    old = os.umask(0o027)
    try:
        main_script.main(SB + ["--data_path", str(root / "ds"), "--save_path", str(root / "run")])
    finally:
        os.umask(old)
    return root / "run"


def copy_run(source, target, drop_args=True):
    shutil.copytree(source, target)
    if drop_args:  # a --resume folder may lack args.json: the checkpoints must tell on their own
        os.remove(target / "args.json")
    return target


def test_files_follow_the_umask(sb_run):
    # mkstemp creates 0600 files; every file of the run must be as readable as open() would make it.
    for path in [sb_run / "args.json", sb_run / "sharpbalance_split.pt"] + \
            [sb_run / f"seed_{s}" / name for s in (13, 17) for name in ("checkpoint.pth.tar", "model_best.pth.tar", "log.csv")]:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o640), path
    old = os.umask(0o077)
    try:
        checkpoint.atomic_write(str(sb_run.parent / "result.json"), lambda f: f.write("{}"), mode="w")
    finally:
        os.umask(old)
    assert os.stat(sb_run.parent / "result.json").st_mode & 0o777 == 0o600
    assert not list(sb_run.glob("**/.tmp_*")) and not (sb_run / ".lock").exists()


@pytest.mark.parametrize("case", ["width", "dataset", "seeds", "split_size", "method"])
def test_resume_from_another_run_is_refused_before_training(sb_run, tmp_path, case):
    run = copy_run(sb_run, tmp_path / "run", drop_args=case != "seeds")
    before = {p: os.stat(p).st_mtime_ns for p in run.glob("**/*")}
    data = ["--data_path", str(tmp_path / "ds")]
    if case == "width":  # was a 117-line size-mismatch traceback
        argv, expected = SB + data + ["--width", "8", "--save_path", str(run)], ["width: 4 -> 8"]
    elif case == "dataset":  # a CIFAR-10 command resuming a digits run into a new folder
        make_cifar(str(tmp_path / "cifar"), "cifar10", n_train=200, n_test=20)
        argv = [a if a != "digits" else "cifar10" for a in SB] + [
            "--data_path", str(tmp_path / "cifar"), "--resume", str(run), "--save_path", str(tmp_path / "new")]
        expected = ["data: 'digits' -> 'cifar10'", "training split size: 1294 (seed_13's SAM mask) -> 180"]
    elif case == "seeds":
        argv = [a if a != "17" else "17 27" for a in SB] + data + ["--save_path", str(run)]
        expected = ["seeds: [13, 17] -> [13, 17, 27]", "(2, 1294) masks"]
    elif case == "split_size":  # the masks of a 45,000-image training split
        split = torch.load(run / "sharpbalance_split.pt", weights_only=True)
        split["sam_masks"] = torch.zeros(2, 45000, dtype=torch.bool)
        torch.save(split, run / "sharpbalance_split.pt")
        state = torch.load(run / "seed_13" / "checkpoint.pth.tar", weights_only=True)
        state["sam_mask"] = torch.zeros(45000, dtype=torch.bool)
        torch.save(state, run / "seed_13" / "checkpoint.pth.tar")
        before = {p: os.stat(p).st_mtime_ns for p in run.glob("**/*")}
        argv = SB + data + ["--save_path", str(run)]
        expected = ["(2, 45000) masks", "training split size: 45000 (seed_13's SAM mask) -> 1294"]
    else:  # a deep ensemble command on a SharpBalance folder
        argv = SB[:7] + TINY + data + ["--save_path", str(run)]
        expected = ["sam: True -> False", "flat_ratio: 0.5 -> 0.0", "train_subset: 'random' -> 'boosting'",
                    "method: sharpbalance"]
    with pytest.raises(UserError) as info:
        main_script.main(argv)
    message = str(info.value)
    assert "holds a run with other arguments" in message and "\n" not in message
    for text in expected:
        assert text in message
    # Nothing was trained, written, linked or left locked.
    assert {p: os.stat(p).st_mtime_ns for p in run.glob("**/*")} == before
    assert not (tmp_path / "new").exists() and not (run / ".lock").exists()


def test_resume_into_a_new_folder_continues_the_run(sb_run, tmp_path):
    # --resume OTHER with a fresh --save_path: OTHER's files are linked in after the checks.
    main_script.main(SB + ["--data_path", str(tmp_path / "ds"), "--resume", str(sb_run),
                           "--save_path", str(tmp_path / "new")])
    for seed in (13, 17):
        for name in ("checkpoint.pth.tar", "model_best.pth.tar", "log.csv"):
            assert (tmp_path / "new" / f"seed_{seed}" / name).read_bytes() == (sb_run / f"seed_{seed}" / name).read_bytes()
    assert (tmp_path / "new" / "sharpbalance_split.pt").is_file() and (tmp_path / "new" / "args.json").is_file()


def test_sigkill_between_checkpoint_and_best_is_repaired(tmp_path):
    """A real SIGKILL after checkpoint.pth.tar of an improving epoch, before model_best.pth.tar."""
    save = tmp_path / "run"
    argv = DE + ["--data_path", str(tmp_path / "ds"), "--save_path", str(save)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    # Killed before the trainer's second model_best copy: epoch 2's, after its checkpoint.
    killed = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kill_at.py"), "training.trainer.copy_checkpoint",
                             "2", os.path.join(ROOT, "main.py")] + argv, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last, best = meta(save / "seed_13" / "checkpoint.pth.tar"), meta(save / "seed_13" / "model_best.pth.tar")
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
    last, best = meta(save / "seed_13" / "checkpoint.pth.tar"), meta(save / "seed_13" / "model_best.pth.tar")
    assert best["epoch"] == last["best_epoch"] == 2 and best["best_acc"] == last["best_acc"]
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    assert not (save / ".lock").exists() and not list(save.glob("**/.tmp_*"))
    rows = (save / "seed_13" / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    load_member_files([str(save / "seed_13" / "model_best.pth.tar")], "digits", torch.device("cpu"))


def test_full_disk_keeps_the_previous_files_and_resumes(tmp_path, monkeypatch):
    argv = DE + ["--data_path", str(tmp_path / "ds"), "--save_path", str(tmp_path / "run")]
    seed_dir = tmp_path / "run" / "seed_13"
    real_save, real_copy = torch.save, shutil.copyfileobj

    def save_on_full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"PK\x03\x04 partial")  # torch.save on a full disk fails part-way like this
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_on_full_disk)
    with pytest.raises(UserError, match=r"member seed 13, epoch 2: cannot write '.*checkpoint.pth.tar': torch.save "
                                        r"could not write it .*MiB free there.*rerun the same command to resume"):
        main_script.main(argv)
    assert meta(seed_dir / "checkpoint.pth.tar")["epoch"] == 1 and not list(seed_dir.glob(".tmp_*"))

    monkeypatch.setattr(torch, "save", real_save)

    def copy_on_full_disk(source, target, *args):
        target.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "copyfileobj", copy_on_full_disk)  # the second write, model_best
    with pytest.raises(UserError, match=r"cannot write '.*model_best.pth.tar': No space left on device"):
        main_script.main(argv)
    assert (meta(seed_dir / "checkpoint.pth.tar")["epoch"], meta(seed_dir / "model_best.pth.tar")["epoch"]) == (2, 1)

    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    main_script.main(argv)
    assert meta(seed_dir / "model_best.pth.tar")["epoch"] == meta(seed_dir / "checkpoint.pth.tar")["best_epoch"] == 2
    assert not (tmp_path / "run" / ".lock").exists()


def test_failed_first_attempt_does_not_hold_the_folder(tmp_path):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--seed", "13", "--epochs", "1",
              "--save_path", str(tmp_path / "run")] + TINY
    for _ in range(2):  # the identical command is not refused as "another run" either
        with pytest.raises(UserError) as info:
            main_script.main(common + ["--lr", "1e30"])
        assert "member seed 13: loss became" in str(info.value)
        assert "no epoch of this member completed, so it has no checkpoint" in str(info.value)
    assert not list((tmp_path / "run").glob("seed_*/*.pth.tar"))
    main_script.main(common + ["--lr", "0.1"])
    assert json.loads((tmp_path / "run" / "args.json").read_text())["lr"] == 0.1
    assert meta(tmp_path / "run" / "seed_13" / "checkpoint.pth.tar")["epoch"] == 1


def test_recorded_arguments_compare_nan_equal():
    assert run_folder.same_value(float("nan"), float("nan")) and run_folder.same_value([13, 17], (13, 17))
    assert run_folder.argument_differences({"lr": float("nan"), "rho": 0.05}, {"lr": float("nan"), "rho": 0.1}) \
        == ["rho: 0.05 -> 0.1"]


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


def test_unwritable_save_path_is_one_line(tmp_path):
    if not os.path.isdir("/sys"):
        pytest.skip("needs /sys, a folder no user can create files in")
    with pytest.raises(UserError, match=r"cannot create --save_path '/sys/sharpbalance_test/run'"):
        main_script.main(DE + ["--data_path", str(tmp_path), "--save_path", "/sys/sharpbalance_test/run"])


def test_lock_held_by_a_live_process_refuses_a_second_run(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (save / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "then",
                                                "process_start": run_folder._process_start(holder.pid),
                                                "command": "main.py (the first run)"}))
        with pytest.raises(UserError, match=rf"is in use by pid {holder.pid} on host .*\(main.py \(the first run\)\)"
                                            rf".*delete '.*\.lock'"):
            main_script.main(DE + ["--data_path", str(tmp_path), "--save_path", str(save)])
        assert not (save / "args.json").exists() and (save / ".lock").exists()
        # A lock from another host cannot be checked: refused too, saying how to remove it.
        (save / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then", "command": "x"}))
        with pytest.raises(UserError, match="on host elsewhere"):
            main_script.main(DE + ["--data_path", str(tmp_path), "--save_path", str(save)])
    finally:
        holder.kill()
        holder.wait()


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


def test_model_best_repair_rules(tmp_path):
    """Fabricated checkpoints: a stale best is re-linked when the checkpoint is the best epoch; a best
    that disagrees otherwise was replaced outside training and is refused."""
    seed_dir = tmp_path / "seed_13"
    seed_dir.mkdir()
    record = lambda epoch, best: {"state_dict": {"w": torch.full((2,), float(epoch))}, "epoch": epoch,  # noqa: E731
                                  "best_epoch": best, "best_acc": 0.5}
    torch.save(record(3, 3), seed_dir / "checkpoint.pth.tar")
    torch.save(record(2, 2), seed_dir / "model_best.pth.tar")
    run_folder.repair_best(str(tmp_path))
    assert (seed_dir / "model_best.pth.tar").read_bytes() == (seed_dir / "checkpoint.pth.tar").read_bytes()
    torch.save(record(3, 1), seed_dir / "checkpoint.pth.tar")
    torch.save(record(2, 2), seed_dir / "model_best.pth.tar")
    with pytest.raises(UserError, match="holds epoch 2, but .* records epoch 1 .* replaced outside training"):
        run_folder.repair_best(str(tmp_path))


def test_datasets_load_on_rank_zero_first(monkeypatch):
    events = []
    monkeypatch.setattr(main_script, "barrier", lambda world_size: events.append("barrier"))
    monkeypatch.setattr(main_script, "build_datasets", lambda *a, download, **k: events.append(f"load {download}"))
    args = main_script.get_parser().parse_args([])
    main_script.load_splits(args, rank=1, world_size=2)
    main_script.load_splits(args, rank=0, world_size=2)
    assert events == ["barrier", "load False", "load True", "barrier"]


@pytest.mark.parametrize("script", ["measure_diversity.py", "measure_diversity_variance.py", "measure_sharpness.py"])
def test_ctrl_c_in_a_measure_script_gives_no_training_hint(script, monkeypatch, capsys, tmp_path):
    import measure.cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(measure.cli, "parse_modes", interrupt)
    monkeypatch.setattr(sys, "argv", [script, "--resume", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert info.value.code == 130 and err.startswith("interrupted:") and "\n" not in err
    assert "to resume" not in err


def test_run_main_lines(capsys):
    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/log.csv")

    def ctrl_c(argv):
        raise KeyboardInterrupt
    for main, code, text in [(full_disk, 2, "error: [Errno 28] No space left on device: '/data/log.csv'"),
                             (ctrl_c, 130, MEASURE_INTERRUPTED)]:
        with pytest.raises(SystemExit) as info:
            run_main(main, [], interrupted=MEASURE_INTERRUPTED)
        err = capsys.readouterr().err
        assert info.value.code == code and err.startswith(text) and err.count("\n") == 1


def test_help_shows_every_default():
    import argparse
    import measure_diversity
    import measure_diversity_variance
    import measure_sharpness
    for module in (main_script, measure_diversity, measure_diversity_variance, measure_sharpness):
        parser = module.get_parser()
        # ArgumentDefaultsHelpFormatter adds "(default: ...)" only to flags that have help text.
        missing = [a.option_strings for a in parser._actions if a.help in (None, argparse.SUPPRESS)]
        assert not missing, (module.__name__, missing)
    text = " ".join(main_script.get_parser().format_help().split())
    for default in ("--epochs EPOCHS training epochs per member (default: 200)", "(default: 0.1)",
                    "(default: 128)", "(default: 0.9)", "(default: 0.0005)", "(default: 500)"):
        assert default in text


def test_no_reference_to_a_spec_file_outside_the_repository():
    needle = "SPEC " + "§"
    hits = []
    for folder, _, files in os.walk(ROOT):
        if "/." in folder[len(ROOT):]:
            continue
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".ipynb")):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    hits += [f"{name}:{i}" for i, line in enumerate(f, 1) if needle in line]
    assert not hits


def test_tiny_run_from_before_the_shortcut_scales_is_told_which_flag_resumes_it(tmp_path, capsys):
    # A Tiny-ImageNet run trained without the shortcut scales by code that did not record the flag
    # (the scales became the default later): resuming with the new default must say what to pass.
    from tests.fixtures import make_tiny_imagenet
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
