"""One Ctrl-C stops scripts/figure7.sh: a real SIGINT to the script's process group (what a terminal
sends) during training, with JOBS=1 and JOBS=2. The running steps stop cleanly (their Python prints
its own "interrupted" line), no further step starts, no report is written, no process is left, the
completed checkpoints stay, and the script says how to resume and ends by SIGINT."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fixtures import make_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def processes_mentioning(text):
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if text in line and "ps -eo" not in line]


def wait_for(paths, proc, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        if all(os.path.isfile(p) for p in paths):
            return
        assert proc.poll() is None, "figure7.sh ended before training started"
        time.sleep(0.2)
    raise AssertionError(f"training did not start: {paths}")


@pytest.mark.parametrize("jobs", [1, 2])
def test_one_ctrl_c_stops_figure7(tmp_path, jobs):
    data, out = str(tmp_path / "data"), str(tmp_path / "fig7")
    make_cifar(data, "cifar10", n_train=100, n_test=20)
    methods = ("deep_ensemble", "sam")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", OUT=out,
               DATASETS="cifar10", METHODS=" ".join(methods), DATA_PATH=data, SEED_SETS="13", EPOCHS="200",
               WIDTH="2", BATCH_SIZE="32", DEVICE="cpu", JOBS=str(jobs))
    stdout, stderr = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    # SIGINT as a terminal leaves it: a test worker process (pytest-xdist) may ignore it, and a shell
    # started with SIGINT ignored can never trap it, so the script would not see the Ctrl-C at all.
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "figure7.sh")], cwd=ROOT, env=env,
                            stdout=stdout, stderr=stderr, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        running = methods[:jobs]  # JOBS=2 trains both ensembles at once
        wait_for([os.path.join(out, "runs", "cifar10", m, "seeds_13", "seed_13", "checkpoint.pth.tar")
                  for m in running], proc)
        os.killpg(proc.pid, signal.SIGINT)  # one Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stdout.seek(0), stderr.seek(0)
    log, err = stdout.read(), stderr.read()
    assert proc.returncode == -signal.SIGINT, (proc.returncode, log[-2000:], err[-2000:])
    assert "rerun the same command" in err and "interrupted" in err, err
    assert not processes_mentioning(out), processes_mentioning(out)  # nothing left running
    assert not os.path.exists(os.path.join(out, "report"))
    logs = sorted(os.listdir(os.path.join(out, "logs")))
    started = [f"train_cifar10_{m}_seeds_13" for m in running]
    assert logs == sorted([f"{name}.log" for name in started] + [f"{name}.rc" for name in started]), logs
    for name in started:
        # The step's Python got the SIGINT itself and said so (KeyboardInterrupt, not a kill).
        assert open(os.path.join(out, "logs", f"{name}.log")).read().rstrip().splitlines()[-1].startswith(
            "interrupted"), name
        assert open(os.path.join(out, "logs", f"{name}.rc")).read().strip() == "130"
    for method in running:
        state = torch.load(os.path.join(out, "runs", "cifar10", method, "seeds_13", "seed_13", "checkpoint.pth.tar"),
                           weights_only=True)
        assert 1 <= state["epoch"] < 200
