"""Atomic writes (utils/checkpoint.py): every file of a run gets the permissions of the umask (not
mkstemp's 0600), and a full disk during torch.save or the model_best copy keeps the previous
complete files, says so in one line, and the same command resumes afterwards."""
import errno
import os
import shutil

import pytest
import torch

import main as main_script
from tests.fixtures import DE, load_saved
from utils import checkpoint
from utils.errors import UserError


def test_files_follow_the_umask(finished_sb_run):
    run = finished_sb_run  # trained under umask 027
    # mkstemp creates 0600 files; every file of the run must be as readable as open() would make it.
    for path in [run / "args.json", run / "sharpbalance_split.pt"] + \
            [run / f"seed_{s}" / name for s in (13, 17) for name in ("checkpoint.pth.tar", "model_best.pth.tar", "log.csv")]:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o640), path
    old = os.umask(0o077)
    try:
        checkpoint.atomic_write(str(run.parent / "result.json"), lambda f: f.write("{}"), mode="w")
    finally:
        os.umask(old)
    assert os.stat(run.parent / "result.json").st_mode & 0o777 == 0o600
    assert not list(run.glob("**/.tmp_*")) and not (run / ".lock").exists()


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
    assert load_saved(seed_dir / "checkpoint.pth.tar")["epoch"] == 1 and not list(seed_dir.glob(".tmp_*"))

    monkeypatch.setattr(torch, "save", real_save)

    def copy_on_full_disk(source, target, *args):
        target.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "copyfileobj", copy_on_full_disk)  # the second write, model_best
    with pytest.raises(UserError, match=r"cannot write '.*model_best.pth.tar': No space left on device"):
        main_script.main(argv)
    assert (load_saved(seed_dir / "checkpoint.pth.tar")["epoch"], load_saved(seed_dir / "model_best.pth.tar")["epoch"]) == (2, 1)

    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    main_script.main(argv)
    assert load_saved(seed_dir / "model_best.pth.tar")["epoch"] == load_saved(seed_dir / "checkpoint.pth.tar")["best_epoch"] == 2
    assert not (tmp_path / "run" / ".lock").exists()
