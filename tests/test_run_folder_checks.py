"""What the run folder's checks (utils/run_folder.py) do with damaged, missing, foreign or busy files:
each case ends in the correct result, or in one ``error:`` line and exit status 2 with nothing lost.
Real processes (main.py and the measure scripts run as a user runs them), real kills
(tests/kill_at.py), real bytes flipped inside real checkpoints."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import main as main_script
import measure_diversity
import measure_sharpness
from utils.errors import UserError

ARGS = "args.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "64"]
# A finished SharpBalance run with a split and SAM masks at the lowest cost: split at epoch 0, random subsets.
SB = ["--data", "digits", "--seed", "13", "17", "--epochs", "1", "--sam", "True", "--flat_ratio", "0.5",
      "--initial_epochs", "-1", "--train_subset", "random"] + TINY


# Runs whose numbers are compared go through fresh processes with one thread each: the test process's
# torch settings may have been changed by other tests.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run_python(args, timeout=300):
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def error_line(result):
    """The one line a refused command prints: exit status 2, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def files(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


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


@pytest.fixture(scope="module")
def sb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sb")
    main_script.main(SB + ["--data_path", str(root / "ds"), "--save_path", str(root / "run")])
    return root / "run"


@pytest.fixture
def run(sb_run, tmp_path):
    """A copy of the finished run to damage."""
    return shutil.copytree(sb_run, tmp_path / "run")


def train(run, tmp_path, *extra):
    main_script.main(SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run), *extra])


def measure(run, tmp_path, *extra):
    measure_diversity.main(["--dataset", "digits", "--data_path", str(tmp_path / "ds"), "--resume", str(run),
                            "--mode", "predict", "--corruptions", "none", "--device", "cpu",
                            "--save", str(tmp_path / "out"), *extra])


# ------------------------------------------------------------------------------ finished runs
def test_rerunning_a_finished_run_trains_nothing_and_changes_no_file(run, tmp_path, capsys):
    before = files(run)
    train(run, tmp_path)
    assert "nothing to train: every member in" in capsys.readouterr().out
    after = files(run)
    assert after.keys() == before.keys()
    assert [name for name in before if before[name] != after[name]] in ([], ["args.json"])
    # args.json is written again by every start: here only the folder's new place differs.
    old, new = (json.loads(files[ARGS]) for files in (before, after))
    assert {k: v for k, v in old.items() if old[k] != new[k]}.keys() <= {"save_path", "data_path"}


# ------------------------------------------------------------------------------ args.json
@pytest.mark.parametrize("text", [b"{\"seeds\": [13, 17", b"[13, 17]", b"\xff\xfe not text"])
def test_invalid_args_json_is_one_line_for_training_and_measuring(run, tmp_path, text):
    (run / "args.json").write_bytes(text)
    before = files(run)
    for action in (train, measure):
        with pytest.raises(UserError, match=r"args.json' (cannot be read as JSON|holds a JSON list).*delete it "
                                            r"\(every checkpoint records the run's arguments"):
            action(run, tmp_path)
    assert files(run) == before


def test_invalid_args_json_from_the_command_line(run, tmp_path):
    (run / "args.json").write_text("{")
    line = error_line(run_python(["main.py"] + SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run)]))
    assert f"'{run}/args.json' cannot be read as JSON" in line and not (run / ".lock").exists()


# ------------------------------------------------------------------------------------ log.csv
def test_damaged_log_lines_after_a_kill_are_set_aside_and_the_run_resumes(tmp_path):
    """A real SIGKILL before epoch 3's checkpoint, then a line cut short and NUL bytes, as a crash while
    appending leaves on some file systems: the rerun resumes and ends where an uninterrupted run does."""
    argv = ["--data", "digits", "--seed", "13", "--epochs", "3", "--data_path", str(tmp_path / "ds")] + TINY
    reference = subprocess.Popen([sys.executable, "main.py"] + argv + ["--save_path", str(tmp_path / "reference")],
                                 cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


# -------------------------------------------------------------------------------------- seeds
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


# --------------------------------------------------------------------------------------- lock
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


def test_lock_without_a_pid_from_the_command_line(run, tmp_path):
    (run / ".lock").write_text("{}")
    line = error_line(run_python(["main.py"] + SB + ["--data_path", str(tmp_path / "ds"), "--save_path", str(run)]))
    assert "names no pid" in line


# -------------------------------------------------------------------------------------- split
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


# ------------------------------------------------------------------------------ member folders
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


# ---------------------------------------------------------------------------------- model_best
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


# ------------------------------------------------------------------------------ damaged bytes
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


# ----------------------------------------------------------------------------- busy --resume
def test_resume_from_a_run_that_is_training_is_refused(tmp_path):
    """--resume A --save_path B while another process trains A: refused, naming that process."""
    source, target = tmp_path / "a", tmp_path / "b"
    argv = ["main.py", "--data", "digits", "--seed", "13", "--epochs", "300", "--data_path", str(tmp_path / "ds")] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    trainer = subprocess.Popen([sys.executable] + argv + ["--save_path", str(source)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


# ------------------------------------------------------------------------ finished measurements
def test_measurement_is_skipped_only_for_the_same_arguments_and_files(run, tmp_path, capsys):
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
