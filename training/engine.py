"""One epoch of training and one evaluation pass (DeiT-style engine).

``train_one_epoch`` runs whichever update the member's phase calls for on every batch: plain SGD
(deep ensemble, ``sgd_step``), SAM on every sample (warm-up, or DE + SAM) or SharpBalance's mixed
step with the member's ``sam_mask`` (both ``mixed_step``, with an all-True or the member's mask).

Nothing in the loops reads a device value on the host per step: the loss sum and the number of
correct predictions are added up on the device and read once at the end of the epoch (and every
``print_freq`` steps when a progress bar is shown), so the host keeps queueing steps while the
GPU works. The masks are looked up on the host, where they live. The finite check rides on the
same reads: cross-entropy is never negative, so the running float64 sum is NaN or infinite
exactly when some step's loss was; a non-finite loss is then placed between two reads.

``train_epoch_steps`` is the epoch as a generator that yields after every step, so that members in
lockstep (training/lockstep.py) can take turns step by step; ``train_one_epoch`` runs it through.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from training.steps import mixed_step, sgd_step
from utils.device import float64_on
from utils.progress import progress_bar


class NonFiniteLoss(RuntimeError):
    """A training loss was NaN or infinite; says in which epoch and between which steps (1-based)."""

    def __init__(self, epoch, first_step, last_step, value):
        # Reported 1-based, as the logs and the progress bar count epochs.
        where = f"step {last_step}" if first_step == last_step else f"one of steps {first_step}-{last_step}"
        super().__init__(f"loss became {value} in epoch {epoch + 1} ({where})")
        self.epoch, self.first_step, self.last_step, self.value = epoch, first_step, last_step, value


def _accumulator(model, dtype=torch.float64):
    """A zero on the model's device, to add the per-step sums to."""
    device = next(model.parameters()).device
    # float32 on MPS (no float64 there): sums of per-batch sums are exact enough for a logged mean.
    return torch.zeros((), dtype=float64_on(device) if dtype == torch.float64 else dtype, device=device)


def _read(total_loss, total_correct):
    """(loss sum, correct) as Python numbers: one device-to-host copy (the only host read)."""
    loss, correct = torch.stack([total_loss, total_correct.to(total_loss.dtype)]).to("cpu", copy=True).tolist()
    return loss, int(correct)


def train_one_epoch(model, optimizer, loader, epoch, use_sam, sam_mask=None, freeze_bn_on_perturbed=False,
                    print_freq=50, desc="train", progress=True, scaler=None, graphs=None):
    """Train ``model`` for one epoch; returns a dict of true means and timings.

    ``use_sam`` False = plain SGD; True with ``sam_mask`` None = SAM on every sample; True with a
    bool ``sam_mask`` over the training split (on the CPU, True = SAM sample) = SharpBalance.
    ``scaler``: a GradScaler for fp16 (see ``training.steps``). ``graphs``: a
    ``training.graphs.StepGraphs`` of this model and optimizer, whose steps then replace the eager
    ones (same arithmetic; not with a scaler). The progress bar is redrawn every ``print_freq``
    steps. Raises ``NonFiniteLoss`` at the first read (progress update or end of epoch) after a
    non-finite loss.
    """
    return run_to_end(train_epoch_steps(model, optimizer, loader, epoch, use_sam, sam_mask, freeze_bn_on_perturbed,
                                        print_freq, desc, progress, scaler, graphs))


def run_to_end(steps):
    """Run a generator of steps (``train_epoch_steps``, ``Member.training``) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def train_epoch_steps(model, optimizer, loader, epoch, use_sam, sam_mask=None, freeze_bn_on_perturbed=False,
                      print_freq=50, desc="train", progress=True, scaler=None, graphs=None):
    """``train_one_epoch`` as a generator: yields after every step, returns the epoch's dict.

    Whoever drives it decides what happens between two steps: nothing (``train_one_epoch``), or the
    steps of other members (training/lockstep.py).
    """
    if graphs is not None and scaler is not None:
        raise ValueError("graph-captured steps take no GradScaler (it reads the host every step)")
    model.train()
    loader.set_epoch(epoch)
    host_mask = None if sam_mask is None else np.asarray(torch.as_tensor(sam_mask, dtype=torch.bool).cpu())
    total_loss, total_correct = _accumulator(model), _accumulator(model, torch.long)
    total_seen, total_sam, checked_steps = 0, 0, 0
    start = time.perf_counter()
    bar = progress_bar(loader, desc, every=print_freq, enabled=progress)

    def read_and_check(step):
        nonlocal checked_steps
        loss, correct = _read(total_loss, total_correct)
        if not np.isfinite(loss):
            raise NonFiniteLoss(epoch, checked_steps + 1, step, loss)
        checked_steps = step
        return loss, correct

    step = 0
    for step, (images, targets, indices) in enumerate(bar, start=1):
        if use_sam:
            batch_mask = np.ones(len(indices), dtype=bool) if host_mask is None else host_mask[indices.numpy()]
            if graphs is not None:
                loss_sum, correct = graphs.mixed_step(images, targets, batch_mask)
            else:
                loss_sum, correct = mixed_step(model, optimizer, images, targets, batch_mask,
                                               freeze_bn_on_perturbed=freeze_bn_on_perturbed, scaler=scaler)
            total_sam += int(batch_mask.sum())
        elif graphs is not None:
            loss_sum, correct = graphs.sgd_step(images, targets)
        else:
            loss_sum, correct = sgd_step(model, optimizer, images, targets, scaler=scaler)
        # Right after the step, on the same stream: a graph's outputs are only valid until the
        # next replay.
        total_loss += loss_sum
        total_correct += correct
        total_seen += len(indices)
        if progress and step % max(print_freq, 1) == 0:
            loss, correct = read_and_check(step)
            # Drawn by the bar itself right after this step (progress_bar: every print_freq steps).
            bar.set_postfix(loss=f"{loss / total_seen:.3f}", acc=f"{correct / total_seen:.3f}", refresh=False)
        yield step
    total_loss, total_correct = read_and_check(step)
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "train_acc": total_correct / max(total_seen, 1),
        "sam_fraction": total_sam / max(total_seen, 1),
        "epoch_seconds": seconds,
        "samples_per_second": total_seen / seconds if seconds > 0 else float("inf"),
    }


@torch.no_grad()
def evaluate(model, loader):
    """(mean cross-entropy, accuracy) over the loader; the loss is a true per-sample mean.

    The sums stay on the device and are read once, after the last batch.
    """
    was_training = model.training
    model.eval()
    total_loss, total_correct = _accumulator(model), _accumulator(model, torch.long)
    total_seen = 0
    for batch in loader:
        images, targets = batch[0], batch[1]
        logits = model(images)
        total_loss += F.cross_entropy(logits, targets, reduction="sum")
        total_correct += (logits.argmax(1) == targets).sum()
        total_seen += len(targets)
    model.train(was_training)
    loss, correct = _read(total_loss, total_correct)
    return loss / max(total_seen, 1), correct / max(total_seen, 1)
