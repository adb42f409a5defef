"""benchmarks/gpu_check.sh on a CPU: every part's code on toy sizes (--quick), so that an error in it
shows here and not on the day a GPU is lent; the projections against a hand computation."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gpu_check(monkeypatch):
    # Imported by name from benchmarks/, which stays on the path: the shared part's worker
    # processes (spawned) import it the same way.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_check
    return gpu_check


def test_every_part_runs_on_a_cpu(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "gpu_check")
    # In this process (one torch import for all parts); the shell script itself runs below.
    for part in ("smoke", "throughput", "shared"):
        assert gpu_check.main([part, "--device", "cpu", "--quick", "--out", out, "--budget", "300"]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed and "skipped" not in printed, printed

    smoke = json.load(open(os.path.join(out, "smoke.json")))
    assert all(run["error"] is None for run in smoke["runs"].values())
    assert smoke["agreement"]["sharpbalance"]["ok"] and smoke["agreement"]["sharpbalance"]["mask_entries_differing"] == 0
    assert set(smoke["measure"]) == {"measure_diversity", "measure_diversity_variance", "measure_sharpness"}
    assert all(entry["error"] is None for entry in smoke["measure"].values())
    assert all(smoke["fast_path"].values())
    assert all(error.startswith("error: --") for error in smoke["bad_input"].values())

    rows = json.load(open(os.path.join(out, "throughput.json")))["rows"]
    for label in ("fp32", "bf16+channels_last"):
        assert set(rows[label]) == set(gpu_check.PHASES) and all(r["img_per_s"] > 0 for r in rows[label].values())
    assert rows["tiny fp32"]["sgd"]["img_per_s"] > 0 and rows["bf16+channels_last+compile"]["sgd"]["img_per_s"] > 0
    shared = json.load(open(os.path.join(out, "shared.json")))["rows"]
    assert all(set(shared[label]) == set(gpu_check.SHARED_PHASES) for label in gpu_check.SHARED_LABELS)

    # The shell script: its part loop, limits and output order (projection only: the parts above ran).
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--quick", "--device", "cpu",
                           "--out", out, "--parts", "projection"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert text.index("=== projection") < text.index("whole Figure 7") < text.index("goals (one H200)")
    assert "goal < 1.0 h" in text and "goal < 24 h" in text

    # The projection's arithmetic, by hand: a deep ensemble on CIFAR-10 in fp32, members one after
    # another, and a SharpBalance run (101 SAM epochs, one scoring pass, 99 mixed epochs).
    projected = json.load(open(os.path.join(out, "projection.json")))["settings"]["fp32, members one after another"]
    rate = {phase: rows["fp32"][phase]["img_per_s"] for phase in ("sgd", "sam", "mixed", "eval", "score_func")}
    de = 3 * 200 * (45000 / rate["sgd"] + 5000 / rate["eval"]) / 3600
    sb = 3 * (101 * 45000 / rate["sam"] + 45000 / rate["score_func"] + 99 * 45000 / rate["mixed"]
              + 200 * 5000 / rate["eval"]) / 3600
    assert projected["CIFAR-10 deep_ensemble"] == pytest.approx(de, rel=1e-9)
    assert projected["CIFAR-10 sharpbalance"] == pytest.approx(sb, rel=1e-9)


def test_unknown_part_and_missing_gpu_are_one_line(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--parts", "nonsense",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert done.returncode == 2 and "unknown part 'nonsense'" in done.stderr


def test_torchrun_check_reports_and_compares(gpu_check, tmp_path, monkeypatch):
    """The torchrun branch only runs on a GPU; its reporting is checked here with a stand-in launch."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    masks = torch.tensor([[True, False, True], [False, True, True]])
    single.mkdir()
    torch.save({"sam_masks": masks}, single / "sharpbalance_split.pt")
    launched = []

    def fake_run(command, **kwargs):
        launched.append(command)
        multi.mkdir()
        torch.save({"sam_masks": masks ^ torch.tensor([[True, False, False], [False, False, False]])},
                   multi / "sharpbalance_split.pt")
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    entry, verdict = gpu_check.torchrun_one_device(["--device", "cuda"], str(multi), str(single), timeout=5)
    assert entry["ok"] and entry["mask_entries_differing_from_one_process"] == 1 and "1 entries" in verdict
    assert "--nproc_per_node=3" in launched[0] and launched[0][-2:] == ["--save_path", str(multi)]

    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "NCCL error\nboom"))
    entry, verdict = gpu_check.torchrun_one_device([], str(tmp_path / "x"), None, timeout=5)
    assert not entry["ok"] and verdict == "FAILED: boom"
