"""The progress bars of training and scoring are redrawn every --print-freq batches and only then
(utils/progress.py), however long a batch takes; main.py refuses a --print-freq below 1."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import tqdm.std

from data.arrays import BatchLoader, ImageArrayDataset
from training.engine import train_one_epoch
from training.scores import squared_grad_norms

BATCH, STEPS = 4, 6


@pytest.fixture
def draws(monkeypatch):
    """The bar's count at every redraw, under a clock that moves 1 s per reading: every batch
    'takes' longer than tqdm's own redraw interval, as a real training step does."""
    seen, clock = [], iter(range(10 ** 6))
    real_display = tqdm.std.tqdm.display

    def display(self, msg=None, pos=None):
        if msg is None:  # the close of a bar that is not kept draws an empty line instead
            seen.append(self.n)
        return real_display(self, msg, pos)
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    monkeypatch.setattr(tqdm.std.tqdm, "display", display)
    return seen


@pytest.fixture
def loader():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (STEPS * BATCH, 6, 6, 3)).astype(np.uint8)
    dataset = ImageArrayDataset(images, rng.randint(0, 3, len(images)), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return BatchLoader(dataset, BATCH, "cpu", shuffle=True, seed=0)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3))


@pytest.mark.parametrize("print_freq, expected", [(2, [0, 2, 4, 6]), (4, [0, 4]), (1, list(range(STEPS + 1)))])
def test_the_training_bar_is_redrawn_every_print_freq_steps(draws, loader, print_freq, expected):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, optimizer, loader, 0, use_sam=False, print_freq=print_freq, progress=True)
    assert draws == expected


def test_the_scoring_bar_is_redrawn_every_print_freq_batches(draws, loader):
    squared_grad_norms(tiny_model(), loader, "cpu", progress=True, print_freq=3)
    assert draws == [0, 3, 6]


def test_no_bar_draws_nothing(draws, loader):
    model = tiny_model()
    train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 0, use_sam=False,
                    print_freq=2, progress=False)
    assert draws == []


def test_a_print_freq_below_one_is_refused():
    import main as main_script
    from utils.errors import UserError
    args = main_script.get_parser().parse_args(["--data", "digits", "--print-freq", "0"])
    with pytest.raises(UserError, match=r"^--print-freq must be a positive integer, got 0$"):
        main_script.check_args(args)
