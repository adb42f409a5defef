"""benchmarks/gpu_check.sh on a CPU: every part's code on toy sizes (--quick), so that an error in it
shows here and not on the day a GPU is lent; the arithmetic (epoch estimates, expected sizes and
graph events, projections, the bare step, FLOPs) against hand computations and brute force, and the
graph bookkeeping against training/graphs.py's own."""
import copy
import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def gpu_check(monkeypatch):
    # Imported by name from benchmarks/, which stays on the path: the shared part's worker
    # processes (spawned) import it the same way.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_check
    return gpu_check


@pytest.fixture
def restore_torch_flags(monkeypatch):
    """The parts set process-wide flags (cuDNN settings, TF32, oneDNN): put them back."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, algorithms, warn_only,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled) = saved
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


def test_every_part_runs_on_a_cpu(gpu_check, tmp_path, capsys, restore_torch_flags):
    out = str(tmp_path / "gpu_check")
    # In this process (one torch import for all parts); the shell script itself runs below.
    # shared before graphs: the lockstep row prints the three-member figures of reference and shared.
    for part in ("smoke", "throughput", "cudnn", "compile", "reference", "shared", "graphs"):
        assert gpu_check.main([part, "--device", "cpu", "--quick", "--out", out, "--budget", "300"]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed and "skipped" not in printed, printed
    # The lockstep row's aggregate is printed next to the bare step on three streams and three processes.
    lockstep_lines = [line for line in printed.splitlines() if "3 members in lockstep, aggregate" in line]
    assert len(lockstep_lines) == 3 and all("bare step on 3 streams" in line and "3 processes (bf16+channels_last)"
                                            in line for line in lockstep_lines[:2]), lockstep_lines
    assert sorted(os.listdir(out)) == ["summary.json", "work"]
    parts = read_json(os.path.join(out, "summary.json"))["parts"]

    smoke = parts["smoke"]
    assert all(run["error"] is None for run in smoke["runs"].values())
    assert smoke["agreement"]["sharpbalance"]["ok"] and smoke["agreement"]["sharpbalance"]["mask_entries_differing"] == 0
    assert set(smoke["measure"]) == {"measure_diversity", "measure_diversity_variance", "measure_sharpness"}
    assert all(entry["error"] is None for entry in smoke["measure"].values())
    # A CPU run is deterministic: killed + resumed equals straight, bit for bit, with no warning.
    repeat = smoke["repeatability"]["deterministic"]
    assert repeat["identical"] and repeat["max_abs_difference"] == 0 and repeat["nondeterministic_op_warnings"] == 0
    assert "split's scores" in repeat["compared"]
    assert all(smoke["fast_path"].values())
    assert all(error.startswith("error: --") for error in smoke["bad_input"].values())
    # --lockstep on a CPU is bit for bit the eager run: same split, losses 0 apart.
    lockstep = smoke["graphs"]["--lockstep"]
    assert lockstep["ok"] and lockstep["mask_entries_differing"] == 0 and lockstep["capture_failures"] == []
    assert lockstep["final_loss_max_rel_diff"] == 0.0 and lockstep["eager_loss_max_rel_diff"] == 0.0
    assert smoke["hooks"]["ok"] and smoke["hooks"]["flags"] == ["--amp", "bf16", "--score_backend", "hooks"]
    # One repeat: per kind (SGD, SAM, mixed) an eager step and a capture; after the milestone the
    # mixed key is captured again and replayed: 3 eager, 4 captured, 5 replayed (a capture replays).
    # The CPU stand-in replays the recorded step on the static buffers: bit for bit the eager steps.
    for label in ("fp32", "--amp bf16"):
        equal = smoke["graph_equality"][label]
        assert equal["counts"] == {"eager": 3, "captured": 4, "replayed": 5} and equal["steps"] == 8
        assert equal["identical"] and equal["max_abs_difference"] == 0.0

    rows = {**parts["throughput"]["rows"], **parts["cudnn"]["rows"], **parts["compile"]["rows"],
            **parts["graphs"]["rows"]}
    assert set(rows) == {row.label for row in gpu_check.PROJECT_ROWS}
    for row in gpu_check.PROJECT_ROWS:
        assert set(row.phases) <= set(rows[row.label]), row.label
        for phase in row.phases:
            assert rows[row.label][phase]["img_per_s"] > 0
    fp32 = rows["fp32"]
    # The default row's mixed step ran a whole epoch; the others stopped after max_cold_steps.
    assert not fp32["mixed"]["extrapolated"] and fp32["mixed"]["steps_run"] == fp32["mixed"]["steps"] == 8
    assert fp32["sgd"]["extrapolated"] and fp32["sgd"]["steps_run"] == 5
    # A first pass shorter than min_warm_steps (6) is run twice in the second pass.
    assert fp32["sgd"]["warm_steps"] == 10 and fp32["sgd"]["steps_compared"] == 5 and fp32["mixed"]["warm_steps"] == 8
    assert all(parts["throughput"]["tiny"][kind]["img_per_s"] > 0 for kind in ("faithful", "fast"))
    # Graph rows: the events simulated from the keys are the ones StepGraphs counted, and the second
    # pass replays only. SGD, one member: its one key runs eagerly, is captured and replayed in the
    # first pass (5 steps), then replayed 10 times; three members in lockstep: each the same.
    for label, members in (("bf16+channels_last+graphs", 1), ("bf16+channels_last+graphs+lockstep", 3)):
        for phase in ("sgd", "sam", "mixed"):
            graphs = rows[label][phase]["graphs"]
            assert graphs["events_seen"] == graphs["events_expected"] and graphs["second_pass_not_replayed"] == 0
            assert graphs["failed"] == 0 and rows[label][phase]["members"] == members
        assert rows[label]["sgd"]["graphs"]["counts"] == {"eager": members, "captured": members,
                                                          "replayed": 14 * members}
        assert rows[label]["sgd"]["steps_run"] == 5 and rows[label]["sgd"]["warm_steps"] == 10
        assert rows[label]["sgd"]["new_sizes"] == 2 * members  # over the epoch: eager, then captured
    reference = parts["reference"]["rows"]
    assert {label for label, *_ in gpu_check.REFERENCE_ROWS} == set(reference)
    assert all(entry["how"].startswith("eager") for phases in reference.values() for entry in phases.values())
    shared = parts["shared"]["rows"]
    assert all(set(shared[label]) == set(gpu_check.SHARED_PHASES) for label in gpu_check.SHARED_LABELS)

    # The shell script: its part loop, limits, log and output order (projection only: the parts above ran).
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--quick", "--device", "cpu",
                           "--out", out, "--parts", "projection"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        limit = int(re.search(r"\[projection\]=(\d+)", f.read()).group(1))
    assert f"=== projection (limit {2 * limit}s) ===" in text  # --quick doubles the limits
    assert text.index("=== projection") < text.index("whole Figure 7") < text.index("--cudnn settings") \
        < text.index("project / reference") < text.index("three members on one GPU") < text.index("goals (one H200")
    assert "fast path SAM / bare CUDA-graph reference, 3 members (bf16+channels_last+graphs+lockstep)" in text
    assert "issue" not in text and "goal <= 60, measured" in text and "goal <= 12, measured" in text
    with open(os.path.join(out, "gpu_check.log")) as f:
        assert f.read() == text
    summary = read_json(os.path.join(out, "summary.json"))
    assert set(summary["parts"]) == {"smoke", "throughput", "cudnn", "compile", "reference", "shared", "graphs",
                                     "projection"}

    # The projection's arithmetic, by hand: a deep ensemble and a SharpBalance run on CIFAR-10 with
    # the defaults, members one after another (SharpBalance: 101 SAM epochs, one scoring pass, 99
    # mixed epochs), and cuDNN's per-size work once per run: 2 sizes (128 and 45,000 mod 128 = 72),
    # plus the mixed step's expected sub-batch sizes for SharpBalance.
    projected = summary["parts"]["projection"]["settings"]
    rate = {phase: fp32[phase]["img_per_s"] for phase in ("sgd", "sam", "mixed", "eval", "score_func")}
    per_size = sum(fp32[p]["extra_s"] for p in ("sgd", "sam", "mixed")) / sum(
        fp32[p]["new_sizes_compared"] for p in ("sgd", "sam", "mixed"))
    mixed_sizes = gpu_check.expected_distinct_sizes(128, 0.8, 45000, 99, known=(128, 72))
    de = (3 * 200 * (45000 / rate["sgd"] + 5000 / rate["eval"]) + 2 * per_size) / 3600
    sb = (3 * (101 * 45000 / rate["sam"] + 45000 / rate["score_func"] + 99 * 45000 / rate["mixed"]
               + 200 * 5000 / rate["eval"]) + mixed_sizes * per_size) / 3600
    assert projected["fp32, members one after another"]["CIFAR-10 deep_ensemble"] == pytest.approx(de, rel=1e-9)
    assert projected["fp32, members one after another"]["CIFAR-10 sharpbalance"] == pytest.approx(sb, rel=1e-9)
    # A --cudnn row times the training steps only; scoring and evaluation are the default row's.
    torch_row = rows["fp32 cudnn=torch"]
    per_size = sum(torch_row[p]["extra_s"] for p in ("sgd", "sam", "mixed")) / sum(
        torch_row[p]["new_sizes_compared"] for p in ("sgd", "sam", "mixed"))
    sam = (3 * 200 * (45000 / torch_row["sam"]["img_per_s"] + 5000 / rate["eval"]) + 2 * per_size) / 3600
    assert projected["fp32 cudnn=torch, members one after another"]["CIFAR-10 sam"] == pytest.approx(sam, rel=1e-9)
    assert any(name.startswith("bf16+channels_last, 3 members sharing") for name in projected)
    # Graph rows pay per graph event, per member. A deep ensemble has two keys (batches of 128 and
    # 72): eager, captured, and captured again after each of the two lr drops: 4 events each, 8 per
    # member, 24 per run.
    graph_row, lockstep_row = rows["bf16+channels_last+graphs"], rows["bf16+channels_last+graphs+lockstep"]
    lender = rows["bf16+channels_last"]
    for row in (graph_row, lockstep_row):
        row["per_event"] = sum(row[p]["extra_s"] for p in ("sgd", "sam", "mixed")) / sum(
            row[p]["new_sizes_compared"] for p in ("sgd", "sam", "mixed"))
    de = (3 * 200 * (45000 / graph_row["sgd"]["img_per_s"] + 5000 / lender["eval"]["img_per_s"])
          + 24 * graph_row["per_event"]) / 3600
    assert projected["bf16+channels_last+graphs, members one after another"]["CIFAR-10 deep_ensemble"] == \
        pytest.approx(de, rel=1e-9)
    # Three members in lockstep: each trains at a third of the aggregate; scoring and evaluation
    # (the lender's, one member's rate) one member after another.
    events = gpu_check.expected_graph_events(128, 45000, [(101, 1.0), (99, 0.8)], (100, 150))
    share = {p: lockstep_row[p]["img_per_s"] / 3 for p in ("sam", "mixed")}
    sb = (101 * 45000 / share["sam"] + 45000 / (lender["score_func"]["img_per_s"] / 3)
          + 99 * 45000 / share["mixed"] + 200 * 5000 / (lender["eval"]["img_per_s"] / 3)
          + 3 * events * lockstep_row["per_event"]) / 3600
    assert projected["bf16+channels_last+graphs+lockstep, 3 members in lockstep"]["CIFAR-10 sharpbalance"] == \
        pytest.approx(sb, rel=1e-9)
    # A graph row whose captures failed ran eager steps: its settings and comparisons say so.
    summary["parts"]["graphs"]["rows"]["bf16+channels_last+graphs"]["mixed"]["graphs"]["failed"] = 1
    names = [setting["name"] for setting in gpu_check.projection_settings(summary)]
    assert "bf16+channels_last+graphs, members one after another (a capture FAILED: eager steps)" in names
    assert "bf16+channels_last+graphs+lockstep, 3 members in lockstep" in names
    assert any(pair["name"].startswith("bf16+channels_last+graphs (a capture FAILED: eager steps) / ")
               for pair in gpu_check.comparisons(summary))


def test_epoch_estimate_by_hand(gpu_check):
    # Six steps of 10 images, the last of 4; steps 0 and 3 meet new sizes (2 and 1 of them).
    images, new = [10, 10, 10, 10, 10, 4], [2, 0, 0, 1, 0, 0]
    # Whole first pass; the second pass repeats the first three steps at 0.1 s each.
    got = gpu_check.epoch_estimate([1.1, 0.1, 0.1, 0.6, 0.1, 0.05], [0.1, 0.1, 0.1], images, new)
    assert got["img_per_s"] == pytest.approx(30 / 0.3)
    assert got["warm_epoch_s"] == pytest.approx(54 / 100)
    assert got["first_epoch_s"] == pytest.approx(2.05) and not got["extrapolated"]
    assert got["new_size_s"] == pytest.approx(1.0 / 2)  # (1.1 - 0.1) s over step 0's two sizes
    # Cut after four steps, all four compared: per size (1.0 + 0.5) / 3; the two steps left (14 images)
    # at 100 img/s and no new size among them.
    got = gpu_check.epoch_estimate([1.1, 0.1, 0.1, 0.6], [0.1, 0.1, 0.1, 0.1], images, new)
    assert got["new_size_s"] == pytest.approx(0.5) and got["extrapolated"] and got["steps_run"] == 4
    assert got["first_epoch_s"] == pytest.approx(1.9 + 14 / 100)
    # Cut after two steps: step 3's size is left, paid at the per-size cost of step 0.
    got = gpu_check.epoch_estimate([1.1, 0.1], [0.1, 0.1], images, new)
    assert got["first_epoch_s"] == pytest.approx(1.2 + 34 / 100 + 0.5)
    # Cut after two steps and repeated in the second pass (warm_images: its four steps' images):
    # the rate comes from all four, the per-size cost from the two compared.
    got = gpu_check.epoch_estimate([1.1, 0.1], [0.1, 0.1, 0.05, 0.05], images, new, [10, 10, 10, 10])
    assert got["img_per_s"] == pytest.approx(40 / 0.3) and got["steps_compared"] == 2 and got["warm_steps"] == 4
    assert got["first_epoch_s"] == pytest.approx(1.2 + 34 / (40 / 0.3) + 0.5)
    # A warm step slower than its cold one (noise) costs nothing; no new size compared: unknown.
    assert gpu_check.epoch_estimate([0.1, 0.2], [0.15, 0.1], [10, 10], [1, 0])["new_size_s"] == 0.0
    assert gpu_check.epoch_estimate([0.1, 0.2], [0.15], [10, 10], [0, 1])["new_size_s"] is None


def brute_force_distinct_sizes(batch, fraction, n_images, epochs, known):
    """Every combination of SAM counts over every step, with its probability."""
    full, last = divmod(n_images, batch)
    steps = [batch] * (full * epochs) + [last] * (epochs if last else 0)
    expected = 0.0
    for counts in itertools.product(*[range(b + 1) for b in steps]):
        probability, sizes = 1.0, set(known)
        for b, s in zip(steps, counts):
            probability *= math.comb(b, s) * fraction ** s * (1 - fraction) ** (b - s)
            sizes |= {x for x in (s, b - s) if x}
        expected += probability * len(sizes)
    return expected


@pytest.mark.parametrize("batch, fraction, n_images, epochs, known", [
    (4, 0.5, 8, 1, ()), (4, 0.8, 10, 2, ()), (5, 0.3, 12, 1, (5, 2)), (3, 0.9, 7, 2, (3,))])
def test_expected_distinct_sizes_against_brute_force(gpu_check, batch, fraction, n_images, epochs, known):
    assert gpu_check.expected_distinct_sizes(batch, fraction, n_images, epochs, known) == pytest.approx(
        brute_force_distinct_sizes(batch, fraction, n_images, epochs, known), rel=1e-12)


def brute_force_graph_events(batch, n_images, phases, milestones):
    """Every combination of SAM counts over every step of the run, with its probability, each played
    through training/graphs.py's rule: a key's first step runs eagerly, a step of a key without a
    graph is captured, an lr drop (at the start of a milestone epoch) drops every graph."""
    full, last = divmod(n_images, batch)
    steps, epoch = [], 0
    for epochs, fraction in phases:
        for _ in range(epochs):
            steps += [(epoch, batch, fraction)] * full + ([(epoch, last, fraction)] if last else [])
            epoch += 1
    expected = 0.0
    for counts in itertools.product(*[range(size + 1) for _, size, _ in steps]):
        probability = math.prod(math.comb(size, s) * fraction ** s * (1 - fraction) ** (size - s)
                                for (_, size, fraction), s in zip(steps, counts))
        warmed, graphs, events, current = set(), set(), 0, 0
        for (epoch, size, _), s in zip(steps, counts):
            if epoch != current:
                current = epoch
                if epoch in milestones:
                    graphs.clear()
            if (size, s) not in warmed:
                warmed.add((size, s))
                events += 1
            elif (size, s) not in graphs:
                graphs.add((size, s))
                events += 1
        expected += probability * events
    return expected


@pytest.mark.parametrize("batch, n_images, phases, milestones", [
    (3, 4, [(1, 1.0), (2, 0.6)], (1, 2)),  # SAM, then mixed; one lr period per epoch
    (2, 5, [(2, 0.5)], (1,)),              # mixed throughout, a drop between the epochs
    (3, 6, [(1, 0.0), (2, 0.7)], (2,)),    # SGD, then mixed; the drop inside the mixed phase
    (4, 4, [(3, 0.3)], ()),                # no partial batch, no drop
])
def test_expected_graph_events_against_brute_force(gpu_check, batch, n_images, phases, milestones):
    assert gpu_check.expected_graph_events(batch, n_images, phases, milestones) == pytest.approx(
        brute_force_graph_events(batch, n_images, phases, milestones), rel=1e-12)


def test_expected_graph_events_of_the_projected_runs_by_hand(gpu_check):
    # Deep ensemble and SAM: one key per batch size (128 and 45,000 mod 128 = 72), each eager once,
    # captured once and again after each of the two lr drops.
    for method in ("deep_ensemble", "sam"):
        assert gpu_check.expected_graph_events(128, 45000, gpu_check.method_phases(method, 0.8),
                                               gpu_check.LR_MILESTONES) == pytest.approx(8.0, abs=1e-9)
    assert gpu_check.LR_MILESTONES == (100, 150)
    # SharpBalance: the SAM keys (101 epochs, across the first drop: 2 + 1 each), then the mixed keys.
    sharpbalance = gpu_check.expected_graph_events(128, 45000, gpu_check.method_phases("sharpbalance", 0.8),
                                                   gpu_check.LR_MILESTONES)
    assert 6 + 2 * 40 < sharpbalance < 6 + 3 * 128


@pytest.mark.parametrize("limit", [128, 2])
def test_graph_keys_and_events_follow_step_graphs(gpu_check, limit, capsys):
    """graph_key and graph_events against the keys and counts of a real StepGraphs (CPU stand-in)."""
    from models import create_model
    from training.graphs import StepGraphs
    from training.sam import SAM
    torch.manual_seed(0)
    model = create_model("resnet18", 10, width=2)
    graphs = StepGraphs(model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9), "cpu",
                        limit=limit)
    images, targets = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    # (batch size, SAM samples) per step; SAM count 0 as an SGD step first, then as a mixed step.
    plan = [(6, 0), (6, 0), (6, 4), (4, 4), (6, 4), (6, 4), (6, 6), (6, 2), (6, 6), (6, 2), (6, 0), (4, 4), (4, 4)]
    keys = [gpu_check.graph_key(n, s) for n, s in plan]
    expected = gpu_check.graph_events(graphs, keys)
    counted = []
    for step, (n, s) in enumerate(plan):
        before = graphs.counts["eager"] + graphs.counts["captured"]
        mask = np.zeros(n, dtype=bool)
        mask[np.arange(n)[::-1][:s]] = True  # the last s rows: the gather reorders them
        if step == 0:
            graphs.sgd_step(images[:n], targets[:n])
        else:
            graphs.mixed_step(images[:n], targets[:n], mask)
        counted.append(graphs.counts["eager"] + graphs.counts["captured"] - before)
    assert graphs.warmed == set(keys)
    # By hand: a new key and a key's second step cost one each (eager, captured), a replay none.
    # Past the bound (2 graphs) a key without a graph runs eagerly at every step: StepGraphs counts
    # those steps as eager, graph_events not as one-time costs (they are paid at every step).
    by_hand = {128: [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 0], 2: [1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0]}
    assert expected == by_hand[limit]
    past_bound = {128: [], 2: [8, 9, 11, 12]}[limit]
    assert counted == [e + (i in past_bound) for i, e in enumerate(expected)]
    assert ("graphs exist (the bound)" in capsys.readouterr().err) == (limit == 2)


def test_graph_equality_finds_a_wrong_gather(gpu_check, monkeypatch, restore_torch_flags):
    """The smoke's graph check passes on the stand-in and fails when the static buffers get the batch
    in the wrong order (normal rows not first): the mixed step's sub-batches are then other samples."""
    from training.graphs import StepGraphs
    cfg = dict(gpu_check.QUICK, quick=True)
    torch.use_deterministic_algorithms(False)
    got = gpu_check.graph_equality(cfg, torch.device("cpu"), (), 1)
    assert got["identical"] and got["counts"]["replayed"] > 0
    # It ran under --cudnn deterministic and leaves the process as it found it.
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ

    def plain_copy(self, key, images, targets, mask):
        static_images, static_targets = self._static_inputs(key[1] + key[2], images, targets)
        static_images.copy_(images)
        static_targets.copy_(targets)
    monkeypatch.setattr(StepGraphs, "_fill", plain_copy)
    with pytest.raises(AssertionError, match="differ by up to .*beyond assert_close's default tolerances"):
        gpu_check.graph_equality(cfg, torch.device("cpu"), (), 1)


def test_bare_steps_are_sgd_and_sam(monkeypatch):
    """The reference's foreach steps against torch.optim.SGD and the project's SAM optimizer."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bare_step import BareMember
    from training.sam import SAM
    for kind in ("sgd", "sam"):
        bare = BareMember("cpu", width=2, batch=6, seed=3)
        model = copy.deepcopy(bare.model)
        sgd = dict(lr=bare.lr, momentum=bare.momentum, weight_decay=bare.weight_decay)
        optimizer = (torch.optim.SGD(model.parameters(), **sgd) if kind == "sgd"
                     else SAM(model.parameters(), torch.optim.SGD, rho=bare.rho, **sgd))
        for _ in range(3):
            getattr(bare, kind)()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(bare.images), bare.labels).backward()
            if kind == "sgd":
                optimizer.step()
            else:
                optimizer.first_step(zero_grad=True)
                nn.functional.cross_entropy(model(bare.images), bare.labels).backward()
                optimizer.second_step()
        for a, b in zip(bare.model.state_dict().values(), model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_flops_per_image(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from bare_step import training_flops_per_image
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, stride=2),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 10))
    macs = 8 * 8 * 4 * (3 * 3 * 3) + 4 * 4 * 2 * 4 + 10 * 32
    assert training_flops_per_image(model, (3, 8, 8)) == 3 * 2 * macs


def test_a_failing_row_is_one_line_and_the_part_goes_on(gpu_check, tmp_path, monkeypatch, capsys,
                                                        restore_torch_flags):
    """The hooks backend's self-check failing (as it did on an H200) ends its row only."""
    def self_check_fails(self, backend):
        if backend == "hooks":
            raise RuntimeError("hooks gave 1.43922e+06, a plain backward pass 1.43753e+06 for the same sample\nmore")
        return original(self, backend)
    original = gpu_check.Bench.score
    monkeypatch.setattr(gpu_check.Bench, "score", self_check_fails)
    monkeypatch.setattr(gpu_check, "PROJECT_ROWS", (
        gpu_check.Row("fp32", phases=("score_hooks", "eval")),
        gpu_check.Row("bad flag", ("--cudnn", "nonsense")),
        gpu_check.Row("fp32 again", phases=("score_func",))))
    monkeypatch.setattr(gpu_check, "TINY_ROWS", {})
    out = str(tmp_path / "out")
    assert gpu_check.main(["throughput", "--device", "cpu", "--quick", "--out", out, "--budget", "300"]) == 0
    printed = capsys.readouterr().out
    failures = [line for line in printed.splitlines() if "FAILED" in line]
    assert len(failures) == 2, printed
    assert failures[0] == ("  fp32 score_hooks: FAILED: RuntimeError: hooks gave 1.43922e+06, a plain backward pass "
                           "1.43753e+06 for the same sample")
    assert failures[1].startswith("  bad flag: FAILED: ValueError: main.py refuses --cudnn nonsense: argument "
                                  "--cudnn: invalid choice: 'nonsense'")
    rows = read_json(os.path.join(out, "summary.json"))["parts"]["throughput"]["rows"]
    assert rows["fp32"]["score_hooks"]["error"].startswith("RuntimeError: hooks gave")
    assert rows["fp32"]["eval"]["img_per_s"] > 0 and rows["fp32 again"]["score_func"]["img_per_s"] > 0
    assert rows["bad flag"]["error"].startswith("ValueError: main.py refuses --cudnn nonsense")


def test_compare_runs_finds_a_one_bit_difference(gpu_check, tmp_path):
    state = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    for run in ("a", "b"):
        (tmp_path / run / "seed_13").mkdir(parents=True)
        torch.save({"state_dict": state}, tmp_path / run / "seed_13" / "checkpoint.pth.tar")
    assert gpu_check.compare_runs(str(tmp_path / "a"), str(tmp_path / "b"))[:2] == (True, 0.0)
    changed = {"w": torch.tensor([1.0, torch.nextafter(torch.tensor(2.0), torch.tensor(3.0)).item()]),
               "n": torch.tensor(3)}
    torch.save({"state_dict": changed}, tmp_path / "b" / "seed_13" / "checkpoint.pth.tar")
    identical, worst, what = gpu_check.compare_runs(str(tmp_path / "a"), str(tmp_path / "b"))
    assert not identical and worst == pytest.approx(2 ** -22) and what == "1 members' weights and buffers"


def test_script_limits_fit_six_minutes_and_unknown_part_is_one_line(tmp_path):
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        script = f.read()
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A LIMIT=\((.*)\)", script).group(1)))
    parts = re.search(r'DEFAULT_PARTS="([^"]+)"', script).group(1).split()
    # Each part's Python process and the version line take a few seconds beyond the limits.
    assert sum(int(limits[part]) for part in parts) <= 330
    # The graphs part prints its lockstep row next to the reference and shared parts' figures.
    assert parts.index("reference") < parts.index("graphs") and parts.index("shared") < parts.index("graphs")
    assert parts[-1] == "projection" and set(parts) | {"compile"} == set(limits)
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
