"""No per-step host reads in training, scoring and evaluation.

On a GPU every host read of a device value waits for the queue to drain. These tests run the loops
on the CPU under ``count_host_reads`` (tests/host_reads.py) with N and 2N steps: the count must not
grow with the number of steps, and must equal the documented reads (one copy of the running sums
per epoch, one per progress-bar update, one copy of the scores per scoring pass).
"""
import numpy as np
import pytest
import torch

from data.arrays import BatchLoader, ImageArrayDataset
from measure.forward import split_logits
from models import create_model
from tests.host_reads import count_host_reads
from training.engine import evaluate, train_one_epoch
from training.sam import SAM
from training.scores import squared_grad_norms

BATCH = 8
ONE_COPY = {"_to_copy[to host]": 1}


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (8 * BATCH, 12, 12, 3)).astype(np.uint8)
    labels = rng.randint(0, 10, len(images))
    return ImageArrayDataset(images, labels, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), augment=True)


def member():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, width=4)
    return model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4)


def loader(dataset, steps, **kwargs):
    return BatchLoader(dataset, BATCH, "cpu", subset=np.arange(steps * BATCH), **kwargs)


@pytest.mark.parametrize("method", ["sgd", "sam", "mixed"])
def test_training_reads_once_per_epoch(dataset, method):
    model, optimizer = member()
    # A mask whose batches hold both kinds of samples, so the mixed step splits every batch.
    sam_mask = torch.arange(len(dataset)) % 3 != 0 if method == "mixed" else None
    counts = []
    for steps in (1, 2):
        with count_host_reads() as reads:
            stats = train_one_epoch(model, optimizer, loader(dataset, steps, shuffle=True, seed=1), 0,
                                    use_sam=method != "sgd", sam_mask=sam_mask, progress=False)
        counts.append(dict(reads.counts))
        assert np.isfinite(stats["train_loss"]) and 0 <= stats["train_acc"] <= 1
    assert counts == [ONE_COPY, ONE_COPY], counts


def test_progress_bar_reads_every_print_freq_steps(dataset):
    model, optimizer = member()
    with count_host_reads() as reads:
        train_one_epoch(model, optimizer, loader(dataset, 5, shuffle=True, seed=1), 0, use_sam=True,
                        print_freq=2, progress=True)
    # Steps 2 and 4 update the bar, the end of the epoch reads once more.
    assert dict(reads.counts) == {"_to_copy[to host]": 3}


def test_logged_means_equal_a_step_by_step_computation(dataset):
    """The device-side sums give what adding up each step's Python numbers gave before."""
    import training.engine as engine
    model, optimizer = member()
    seen = []
    real_step = engine.mixed_step

    def recording_step(*args, **kwargs):
        loss_sum, correct = real_step(*args, **kwargs)
        seen.append((float(loss_sum), int(correct), len(args[3])))
        return loss_sum, correct
    engine.mixed_step = recording_step
    try:
        stats = train_one_epoch(model, optimizer, loader(dataset, 4, shuffle=True, seed=2), 0, use_sam=True,
                                sam_mask=torch.arange(len(dataset)) % 2 == 0, progress=False)
    finally:
        engine.mixed_step = real_step
    total_loss = 0.0
    for loss_sum, _, _ in seen:
        total_loss += loss_sum
    count = sum(n for _, _, n in seen)
    assert stats["train_loss"] == total_loss / count  # float64 on the device = Python's float sum
    assert stats["train_acc"] == sum(c for _, c, _ in seen) / count
    assert stats["sam_fraction"] == 0.5


@pytest.mark.parametrize("backend", ["func", "hooks"])
def test_scoring_reads_once_per_pass(dataset, backend):
    model, _ = member()
    counts = []
    for steps in (1, 2):
        data = loader(dataset.with_options(augment=False), steps)
        with count_host_reads() as reads:
            scores = squared_grad_norms(model, data, "cpu", chunk_size=4, backend=backend,
                                        num_samples=steps * BATCH)
        counts.append(dict(reads.counts))
        assert scores.shape == (steps * BATCH,) and bool((scores > 0).all())
    # hooks: its one-time check of the first sample against a plain backward pass reads once more.
    expected = {**ONE_COPY, "_local_scalar_dense": 1} if backend == "hooks" else ONE_COPY
    assert counts == [expected, expected], counts


def test_evaluation_and_logits_read_once_per_split(dataset):
    model, _ = member()
    for steps in (1, 2):
        with count_host_reads() as reads:
            loss, accuracy = evaluate(model, loader(dataset.with_options(augment=False), steps))
        assert dict(reads.counts) == ONE_COPY and np.isfinite(loss) and 0 <= accuracy <= 1
        subset = dataset.with_options(augment=False)
        subset.images, subset.labels = subset.images[:steps * BATCH], subset.labels[:steps * BATCH]
        with count_host_reads() as reads:
            logits = split_logits([model, model], subset, BATCH, "cpu")
        assert dict(reads.counts) == ONE_COPY and logits.shape == (2, steps * BATCH, 10)
