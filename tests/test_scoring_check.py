"""The scoring backend is settled before the first epoch, and the partition never stops on it.

``scores.check_score_backend`` scores one chunk as the partition will; the trainer runs it before
the first epoch (hooks that disagree with a plain backward pass become torch.func with one line),
and at the partition a disagreement on trained weights is one line and torch.func, not a traceback
after the warm-up. Reference scores come from one plain backward pass per sample.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import main as main_script
import training.scores
from models import create_model
from tests.test_scores import WeightUsedOutsideForward, loader_over, reference_scores, with_running_statistics
from training.scores import FP32_RTOL, TF32_RTOL, check_score_backend, squared_grad_norms, tf32_in_effect


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(8)
    return torch.randn(9, 3, 8, 8), torch.randint(0, 5, (9,))


def resnet(images):
    torch.manual_seed(1)
    return with_running_statistics(create_model("resnet18", 5, width=4), images)


def test_check_chooses_the_backend_and_says_why(batch):
    images, targets = batch
    model = resnet(images)
    for backend, expected in (("hooks", "hooks"), ("auto", "hooks"), ("func", "func")):
        chosen = check_score_backend(model, loader_over(images, targets), "cpu", backend, chunk_size=4)
        assert chosen == (expected, None)
    wrong = WeightUsedOutsideForward()  # hooks would be wrong: only the check on data can tell
    for backend in ("hooks", "auto"):
        chosen, reason = check_score_backend(wrong, loader_over(images, targets), "cpu", backend)
        assert chosen == "func" and reason.startswith("the hooks backend cannot score this model (checked on the "
                                                      "first chunk): hooks gave ")
    # BatchNorm on batch statistics in eval mode: hooks refused without data; asked for, one reason.
    coupled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                            nn.Flatten(), nn.Linear(144, 5))
    chosen, reason = check_score_backend(coupled, loader_over(images, targets), "cpu", "hooks")
    assert chosen == "func" and "batch statistics" in reason
    assert check_score_backend(coupled, loader_over(images, targets), "cpu", "auto") == ("func", None)


def test_a_fallback_line_replaces_the_error(batch):
    images, targets = batch
    model = WeightUsedOutsideForward()
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks", fallback=lines.append)
    torch.testing.assert_close(scores, reference_scores(model, images, targets).float(), rtol=1e-4, atol=0)
    assert len(lines) == 1 and "hooks gave" in lines[0] and lines[0].endswith("; scoring with torch.func")
    with pytest.raises(RuntimeError, match="hooks backend"):  # without a fallback, as before
        squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")


def test_tolerance_follows_tf32(batch, monkeypatch):
    """A disagreement of 5e-3 (what TF32 rounding can give) fails the fp32 tolerance, passes TF32's."""
    images, targets = batch
    model = resnet(images)
    assert FP32_RTOL < 5e-3 < TF32_RTOL and not tf32_in_effect(torch.device("cpu"))
    real_loop = training.scores._loop_squared_norms
    monkeypatch.setattr(training.scores, "_loop_squared_norms", lambda *a: real_loop(*a) * (1 + 5e-3))
    chosen, reason = check_score_backend(model, loader_over(images, targets), "cpu", "hooks")
    assert chosen == "func" and "(relative tolerance 0.001)" in reason
    monkeypatch.setattr(training.scores, "tf32_in_effect", lambda device: True)
    assert check_score_backend(model, loader_over(images, targets), "cpu", "hooks") == ("hooks", None)


def test_channels_last_weights_are_scored_on_a_contiguous_copy(batch):
    images, targets = batch
    model = resnet(images)
    expected = squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks")
    # The layout alone (no channels_last convolution runs: the copy is contiguous).
    model.to(memory_format=torch.channels_last)
    weight = model.conv1.weight
    assert not weight.is_contiguous()
    assert torch.equal(squared_grad_norms(model, loader_over(images, targets), "cpu", backend="hooks"), expected)
    assert model.conv1.weight is weight and not weight.is_contiguous()  # the model itself is left as it was


def sharpbalance(tmp_path, name):
    return ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "2", "--seed", "13", "17",
            "--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "256", "--sam", "True",
            "--flat_ratio", "0.5", "--initial_epochs", "0", "--save_path", str(tmp_path / name)]


def test_hooks_disagreeing_at_the_partition_is_one_line_per_member(tmp_path, monkeypatch, capsys):
    """The check passes before the first epoch and fails on the trained members at the partition
    (as TF32 on trained weights did): each member is scored with torch.func after one line."""
    import training.trainer
    real_loop, calls = training.scores._loop_squared_norms, []

    def disagreeing_after_the_first_check(*args):
        calls.append(1)
        return real_loop(*args) * (1.0 if len(calls) == 1 else 1 + 1.2e-3)
    monkeypatch.setattr(training.scores, "_loop_squared_norms", disagreeing_after_the_first_check)
    real_scores, pairs = training.trainer.squared_grad_norms, []

    def scored_and_by_func(model, loader, device, **kwargs):
        scores = real_scores(model, loader, device, **kwargs)
        by_func = real_scores(model, loader, device, chunk_size=kwargs["chunk_size"],
                              num_samples=kwargs["num_samples"], backend="func")
        pairs.append((scores, by_func))
        return scores
    monkeypatch.setattr(training.trainer, "squared_grad_norms", scored_and_by_func)
    main_script.main(sharpbalance(tmp_path, "hooks") + ["--score_backend", "hooks"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 3  # the check before the first epoch, then one per member at the partition
    assert [line.split(" hooks gave")[0] for line in err] == [
        f"warning: [seed {seed}] the hooks backend cannot score this model (checked on the first chunk):"
        for seed in (13, 17)]
    assert len(pairs) == 2 and all(torch.equal(scores, by_func) for scores, by_func in pairs)
    split = torch.load(tmp_path / "hooks" / "sharpbalance_split.pt", weights_only=True)
    assert torch.equal(split["scores"], torch.stack([scores for scores, _ in pairs]))


def test_hooks_disagreeing_before_the_first_epoch_settle_on_func(tmp_path, monkeypatch, capsys):
    real_loop, calls = training.scores._loop_squared_norms, []

    def disagreeing(*args):
        calls.append(1)
        return real_loop(*args) * 1.01
    monkeypatch.setattr(training.scores, "_loop_squared_norms", disagreeing)
    main_script.main(sharpbalance(tmp_path, "run") + ["--score_backend", "hooks"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1  # the partition scored with func, the hooks were not tried again
    assert len(err) == 1 and err[0].startswith("warning: --score_backend hooks: the hooks backend cannot score this "
                                               "model (checked on the first chunk): hooks gave ")
