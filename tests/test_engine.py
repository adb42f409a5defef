"""The training and evaluation loops (training/engine.py): no per-step host reads, and the logged
means equal a step-by-step computation.

On a GPU every host read of a device value waits for the queue to drain. These tests run the loops
on the CPU under ``count_host_reads`` (tests/host_reads.py) with N and 2N steps: the count must not
grow with the number of steps, and must equal the documented reads (one copy of the running sums
per epoch or evaluation, one per progress-bar update). The scoring pass and the logits of the
measure scripts are counted in tests/test_scores.py and tests/test_forward.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.arrays import BatchLoader
from tests.fixtures import random_image_dataset, resnet_sam_member as member
from tests.host_reads import count_host_reads
from training.engine import evaluate, train_one_epoch

BATCH = 8
ONE_COPY = {"_to_copy[to host]": 1}


@pytest.fixture(scope="module")
def dataset():
    return random_image_dataset(8 * BATCH)


def loader(dataset, steps, **kwargs):
    return BatchLoader(dataset, BATCH, "cpu", subset=np.arange(steps * BATCH), **kwargs)


@pytest.mark.parametrize("method", ["sgd", "sam", "mixed"])
def test_training_reads_the_host_once_per_epoch(dataset, method):
    model, optimizer = member()
    # A mask whose batches hold both kinds of samples, so the mixed step splits every batch.
    sam_mask = torch.arange(len(dataset)) % 3 != 0 if method == "mixed" else None
    counts = []
    for steps in (1, 2):
        with count_host_reads() as reads:
            train_one_epoch(model, optimizer, loader(dataset, steps, shuffle=True, seed=1), 0,
                            use_sam=method != "sgd", sam_mask=sam_mask, progress=False)
        counts.append(dict(reads.counts))
    assert counts == [ONE_COPY, ONE_COPY], counts


def test_the_progress_bar_reads_the_host_every_print_freq_steps(dataset):
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


def test_evaluation_reads_the_host_once_and_gives_the_direct_mean(dataset):
    model, _ = member()
    data = dataset.with_options(augment=False)
    for steps in (1, 2):
        with count_host_reads() as reads:
            loss, accuracy = evaluate(model, loader(data, steps))
        assert dict(reads.counts) == ONE_COPY
        # The same model on the same images, standardised by hand, in one plain forward pass in eval mode.
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))
        images = (torch.from_numpy(data.images[:steps * BATCH]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        labels = torch.from_numpy(data.labels[:steps * BATCH])
        model.eval()
        with torch.no_grad():
            logits = model(images)
        model.train()
        assert loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
        assert accuracy == float((logits.argmax(1) == labels).double().mean())
