"""The opt-in fast path (--amp, --channels_last, --compile), device sharing and bad device input.

Tolerances against fp32, on digits (ResNet18 width 4, SharpBalance's mixed step, 3 steps):
* the first step's loss is a forward pass at the same weights, so it measures the precision alone:
  bf16 within 4·2^-8 (bf16 keeps 8 significant bits; measured 8e-4), fp16 within 4·2^-10
  (11 bits; measured 2e-5), channels_last within 1e-5 (fp32, other summation order; measured
  4e-7); compile is tested together with bf16 and channels_last (its eager backend replays the
  same ops: alone it measured 0 difference), so that run gets bf16's tolerance;
* after that the runs separate: digits has a uniform background, so many ReLU inputs sit at zero and
  flip under any change of rounding (channels_last included). Single steps then differ by up to
  about 4% while the mean loss over the steps stays within 1% (measured); the test allows 3%.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main as main_script
from data import build_datasets
from data.arrays import BatchLoader
from models import create_model
from training.accel import COMPILE_BACKEND_ENV, FastPath, check_fast_path, compile_unavailable
from training.sam import SAM
from training.steps import mixed_step
from utils.distributed import collective_backend, gpus_in_use
from utils.errors import UserError

STEPS, BATCH = 3, 32
FIRST_STEP_TOLERANCE = {"bf16": 4 * 2 ** -8, "fp16": 4 * 2 ** -10, "channels_last": 1e-5,
                        "bf16+channels_last+compile": 4 * 2 ** -8}
MEAN_TOLERANCE = 0.03
OPTIONS = {"bf16": ("bf16", False, False), "fp16": ("fp16", False, False), "channels_last": ("off", True, False),
           "bf16+channels_last+compile": ("bf16", True, True)}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def digits(digits_root):
    return build_datasets("digits", digits_root)


def train_steps(splits, amp="off", channels_last=False, compile=False):
    """Per-step mean losses of STEPS SharpBalance mixed steps from the same start."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, width=4, dataset="digits")
    fast = FastPath(amp, channels_last, compile, "cpu")
    fast.prepare(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4)
    mask = np.random.RandomState(0).rand(len(splits.train)) < 0.6
    losses = []
    for images, targets, indices in BatchLoader(splits.train, BATCH, "cpu", shuffle=True, seed=1,
                                                subset=np.arange(STEPS * BATCH)):
        loss_sum, _ = mixed_step(model, optimizer, images, targets, mask[indices.numpy()], scaler=fast.scaler)
        losses.append(float(loss_sum) / len(targets))
    return np.array(losses)


@pytest.fixture(scope="module")
def fp32_losses(digits):
    return train_steps(digits)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_close_to_fp32(digits, fp32_losses, option, monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")  # inductor on this CPU: minutes per graph
    # oneDNN's channels_last convolution backward corrupts memory on AVX2 CPUs (why main.py refuses
    # the flag on a CPU); with oneDNN off the same FastPath code runs on torch's own kernels.
    with torch.backends.mkldnn.flags(enabled="channels_last" not in option):
        losses = train_steps(digits, *OPTIONS[option])
    assert np.all(np.isfinite(losses))
    assert abs(losses[0] / fp32_losses[0] - 1) <= FIRST_STEP_TOLERANCE[option]
    assert abs(losses.mean() / fp32_losses.mean() - 1) <= MEAN_TOLERANCE


# ------------------------------------------------------------------------------- fp16 loss scale

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def fp16_member(init_scale):
    model = mlp()
    fast = FastPath("fp16", device="cpu")
    fast.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    fast.prepare(model)
    return model, SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9), fast


def batch(seed, size=10):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 2, 2, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mask", [[False] * 10, [True] * 10, [True, False] * 5])
def test_fp16_overflow_skips_the_step_and_keeps_theta(mask):
    model, optimizer, fast = fp16_member(init_scale=2.0 ** 40)  # scaled gradients overflow fp16
    before = weights(model)
    images, targets = batch(1)
    mixed_step(model, optimizer, images, targets, torch.tensor(mask), scaler=fast.scaler)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # SAM's θ+e undone too
    assert not optimizer.base_optimizer.state  # no momentum taken from a skipped step
    assert fast.scaler.get_scale() == 2.0 ** 39  # backed off


def test_fp16_overflow_in_the_clean_sam_pass_alone_skips_the_step():
    """The clean pass only sets e; its overflow must still reach the scaler."""
    def run(blow_up_clean_pass):
        calls = []

        def criterion(logits, targets):
            calls.append(1)
            loss = F.cross_entropy(logits, targets)
            # Call 2 is the SAM sub-batch's clean pass (1: normal sub-batch, 3: perturbed pass).
            return loss * 1e38 if blow_up_clean_pass and len(calls) == 2 else loss
        model, optimizer, fast = fp16_member(init_scale=2.0 ** 8)
        before = weights(model)
        mask = torch.tensor([True] + [False] * 9)
        mixed_step(model, optimizer, *batch(2), mask, criterion=criterion, scaler=fast.scaler)
        changed = not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        return changed, fast.scaler.get_scale()
    assert run(False) == (True, 2.0 ** 8)
    assert run(True) == (False, 2.0 ** 7)


def test_perturbation_is_invariant_to_the_loss_scale():
    results = []
    for scale in (1.0, 2.0 ** 16):
        model = mlp()
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
        images, targets = batch(3)
        (F.cross_entropy(model(images), targets) * scale).backward()
        optimizer.first_step()
        results.append(weights(model))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fp16_resume_with_the_scaler_state_is_exact():
    def steps(model, optimizer, fast, seeds):
        for seed in seeds:
            mixed_step(model, optimizer, *batch(seed), torch.arange(10) % 3 == 0, scaler=fast.scaler)

    # 2^30 overflows for the first steps, which lower the scale: a fresh scaler would skip again.
    model, optimizer, fast = fp16_member(init_scale=2.0 ** 30)
    steps(model, optimizer, fast, range(1, 17))
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **fast.state_dict()})
    assert saved["scaler"]["scale"] < 2.0 ** 30
    steps(model, optimizer, fast, [17, 18, 19])

    for load_scaler, expect_equal in ((True, True), (False, False)):
        resumed, resumed_optimizer, resumed_fast = fp16_member(init_scale=2.0 ** 30)
        resumed.load_state_dict(saved["model"])
        resumed_optimizer.load_state_dict(saved["optimizer"])
        if load_scaler:
            resumed_fast.load_state_dict(saved)
        steps(resumed, resumed_optimizer, resumed_fast, [17, 18, 19])
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
        assert same == expect_equal


def test_member_checkpoint_carries_the_scaler(digits, tmp_path):
    from training.trainer import Member
    from utils.checkpoint import save_checkpoint
    args = main_script.get_parser().parse_args(["--data", "digits", "--width", "4", "--seed", "13", "--amp", "fp16",
                                                "--save_path", str(tmp_path), "--sam", "True"])
    main_script.check_args(args)
    member = Member(args, 0, 13, digits, torch.device("cpu"))
    member.fast.scaler = torch.amp.GradScaler("cpu", init_scale=1234.0)
    path = os.path.join(member.directory, "checkpoint.pth.tar")
    os.makedirs(member.directory)
    save_checkpoint(member.state(), path)
    again = Member(args, 0, 13, digits, torch.device("cpu"))
    assert again.fast.scaler.get_scale() == 65536.0
    assert again.resume()
    assert again.fast.scaler.get_scale() == 1234.0


# ------------------------------------------------------------------------------- compile fallback

def test_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
    if "sharpbalance_failing" not in _COMPILER_FNS:
        @register_backend(name="sharpbalance_failing")
        def failing(graph, example_inputs):
            raise RuntimeError("no compiler on this machine")
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "sharpbalance_failing")
    model, eager = mlp(), mlp()
    FastPath(compile=True).prepare(model)
    images, _ = batch(4)
    for _ in range(2):
        assert torch.equal(model(images), eager(images))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --compile: compiling failed")
    assert "no compiler on this machine" in lines[0]

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "no_such_backend")
    FastPath(compile=True).prepare(model := mlp())
    assert torch.equal(model(images), eager(images))
    assert capsys.readouterr().err.count("\n") == 1


def test_compile_preconditions(monkeypatch):
    import torch.utils._triton as triton_check
    monkeypatch.setattr(triton_check, "has_triton", lambda: False)
    assert "Triton" in compile_unavailable(torch.device("cuda"), "inductor")
    assert compile_unavailable(torch.device("cuda"), "eager") is None
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "C++ compiler" in compile_unavailable(torch.device("cpu"), "inductor")
    assert FastPath(compile=True).compile_backend is None


def test_scores_ignore_the_fast_path(digits):
    from training.scores import squared_grad_norms
    loader = BatchLoader(digits.train_eval, 64, "cpu", subset=np.arange(64))
    scores = []
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = FastPath(amp).prepare(create_model("resnet18", 10, width=4, dataset="digits"))
        scores.append(squared_grad_norms(model, loader, "cpu", num_samples=64)[:64])
        assert ("forward" in model.__dict__) == (amp == "bf16")  # restored after scoring
    assert torch.equal(scores[0], scores[1])


# ------------------------------------------------------------------------------- main.py, bad input

def digits_command(tmp_path, root, *extra):
    return ["--data", "digits", "--data_path", root, "--epochs", "1", "--seed", "13", "--width", "4",
            "--device", "cpu", "--no_progress", "--batch_size", "256", "--save_path", str(tmp_path / "run"), *extra]


def test_flags_are_recorded_and_a_resume_must_use_them(tmp_path, digits_root, digits):
    main_script.main(digits_command(tmp_path, digits_root, "--amp", "bf16"))
    recorded = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (recorded["amp"], recorded["channels_last"], recorded["compile"]) == ("bf16", False, False)
    with pytest.raises(UserError, match=r"amp: 'bf16' -> 'off'"):
        main_script.main(digits_command(tmp_path, digits_root))

    # The forward-only measure scripts take the same flags (measure_sharpness, which needs exact
    # gradients, does not); their members come out of open_run prepared.
    import measure_diversity
    import measure_sharpness
    from measure import cli
    from measure.forward import split_logits
    assert "--amp" not in measure_sharpness.get_parser().format_help()
    logits = {}
    for extra in ([], ["--amp", "bf16"]):
        args = measure_diversity.get_parser().parse_args(
            ["--dataset", "digits", "--data_path", digits_root, "--resume", str(tmp_path / "run"),
             "--device", "cpu", "--save", str(tmp_path / "measure"), *extra])
        _, members, _ = cli.open_run(args)
        model = members[0].model
        assert ("forward" in model.__dict__) == bool(extra)
        logits[bool(extra)] = split_logits([model], digits.test, 128, "cpu")
    with pytest.raises(UserError, match=r"--channels_last is a GPU option"):
        cli.open_run(measure_diversity.get_parser().parse_args(
            ["--dataset", "digits", "--data_path", digits_root, "--resume", str(tmp_path / "run"),
             "--device", "cpu", "--save", str(tmp_path / "measure"), "--channels_last"]))
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=4 * 2 ** -8 * np.abs(logits[False]).max())


@pytest.mark.parametrize("extra, patch, message", [
    (["--amp", "fp16"], None, r"--amp fp16 needs a GPU"),
    (["--compile"], "no_compile", r"--compile needs torch.compile"),
    (["--channels_last"], None, r"--channels_last is a GPU option: .* corrupts memory on AVX2 CPUs"),
    (["--compile"], None, r"--compile is a GPU option"),
    (["--device", "cuda:3"], "one_gpu", r"--device cuda:3: only 1 CUDA device\(s\) visible"),
    (["--device", "cuda", "--amp", "bf16"], "old_gpu", r"--amp bf16: .* has no bfloat16 support"),
])
def test_bad_fast_path_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, extra, patch, message):
    root = str(tmp_path / "ds")  # never read: the command stops before loading data
    monkeypatch.delenv(COMPILE_BACKEND_ENV, raising=False)  # the default backend, inductor
    if patch == "no_compile":
        monkeypatch.delattr(torch, "compile")
    if patch in ("one_gpu", "old_gpu"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(UserError, match=message):
        main_script.main(digits_command(tmp_path, root, *extra))
    assert not (tmp_path / "run").exists()


def test_channels_last_needs_convolutions():
    with pytest.raises(UserError, match="no 2-D convolutions"):
        FastPath(channels_last=True).prepare(mlp())
    args = main_script.get_parser().parse_args(["--channels_last", "--model", "wrn-40-2"])
    check_fast_path(args, torch.device("cuda"))  # a convolutional model passes (a CPU refuses the flag)


# ------------------------------------------------------------------------------- one GPU, several ranks

def test_ranks_sharing_a_gpu_use_gloo():
    # 3 ranks, 1 GPU: NCCL refuses two ranks on one GPU.
    assert collective_backend("cuda", 3, gpus_in_use("auto", 3, 1)) == "gloo"
    assert collective_backend("cuda", 3, gpus_in_use("cuda", 3, 2)) == "gloo"
    # One GPU per rank: NCCL.
    assert collective_backend("cuda", 3, gpus_in_use("cuda", 3, 4)) == "nccl"
    assert collective_backend("cuda", 1, gpus_in_use("auto", 1, 1)) == "nccl"
    # An explicit cuda:N puts every rank on that GPU.
    assert gpus_in_use("cuda:1", 3, 4) == 1 and collective_backend("cuda", 3, 1) == "gloo"
    assert collective_backend("cpu", 3, 0) == "gloo" and collective_backend("mps", 2, 0) == "gloo"


def test_ranks_map_round_robin_onto_the_gpus(monkeypatch):
    from utils.device import select_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [select_device("auto", local_rank=r).index for r in range(3)] == [0, 0, 0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [select_device("cuda", local_rank=r).index for r in range(3)] == [0, 1, 0]
    assert [select_device("cuda:1", local_rank=r).index for r in range(3)] == [1, 1, 1]
