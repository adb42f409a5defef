"""Graph-captured steps (training/graphs.py) on a CPU: what runs there without a GPU.

``StepGraphs`` on a CPU "captures" by keeping the step function and "replays" by running it on the
static input buffers (``run_on_static``). So the eager step is the reference here: replays must give
bit for bit its weights, momentum buffers, BatchNorm statistics and sums, which checks the static-
buffer copy (normal rows first, then SAM rows) and the slices each graph reads. The bookkeeping
(keys, first step eager, second captured, bound, recapture on a new lr) is checked with capture
functions that record what they are given; the fallback with one that raises. Whether a real CUDA
graph replays the eager step's arithmetic is checked on a GPU by benchmarks/gpu_check.py.
"""
import numpy as np
import pytest
import torch

import main as main_script
from data.arrays import BatchLoader
from models import create_model
from tests.fixtures import random_image_dataset
from tests.host_reads import count_host_reads
from training.accel import FastPath, check_fast_path
from training.engine import train_one_epoch
from training.graphs import StepGraphs, run_on_static
from training.sam import SAM
from training.steps import mixed_step, sgd_step
from utils.errors import UserError

BATCH = 8


@pytest.fixture(scope="module")
def dataset():
    return random_image_dataset(6 * BATCH + 5)  # a last batch of 5


def member(sam=True, momentum=0.9, amp="off"):
    torch.manual_seed(0)
    model = FastPath(amp).prepare(create_model("resnet18", 10, width=4))
    if sam:
        return model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=momentum,
                          weight_decay=5e-4)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=5e-4)


def momenta(optimizer):
    base = getattr(optimizer, "base_optimizer", optimizer)
    return [base.state[p]["momentum_buffer"] for group in base.param_groups for p in group["params"]]


def assert_same_member(a, b):
    (model_a, optimizer_a), (model_b, optimizer_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:  # BatchNorm's running statistics included
        assert torch.equal(state_a[key], state_b[key]), key
    for p, q in zip(momenta(optimizer_a), momenta(optimizer_b)):
        assert torch.equal(p, q)


def mask_for(method, n):
    if method == "mixed":
        return torch.as_tensor(np.random.RandomState(3).rand(n) < 0.7)
    return None


@pytest.mark.parametrize("method", ["sgd", "sam", "mixed", "mixed_frozen_bn", "mixed_bf16"])
def test_replayed_steps_equal_the_eager_steps_bit_for_bit(dataset, method):
    """Three epochs, the lr lowered after each (every graph is then captured again), a last partial batch."""
    kind = method.replace("_frozen_bn", "").replace("_bf16", "")
    runs, graphs = [], None
    for with_graphs in (False, True):
        model, optimizer = member(sam=kind != "sgd", amp="bf16" if method.endswith("bf16") else "off")
        scheduler = torch.optim.lr_scheduler.StepLR(getattr(optimizer, "base_optimizer", optimizer), 1, gamma=0.5)
        freeze = method == "mixed_frozen_bn"
        if with_graphs:
            graphs = StepGraphs(model, optimizer, "cpu", freeze_bn_on_perturbed=freeze)
        epochs = []
        for epoch in range(3):
            epochs.append(train_one_epoch(model, optimizer, BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=1),
                                          epoch, use_sam=kind != "sgd", sam_mask=mask_for(kind, len(dataset)),
                                          freeze_bn_on_perturbed=freeze, progress=False,
                                          graphs=graphs if with_graphs else None))
            scheduler.step()
        runs.append(((model, optimizer), epochs))
    (eager, eager_epochs), (replayed, replayed_epochs) = runs
    assert_same_member(eager, replayed)
    for a, b in zip(eager_epochs, replayed_epochs):
        assert [a[k] for k in ("train_loss", "train_acc", "sam_fraction")] == \
            [b[k] for k in ("train_loss", "train_acc", "sam_fraction")]
    steps = 3 * 7
    assert sum(graphs.counts[k] for k in ("eager", "replayed")) == steps
    # Every key's first step ran eagerly; after each lr change each key is captured again on its next use.
    assert graphs.counts["replayed"] > steps // 2 and graphs.counts["captured"] >= 2 * len(graphs.graphs)


def test_each_key_runs_eagerly_first_then_is_captured_then_replayed(dataset):
    model, optimizer = member()
    captured = []

    def recording(function, pool):
        captured.append(len(captured))
        return function
    graphs = StepGraphs(model, optimizer, "cpu", capture=recording)
    reference = member()
    images, targets, _ = next(iter(BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=2)))
    masks = [np.arange(BATCH) < 3, np.arange(BATCH) < 3, np.arange(BATCH) < 3,  # 3 SAM samples: ("mixed", 5, 3)
             np.ones(BATCH, bool), np.ones(BATCH, bool),                         # plain SAM: ("mixed", 0, 8)
             np.zeros(BATCH, bool), np.zeros(BATCH, bool),                       # no SAM sample: ("sgd", 8, 0)
             np.arange(BATCH) % 2 == 0]                                          # 4 SAM samples: ("mixed", 4, 4)
    expected_counts = []
    for mask in masks:
        got = graphs.mixed_step(images, targets, mask)
        want = mixed_step(*reference, images, targets, mask)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        expected_counts.append(dict(graphs.counts))
    assert_same_member((model, optimizer), reference)
    assert sorted(graphs.graphs) == [("mixed", 0, 8), ("mixed", 5, 3), ("sgd", 8, 0)]
    assert [c["eager"] for c in expected_counts] == [1, 1, 1, 2, 2, 3, 3, 4]
    assert [c["captured"] for c in expected_counts] == [0, 1, 1, 1, 2, 2, 3, 3]
    assert [c["replayed"] for c in expected_counts] == [0, 1, 2, 2, 3, 3, 4, 4]
    assert captured == [0, 1, 2]
    # A replay of ("mixed", 5, 3) fills the static buffer with the normal rows 3..7, then the SAM rows 0..2.
    graphs.mixed_step(images, targets, masks[0])
    static_images, static_targets = graphs.inputs[BATCH]
    assert torch.equal(static_images, images[torch.tensor([3, 4, 5, 6, 7, 0, 1, 2])])
    assert torch.equal(static_targets, targets[torch.tensor([3, 4, 5, 6, 7, 0, 1, 2])])


def test_sgd_steps_of_a_plain_optimizer_replay_bit_for_bit(dataset):
    model, optimizer = member(sam=False)
    graphs = StepGraphs(model, optimizer, "cpu")
    reference = member(sam=False)
    for images, targets, _ in BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=4):
        for _ in range(2):  # each batch twice: the full batches reach their replays
            got = graphs.sgd_step(images, targets)
            want = sgd_step(*reference, images, targets)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_same_member((model, optimizer), reference)
    assert sorted(graphs.graphs) == [("sgd", 5, 0), ("sgd", 8, 0)]
    assert graphs.counts == {"eager": 2, "captured": 2, "replayed": 12}


def test_the_bound_on_the_number_of_graphs_is_said_once(dataset, capsys):
    model, optimizer = member()
    graphs = StepGraphs(model, optimizer, "cpu", limit=1)
    reference = member()
    images, targets, _ = next(iter(BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=2)))
    for mask in [np.arange(BATCH) < 3] * 2 + [np.arange(BATCH) < 5] * 3 + [np.arange(BATCH) < 6] * 2:
        got = graphs.mixed_step(images, targets, mask)
        want = mixed_step(*reference, images, targets, mask)
        assert torch.equal(got[0], want[0])
    assert_same_member((model, optimizer), reference)
    assert list(graphs.graphs) == [("mixed", 5, 3)]
    assert graphs.counts == {"eager": 6, "captured": 1, "replayed": 1}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --cuda_graphs: 1 step graphs exist (the bound)")


def test_a_graph_is_never_replayed_with_other_hyperparameters(dataset):
    """The CPU replay reads lr when it runs; a CUDA graph holds the lr it was captured with. This
    capture fails the test if a graph is replayed after any hyperparameter changed."""
    model, optimizer = member()

    def settings():
        return [(g["lr"], g["momentum"], g["weight_decay"], g["rho"]) for g in optimizer.param_groups]

    def baking(function, pool):
        baked = settings()

        def replay():
            assert settings() == baked, "replayed with another lr than captured"
            return function()
        return replay
    graphs = StepGraphs(model, optimizer, "cpu", capture=baking)
    images, targets, _ = next(iter(BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=2)))
    mask = np.arange(BATCH) < 3
    for lr in (0.05, 0.05, 0.05, 0.005, 0.005, 0.0005):
        for group in optimizer.param_groups:
            group["lr"] = lr
        graphs.mixed_step(images, targets, mask)
    # 0.05: eager, captured, replayed; 0.005: captured at once (the key is warm), replayed; 0.0005: captured.
    assert graphs.counts == {"eager": 1, "captured": 3, "replayed": 5}


def test_failed_capture_is_one_line_and_eager_steps_from_the_same_state(dataset, capsys):
    model, optimizer = member()

    def failing(function, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
    graphs = StepGraphs(model, optimizer, "cpu", capture=failing)
    reference = member()
    loader = BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=1)
    mask = mask_for("mixed", len(dataset))
    for epoch in range(2):
        got = train_one_epoch(model, optimizer, loader, epoch, True, sam_mask=mask, progress=False, graphs=graphs)
        want = train_one_epoch(*reference, loader, epoch, True, sam_mask=mask, progress=False)
        assert got["train_loss"] == want["train_loss"]
    assert_same_member((model, optimizer), reference)
    assert not graphs.enabled and not graphs.graphs and graphs.counts["replayed"] == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("warning: --cuda_graphs: capturing a mixed step")
    assert "RuntimeError: CUDA error: operation not permitted when stream is capturing" in lines[0]
    assert lines[0].endswith("every step of this member runs eagerly from here")


def test_optimizer_state_must_exist_before_a_capture():
    model, optimizer = member()
    graphs = StepGraphs(model, optimizer, "cpu")
    assert not graphs._state_ready()  # SGD creates its momentum buffers in its first step
    images, targets = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    mixed_step(model, optimizer, images, targets, np.ones(4, bool))
    assert graphs._state_ready()
    model, optimizer = member(momentum=0.0)
    assert StepGraphs(model, optimizer, "cpu")._state_ready()  # no momentum: nothing to create


@pytest.mark.parametrize("method", ["sgd", "mixed"])
def test_replayed_steps_read_nothing_on_the_host(dataset, method):
    counts = []
    for steps in (3, 6):
        model, optimizer = member(sam=method != "sgd")
        graphs = StepGraphs(model, optimizer, "cpu")
        # The same batch over and over, so that the later steps are replays.
        loader = BatchLoader(dataset, BATCH, "cpu", subset=np.tile(np.arange(BATCH), steps))
        mask = torch.arange(len(dataset)) % 3 == 0 if method == "mixed" else None
        with count_host_reads() as reads:
            train_one_epoch(model, optimizer, loader, 0, use_sam=method != "sgd", sam_mask=mask, progress=False,
                            graphs=graphs)
        assert graphs.counts == {"eager": 1, "captured": 1, "replayed": steps - 1}
        counts.append(dict(reads.counts))
    assert counts == [{"_to_copy[to host]": 1}] * 2, counts


def test_cuda_graphs_on_a_cpu_is_one_line_and_eager_steps(tmp_path, capsys):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "1", "--seed", "13", "--width", "4",
              "--device", "cpu", "--no_progress", "--batch_size", "256", "--sam", "True"]
    main_script.main(common + ["--save_path", str(tmp_path / "eager")])
    capsys.readouterr()
    main_script.main(common + ["--save_path", str(tmp_path / "graphs"), "--cuda_graphs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --cuda_graphs needs a CUDA GPU and this run is on cpu: every step runs eagerly"]
    a = torch.load(tmp_path / "eager" / "seed_13" / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "graphs" / "seed_13" / "checkpoint.pth.tar", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.parametrize("extra, message", [
    (["--amp", "fp16"], "--cuda_graphs with --amp fp16: the fp16 loss scale is read on the host every step"),
    (["--compile"], "--cuda_graphs with --compile"),
])
def test_graph_flag_combinations_are_refused_with_one_line(extra, message):
    args = main_script.get_parser().parse_args(["--cuda_graphs"] + extra)
    # A CUDA device as main.py would pass it: the checks look only at its type here.
    with pytest.raises(UserError, match=message):
        check_fast_path(args, torch.device("cuda"))


def test_cpu_stand_in_runs_the_function_it_is_given():
    calls = []
    replay = run_on_static(lambda: calls.append(1) or len(calls), None)
    assert calls == [] and replay() == 1 and replay() == 2


class FakeStream:
    def __init__(self, name):
        self.name = name
        self.device = torch.device("cpu")


def test_cuda_capture_picks_its_stream_and_restores_the_callers(monkeypatch):
    """cuda_capture's own logic with torch.cuda stood in for: on the default stream torch.cuda.graph
    picks its side stream (stream=None), on a member's stream that stream is captured on, a replay
    returns what the recorded function returned, and a failed capture leaves the caller's stream current."""
    import training.graphs as graphs_module
    default, member_stream = FakeStream("default"), FakeStream("member")
    state = {"current": default, "set": [], "graphs": []}

    class FakeGraph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    class FakeGraphContext:
        def __init__(self, graph, pool=None, stream=None):
            state["graphs"].append((graph, pool, stream))

        def __enter__(self):
            self.previous = state["current"]
            state["current"] = FakeStream("capture")  # torch.cuda.graph makes its capture stream current

        def __exit__(self, kind, value, traceback):
            if kind is None:
                state["current"] = self.previous
            # on an error ending the capture fails and the capture stream stays current (torch 2.14)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeGraphContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: default)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: state.update(current=stream))

    outputs = (torch.zeros(()), torch.ones(()))
    replay = graphs_module.cuda_capture(lambda: outputs, "pool")
    graph, pool, stream = state["graphs"][-1]
    assert pool == "pool" and stream is None and graph.replays == 0
    assert replay() is outputs and graph.replays == 1

    state["current"] = member_stream
    graphs_module.cuda_capture(lambda: outputs, "pool")
    assert state["graphs"][-1][2] is member_stream

    def fails():
        raise RuntimeError("operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="not permitted"):
        graphs_module.cuda_capture(fails, "pool")
    assert state["current"] is member_stream
