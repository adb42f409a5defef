"""The opt-in fast path (training/accel.py: --amp, --channels_last, --compile): each option trains
close to fp32, the fp16 loss scale resumes exactly, a failed compile falls back to eager with one
line, the flags are recorded and checked on resume, bad input is one line before any work.
(The steps under an fp16 loss scale are in tests/test_steps.py, scores of a fast-path model in
tests/test_scores.py, the scale in a member's checkpoint in tests/test_trainer.py.)

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

import numpy as np
import pytest
import torch

import main as main_script
from data.arrays import BatchLoader
from models import create_model
from tests.fixtures import batch, fp16_sam_member, mlp
from training.accel import COMPILE_BACKEND_ENV, FastPath, check_fast_path, compile_unavailable
from training.sam import SAM
from training.steps import mixed_step
from utils.errors import UserError

STEPS, BATCH = 3, 32
FIRST_STEP_TOLERANCE = {"bf16": 4 * 2 ** -8, "fp16": 4 * 2 ** -10, "channels_last": 1e-5,
                        "bf16+channels_last+compile": 4 * 2 ** -8}
MEAN_TOLERANCE = 0.03
OPTIONS = {"bf16": ("bf16", False, False), "fp16": ("fp16", False, False), "channels_last": ("off", True, False),
           "bf16+channels_last+compile": ("bf16", True, True)}


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
    assert abs(losses[0] / fp32_losses[0] - 1) <= FIRST_STEP_TOLERANCE[option]
    assert abs(losses.mean() / fp32_losses.mean() - 1) <= MEAN_TOLERANCE


# ------------------------------------------------------------------------------- fp16 loss scale

def test_fp16_resume_with_the_scaler_state_is_exact():
    def steps(model, optimizer, fast, seeds):
        for seed in seeds:
            mixed_step(model, optimizer, *batch(seed=seed), torch.arange(10) % 3 == 0, scaler=fast.scaler)

    # 2^30 overflows for the first steps, which lower the scale: a fresh scaler would skip again.
    model, optimizer, fast = fp16_sam_member(init_scale=2.0 ** 30)
    steps(model, optimizer, fast, range(1, 17))
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **fast.state_dict()})
    assert saved["scaler"]["scale"] < 2.0 ** 30
    steps(model, optimizer, fast, [17, 18, 19])

    for load_scaler, expect_equal in ((True, True), (False, False)):
        resumed, resumed_optimizer, resumed_fast = fp16_sam_member(init_scale=2.0 ** 30)
        resumed.load_state_dict(saved["model"])
        resumed_optimizer.load_state_dict(saved["optimizer"])
        if load_scaler:
            resumed_fast.load_state_dict(saved)
        steps(resumed, resumed_optimizer, resumed_fast, [17, 18, 19])
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
        assert same == expect_equal


# ------------------------------------------------------------------------------- compile fallback

def test_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
    if "sharpbalance_failing" not in _COMPILER_FNS:
        @register_backend(name="sharpbalance_failing")
        def failing(graph, example_inputs):
            raise RuntimeError("no compiler on this machine")
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "sharpbalance_failing")
    model, eager = mlp(hidden=16), mlp(hidden=16)
    FastPath(compile=True).prepare(model)
    images, _ = batch(seed=4)
    for _ in range(2):
        assert torch.equal(model(images), eager(images))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --compile: compiling failed")
    assert "no compiler on this machine" in lines[0]

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "no_such_backend")
    FastPath(compile=True).prepare(model := mlp(hidden=16))
    assert torch.equal(model(images), eager(images))
    assert capsys.readouterr().err.count("\n") == 1


def test_compile_is_unavailable_without_triton_on_a_gpu_or_a_compiler_on_a_cpu(monkeypatch):
    import torch.utils._triton as triton_check
    monkeypatch.setattr(triton_check, "has_triton", lambda: False)
    assert "Triton" in compile_unavailable(torch.device("cuda"), "inductor")
    assert compile_unavailable(torch.device("cuda"), "eager") is None
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "C++ compiler" in compile_unavailable(torch.device("cpu"), "inductor")
    assert FastPath(compile=True).compile_backend is None


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
        FastPath(channels_last=True).prepare(mlp(hidden=16))
    args = main_script.get_parser().parse_args(["--channels_last", "--model", "wrn-40-2"])
    check_fast_path(args, torch.device("cuda"))  # a convolutional model passes (a CPU refuses the flag)
