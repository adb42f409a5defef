"""Run folders (utils/run_folder.py): what the checks do with another run's arguments, a busy, damaged,
missing or foreign file, before any training: each case ends in the correct result, or in one ``error:``
line and exit status 2 with nothing lost. Real processes (main.py and the measure scripts run as a user
runs them), real kills (tests/kill_at.py), real bytes flipped inside real checkpoints.

Resuming a killed run, and the trainer's part of a resume, are in tests/test_trainer.py; the atomic
writes in tests/test_checkpoint.py."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import zipfile

import pytest
import torch

import main as main_script
import measure_diversity
from tests.fixtures import (DE, SB, TINY, error_line, files, load_saved, make_cifar, run_python, start_python)
from utils import run_folder
from utils.errors import UserError


def same(a, b):
    """Equal nested checkpoint contents (dicts, lists, tensors, plain values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def flip_tensor_byte(path):
    """Flip one byte inside the largest tensor of a torch.save archive, as a bad disk or copy would."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(open(path, "rb").read())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + 12] ^= 0x40
    open(path, "wb").write(data)
    return entry.filename


@pytest.fixture
def run(finished_sb_run, tmp_path):
    """A copy of the finished SharpBalance run (tests.fixtures.SB) to damage."""
    return shutil.copytree(finished_sb_run, tmp_path / "run")


def train(run, tmp_path, *extra):
    main_script.main(SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run), *extra])


def measure(run, tmp_path, *extra):
    measure_diversity.main(["--dataset", "digits", "--data_path", str(tmp_path / "ds"), "--resume", str(run),
                            "--mode", "predict", "--corruptions", "none", "--device", "cpu",
                            "--save", str(tmp_path / "out"), *extra])


# ----------------------------------------------------------------------------- the run's arguments
@pytest.mark.parametrize("case", ["width", "dataset", "seeds", "split_size", "method"])
def test_resume_from_another_run_is_refused_before_training(finished_sb_run, tmp_path, case):
    run = shutil.copytree(finished_sb_run, tmp_path / "run")
    if case != "seeds":  # a --resume folder may lack args.json: the checkpoints must tell on their own
        os.remove(run / "args.json")
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


def test_resume_into_a_new_folder_continues_the_run(finished_sb_run, tmp_path):
    # --resume OTHER with a fresh --save_path: OTHER's files are linked in after the checks.
    main_script.main(SB + ["--data_path", str(tmp_path / "ds"), "--resume", str(finished_sb_run),
                           "--save_path", str(tmp_path / "new")])
    for seed in (13, 17):
        for name in ("checkpoint.pth.tar", "model_best.pth.tar", "log.csv"):
            assert (tmp_path / "new" / f"seed_{seed}" / name).read_bytes() == \
                (finished_sb_run / f"seed_{seed}" / name).read_bytes()
    assert (tmp_path / "new" / "sharpbalance_split.pt").is_file() and (tmp_path / "new" / "args.json").is_file()


def test_resume_with_different_method_arguments_lists_them(tmp_path):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "1", "--seed", "13",
              "--save_path", str(tmp_path / "run")] + TINY
    main_script.main(common)
    with pytest.raises(UserError, match=r"sam: False -> True; rho: 0.05 -> 0.1"):
        main_script.main(common + ["--sam", "True", "--rho", "0.1"])


def test_recorded_arguments_compare_nan_equal():
    assert run_folder.same_value(float("nan"), float("nan")) and run_folder.same_value([13, 17], (13, 17))
    assert run_folder.argument_differences({"lr": float("nan"), "rho": 0.05}, {"lr": float("nan"), "rho": 0.1}) \
        == ["rho: 0.05 -> 0.1"]


@pytest.mark.parametrize("text", [b"{\"seeds\": [13, 17", b"[13, 17]", b"\xff\xfe not text"])
def test_invalid_args_json_is_one_line_for_training_and_measuring(run, tmp_path, text):
    (run / "args.json").write_bytes(text)
    before = files(run)
    for action in (train, measure):
        with pytest.raises(UserError, match=r"args.json' (cannot be read as JSON|holds a JSON list).*delete it "
                                            r"\(every checkpoint records the run's arguments"):
            action(run, tmp_path)
    assert files(run) == before


def test_an_invalid_args_json_is_one_line_from_the_command_line(run, tmp_path):
    (run / "args.json").write_text("{")
    line = error_line(run_python(["main.py"] + SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run)]))
    assert f"'{run}/args.json' cannot be read as JSON" in line and not (run / ".lock").exists()


# ------------------------------------------------------------------------------------- --save_path
def test_a_save_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        main_script.main(["--data", "digits", "--data_path", str(tmp_path), "--epochs", "1",
                          "--save_path", str(target)] + TINY)


def test_unwritable_save_path_is_one_line(tmp_path):
    if not os.path.isdir("/sys"):
        pytest.skip("needs /sys, a folder no user can create files in")
    with pytest.raises(UserError, match=r"cannot create --save_path '/sys/sharpbalance_test/run'"):
        main_script.main(DE + ["--data_path", str(tmp_path), "--save_path", "/sys/sharpbalance_test/run"])


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
    assert load_saved(tmp_path / "run" / "seed_13" / "checkpoint.pth.tar")["epoch"] == 1


# ---------------------------------------------------------------------------------------- the lock
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


@pytest.mark.parametrize("text", ["", "{}", json.dumps({"host": socket.gethostname()}),
                                  json.dumps({"host": socket.gethostname(), "pid": "123"}),
                                  json.dumps({"host": socket.gethostname(), "pid": 0}), "[1]"])
def test_lock_without_a_pid_is_one_line_and_kept(run, tmp_path, text):
    (run / ".lock").write_text(text)
    before = files(run)
    with pytest.raises(UserError, match=r"--save_path is locked by '.*\.lock', which is empty, unreadable or "
                                        r"names no pid .*delete that file"):
        train(run, tmp_path)
    assert files(run) == before


def test_a_lock_without_a_pid_is_one_line_from_the_command_line(run, tmp_path):
    (run / ".lock").write_text("{}")
    line = error_line(run_python(["main.py"] + SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run)]))
    assert "names no pid" in line


def test_resume_from_a_run_that_is_training_is_refused(tmp_path):
    """--resume A --save_path B while another process trains A: refused, naming that process."""
    source, target = tmp_path / "a", tmp_path / "b"
    argv = ["main.py", "--data", "digits", "--seed", "13", "--epochs", "300", "--data_path", str(tmp_path / "ds")] + TINY
    trainer = start_python(argv + ["--save_path", str(source)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 240
        while not (source / "seed_13" / "checkpoint.pth.tar").exists():
            assert trainer.poll() is None and time.time() < end, "the training process did not start"
            time.sleep(0.2)
        result = run_python(argv + ["--resume", str(source), "--save_path", str(target)])
        line = error_line(result)
        assert f"--resume '{source}' is in use by pid {trainer.pid} on host {socket.gethostname()}" in line
        assert not target.exists() and json.loads((source / ".lock").read_text())["pid"] == trainer.pid
    finally:
        trainer.send_signal(signal.SIGTERM)  # releases its lock
        trainer.wait(timeout=120)
    assert not (source / ".lock").exists()


# ----------------------------------------------------------------------------------------- log.csv
def test_damaged_log_lines_after_a_kill_are_set_aside_and_the_run_resumes(tmp_path):
    """A real SIGKILL before epoch 3's checkpoint, then a line cut short and NUL bytes, as a crash while
    appending leaves on some file systems: the rerun resumes and ends where an uninterrupted run does."""
    argv = ["--data", "digits", "--seed", "13", "--epochs", "3", "--data_path", str(tmp_path / "ds")] + TINY
    reference = start_python(["main.py"] + argv + ["--save_path", str(tmp_path / "reference")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = run_python(["tests/kill_at.py", "training.trainer.save_checkpoint", "3", "main.py"] + argv +
                        ["--save_path", str(tmp_path / "run")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    log = tmp_path / "run" / "seed_13" / "log.csv"
    rows = log.read_bytes().splitlines(keepends=True)
    assert len(rows) == 4 and rows[3].startswith(b"3,")  # epoch 3 logged, its checkpoint not written
    garbage = [b"3,sgd,0.001,1.5\x00\x00\x00\n", b"\x00" * 40 + b"\n", b"epoch;phase\n"]
    with open(log, "ab") as f:
        f.write(b"".join(garbage))

    resumed = run_python(["main.py"] + argv + ["--save_path", str(tmp_path / "run")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"note: 3 line(s) of '{log}' could not be read as log rows" in resumed.stdout
    assert log.read_bytes().splitlines()[:3] == [r.rstrip(b"\r\n") for r in rows[:3]]
    assert [r.split(b",")[0] for r in log.read_bytes().splitlines()[1:]] == [b"1", b"2", b"3"]
    assert (tmp_path / "run" / "seed_13" / "log.csv.damaged").read_bytes() == b"".join(garbage)
    resumed = torch.load(tmp_path / "run" / "seed_13" / "checkpoint.pth.tar", weights_only=True)
    reference = torch.load(tmp_path / "reference" / "seed_13" / "checkpoint.pth.tar", weights_only=True)
    assert resumed["epoch"] == 3
    assert all(torch.equal(resumed["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"])


# --------------------------------------------------------------------------------------- the split
def test_split_missing_past_it_is_refused_and_before_it_rescored(tmp_path):
    """Killed right after the split was saved (every member at the split epoch): without the file the
    rerun scores the same weights and gets the same split. Once members trained on it, a missing
    split is refused: scores of later weights would give another one."""
    argv = ["--data", "digits", "--seed", "13", "17", "--epochs", "2", "--sam", "True", "--flat_ratio", "0.5",
            "--initial_epochs", "0", "--score_backend", "hooks", "--data_path", str(tmp_path / "ds")] + TINY
    a, b = tmp_path / "a", tmp_path / "b"
    # save_checkpoint calls: seed 13 epoch 1, seed 17 epoch 1, the split
    killed = run_python(["tests/kill_at.py", "training.trainer.save_checkpoint", "3", "--after", "main.py"] + argv +
                        ["--save_path", str(a)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(a / "sharpbalance_split.pt", weights_only=True)
    shutil.copytree(a, b)
    os.remove(b / "sharpbalance_split.pt")
    resumed = run_python(["main.py"] + argv + ["--save_path", str(b)])
    assert resumed.returncode == 0 and "scoring" in resumed.stdout, resumed.stderr[-2000:]
    again = torch.load(b / "sharpbalance_split.pt", weights_only=True)
    assert torch.equal(again["scores"], saved["scores"]) and torch.equal(again["sam_masks"], saved["sam_masks"])
    assert torch.load(b / "seed_17" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2

    os.remove(b / "sharpbalance_split.pt")
    before = files(b)
    line = error_line(run_python(["main.py"] + argv + ["--save_path", str(b)]))
    assert f"'{b}/sharpbalance_split.pt' is missing, but seed_13 (epoch 2), seed_17 (epoch 2) trained past the " \
           "split (after epoch 1)" in line and "restore the file" in line
    assert files(b) == before


def test_damaged_split_is_refused(run, tmp_path):
    flip_tensor_byte(run / "sharpbalance_split.pt")
    with pytest.raises(UserError, match=r"sharpbalance_split.pt' is damaged .*cannot be recomputed"):
        train(run, tmp_path)


# ---------------------------------------------------------------------------------- member folders
def test_deleted_member_folder_is_noticed_without_args_json(run, tmp_path, capsys):
    os.remove(run / "args.json")
    shutil.rmtree(run / "seed_17")
    with pytest.raises(UserError, match=rf"incomplete ensemble: '{run}' has no seed_17/ \(its members' checkpoints "
                                        r"record seeds 13 17\)"):
        measure(run, tmp_path)
    measure(run, tmp_path, "--allow_incomplete")
    meta = json.loads((tmp_path / "out" / "predict.json").read_text())["meta"]
    assert meta["member_seeds"] == [13] and "seed_17/" in meta["incomplete_ensemble"][0]
    # A member of another run put in its place is noticed too.
    other = tmp_path / "other"
    main_script.main([a if a != "17" else "27" for a in SB] + ["--data_path", str(tmp_path / "ds"),
                                                                 "--save_path", str(other)])
    shutil.copytree(other / "seed_27", run / "seed_27")
    with pytest.raises(UserError, match=rf"'{run}' mixes members of different runs .*seeds 13 17.*seeds 13 27"):
        measure(run, tmp_path)


# -------------------------------------------------------------------------------------- model_best
def test_a_stale_model_best_is_relinked_and_a_replaced_one_refused(tmp_path):
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


def test_model_best_of_another_member_is_refused(run, tmp_path):
    shutil.copyfile(run / "seed_17" / "model_best.pth.tar", run / "seed_13" / "model_best.pth.tar")
    before = files(run)
    expected = rf"'{run}/seed_13/model_best.pth.tar' is a file of member seed 17 .*replaced outside training"
    with pytest.raises(UserError, match=expected):
        train(run, tmp_path)
    with pytest.raises(UserError, match=expected):  # into a new folder: refused before anything is copied
        train(tmp_path / "new", tmp_path, "--resume", str(run))
    with pytest.raises(UserError, match=r"seed_13/model_best.pth.tar' holds member seed 17, not the member of its "
                                        r"folder seed_13"):
        measure(run, tmp_path)
    assert files(run) == before and not (tmp_path / "new").exists()
    # A checkpoint in another member's folder is refused too.
    with pytest.raises(UserError, match="seed_13/checkpoint.pth.tar. holds member seed 17, not the member of its folder seed_13"):
        shutil.copyfile(run / "seed_17" / "checkpoint.pth.tar", run / "seed_13" / "checkpoint.pth.tar")
        train(run, tmp_path)


# ----------------------------------------------------------------------------------- damaged bytes
def test_damaged_checkpoint_is_refused_and_the_advice_works(run, tmp_path):
    path = run / "seed_13" / "checkpoint.pth.tar"
    original = torch.load(path, weights_only=True)
    entry = flip_tensor_byte(path)
    # torch itself loads the damaged file without a word, with other numbers: the check is needed.
    assert not same(torch.load(path, weights_only=True), original)
    before = files(run)
    line = error_line(run_python(["main.py"] + SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run)]))
    assert line == (f"error: '{path}' is damaged (entry '{entry}' fails its CRC check: the bytes changed after the "
                    f"file was written); restore it from a backup, or copy '{run}/seed_13/model_best.pth.tar' over it "
                    "to resume from the best epoch, or delete it to train this member afresh")
    with pytest.raises(UserError, match="checkpoint.pth.tar' is damaged"):
        measure(run, tmp_path, "--checkpoint", "last")
    assert files(run) == before
    shutil.copyfile(run / "seed_13" / "model_best.pth.tar", path)  # the advice
    train(run, tmp_path)
    measure(run, tmp_path, "--checkpoint", "last")
    flip_tensor_byte(run / "seed_17" / "model_best.pth.tar")
    with pytest.raises(UserError, match=r"seed_17/model_best.pth.tar' is damaged .*--checkpoint last"):
        measure(run, tmp_path)
