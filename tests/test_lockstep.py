"""Members in lockstep (--lockstep, training/lockstep.py) on a CPU: the same loop as on a GPU, without streams.

Lockstep only changes the order in which the members' steps are queued, so every member's numbers
must be bit for bit those of the sequential run: weights, BatchNorm statistics, optimizer state,
log rows (timings aside) and the SharpBalance split; also after a real SIGKILL and a resume.
"""
import csv
import os
import signal
import subprocess
import time

import pytest
import torch

import main as main_script
from tests.fixtures import run_python, start_python
from training.lockstep import member_streams, run_in_lockstep
from utils.errors import UserError

TINY = ["--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "256", "--data", "digits"]
METHODS = {"deep_ensemble": [], "sam": ["--sam", "True"]}  # SharpBalance: the kill test below
TIMINGS = ("epoch_seconds", "samples_per_second")


def checkpoint(run, seed):
    return torch.load(os.path.join(run, f"seed_{seed}", "checkpoint.pth.tar"), weights_only=True)


def log_rows(run, seed):
    with open(os.path.join(run, f"seed_{seed}", "log.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def assert_same_runs(a, b, seeds, split):
    for seed in seeds:
        x, y = checkpoint(a, seed), checkpoint(b, seed)
        assert x["epoch"] == y["epoch"]
        for key in x["state_dict"]:
            assert torch.equal(x["state_dict"][key], y["state_dict"][key]), (seed, key)
        for p, q in zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values()):
            assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
        assert (x["sam_mask"] is None) == (y["sam_mask"] is None)
        if x["sam_mask"] is not None:
            assert torch.equal(x["sam_mask"], y["sam_mask"])
        assert torch.equal(x["rng_cpu"], y["rng_cpu"])
        assert log_rows(a, seed) == log_rows(b, seed)
    if split:
        s, t = (torch.load(os.path.join(r, "sharpbalance_split.pt"), weights_only=True) for r in (a, b))
        assert torch.equal(s["scores"], t["scores"]) and torch.equal(s["sam_masks"], t["sam_masks"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lockstep_equals_sequential_bit_for_bit(tmp_path, method, monkeypatch):
    epochs = 2
    common = (["--data_path", str(tmp_path / "ds"), "--epochs", str(epochs), "--seed", "13", "17"] + TINY
              + METHODS[method])
    main_script.main(common + ["--save_path", str(tmp_path / "sequential")])
    # Record which member each step belongs to: lockstep alternates within every epoch.
    import training.engine
    order = []
    for name in ("sgd_step", "mixed_step"):
        real = getattr(training.engine, name)

        def recording(model, *args, real=real, **kwargs):
            order.append(id(model))
            return real(model, *args, **kwargs)
        monkeypatch.setattr(training.engine, name, recording)
    main_script.main(common + ["--save_path", str(tmp_path / "lockstep"), "--lockstep"])
    assert_same_runs(str(tmp_path / "sequential"), str(tmp_path / "lockstep"), (13, 17), split=False)
    steps_per_epoch = 6  # 1294 digits training images, batches of 256
    assert len(order) == 2 * epochs * steps_per_epoch
    assert len(set(order)) == 2 and all(order[i] != order[i + 1] for i in range(len(order) - 1))


def test_sharpbalance_in_lockstep_killed_and_resumed_equals_sequential(tmp_path):
    """SharpBalance in lockstep (warm-up, the partition of both members at the same epoch, mixed
    epochs), killed for real after the partition and resumed in lockstep, equals an uninterrupted
    sequential run: weights, optimizer state, logs and split. The members may be killed in different
    epochs; each resumes from its own checkpoint."""
    args = ["--data_path", str(tmp_path / "ds"), "--epochs", "3", "--seed", "13", "17", "--sam", "True",
            "--flat_ratio", "0.5", "--initial_epochs", "0"] + TINY
    reference = start_python(["main.py"] + args + ["--save_path", str(tmp_path / "reference")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    save = tmp_path / "killed"
    process = start_python(["main.py"] + args + ["--save_path", str(save), "--lockstep"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the first member has logged its second epoch (the first after the split).
    marker = save / "seed_13" / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if marker.is_file() and len(marker.read_text().strip().splitlines()) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint(str(save), 17)["epoch"] < 3, "the run finished before it could be killed"
    _, reference_errors = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_errors

    resumed = run_python(["main.py"] + args + ["--save_path", str(save), "--lockstep"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch" in resumed.stdout
    assert_same_runs(str(tmp_path / "reference"), str(save), (13, 17), split=True)


def test_a_member_that_diverges_stops_alone(tmp_path, monkeypatch):
    """NaN in one member's epoch: the other member completes its epochs; one line names the one that stopped."""
    import training.engine
    real_step = training.engine.sgd_step
    models = {}

    def diverging(model, *args, **kwargs):
        loss_sum, correct = real_step(model, *args, **kwargs)
        models.setdefault(id(model), len(models))
        return (loss_sum * float("nan") if models[id(model)] == 1 else loss_sum), correct
    monkeypatch.setattr(training.engine, "sgd_step", diverging)
    common = ["--data_path", str(tmp_path / "ds"), "--epochs", "2", "--seed", "13", "17",
              "--save_path", str(tmp_path / "run"), "--lockstep"] + TINY
    with pytest.raises(UserError, match=r"^member seed 17: loss became nan in epoch 1 .*no epoch of this member "
                                        r"completed, so it has no checkpoint; lower --lr or --rho$"):
        main_script.main(common)
    assert checkpoint(str(tmp_path / "run"), 13)["epoch"] == 2
    assert not os.path.isfile(tmp_path / "run" / "seed_17" / "checkpoint.pth.tar")


def test_run_in_lockstep_interleaves_and_returns_each_value():
    trace = []

    def run(name, steps, fail_at=None):
        for step in range(1, steps + 1):
            if step == fail_at:
                raise ArithmeticError(f"{name} failed")
            trace.append((name, step))
            yield
        return f"{name} done"
    results = run_in_lockstep([run("a", 3), run("b", 1), run("c", 3, fail_at=2)], catch=ArithmeticError)
    assert trace == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("a", 3)]
    assert results[0] == ("a done", None) and results[1] == ("b done", None)
    assert results[2][0] is None and str(results[2][1]) == "c failed"
    with pytest.raises(ValueError, match="2 runs but 1 streams"):
        run_in_lockstep([run("a", 1), run("b", 1)], streams=[None])

    def broken():
        raise KeyError("x")
        yield
    with pytest.raises(KeyError):  # not in catch: propagates
        run_in_lockstep([run("a", 1), broken()], catch=ArithmeticError)
    assert member_streams("cpu", 3) == [None, None, None]


def test_member_streams_wait_for_the_current_stream_and_back(monkeypatch):
    """run_in_lockstep's stream handling with torch.cuda stood in for: every member stream waits for
    the current stream before the first step, each step is queued inside its member's stream, and
    the current stream waits for every member stream at the end, also when a run fails."""
    events = []

    class FakeStream:
        def __init__(self, name):
            self.name, self.device = name, torch.device("cpu")

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    current = FakeStream("current")

    class On:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            events.append(("enter", self.stream.name))

        def __exit__(self, *exc):
            events.append(("exit", self.stream.name))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", On)

    def run(name, steps):
        for step in range(steps):
            events.append(("step", name, step))
            yield
        if name == "b":
            raise ArithmeticError("b failed")
    results = run_in_lockstep([run("a", 2), run("b", 1)], [FakeStream("sa"), FakeStream("sb")],
                              catch=ArithmeticError)
    assert results[0] == (None, None) and isinstance(results[1][1], ArithmeticError)
    assert events == [
        ("wait", "sa", "current"), ("wait", "sb", "current"),
        ("enter", "sa"), ("step", "a", 0), ("exit", "sa"), ("enter", "sb"), ("step", "b", 0), ("exit", "sb"),
        ("enter", "sa"), ("step", "a", 1), ("exit", "sa"), ("enter", "sb"), ("exit", "sb"),
        ("enter", "sa"), ("exit", "sa"),
        ("wait", "current", "sa"), ("wait", "current", "sb")]


def test_lockstep_and_graphs_do_not_belong_to_the_run(tmp_path, capsys):
    """Recorded in args.json, but a run started with them may be continued without them (and back)."""
    import json
    common = ["--data_path", str(tmp_path / "ds"), "--seed", "13", "--save_path", str(tmp_path / "run")] + TINY
    main_script.main(common + ["--epochs", "1", "--lockstep", "--cuda_graphs"])
    recorded = json.loads((tmp_path / "run" / "args.json").read_text())
    assert recorded["lockstep"] is True and recorded["cuda_graphs"] is True
    main_script.main(common + ["--epochs", "1"])  # the same run, without them: not refused
    assert checkpoint(str(tmp_path / "run"), 13)["epoch"] == 1
    assert "error" not in capsys.readouterr().err
