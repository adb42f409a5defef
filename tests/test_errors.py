"""User errors and interruptions (utils/errors.py): ``run_main`` turns an OSError or a Ctrl-C into one
line and an exit status, and each measure script's Ctrl-C line gives no training hint."""
import errno
import os
import runpy
import sys

import pytest

import measure.cli
from tests.fixtures import ROOT
from utils.errors import MEASURE_INTERRUPTED, run_main


def test_run_main_prints_one_line_and_exits_with_its_code(capsys):
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


@pytest.mark.parametrize("script", ["measure_diversity.py", "measure_diversity_variance.py", "measure_sharpness.py"])
def test_ctrl_c_in_a_measure_script_gives_no_training_hint(script, monkeypatch, capsys, tmp_path):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(measure.cli, "parse_modes", interrupt)
    monkeypatch.setattr(sys, "argv", [script, "--resume", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert info.value.code == 130 and err.startswith("interrupted:") and "\n" not in err
    assert "to resume" not in err
