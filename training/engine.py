"""One epoch of training and one evaluation pass (DeiT-style engine).

``train_one_epoch`` runs whichever update the member's phase calls for on every batch: plain SGD
(deep ensemble), SAM on every sample (warm-up, or DE + SAM), or SharpBalance's mixed step with the
member's ``sam_mask``. All three are one function, ``mixed_step``, with a different mask.
"""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.sam import mixed_step


class NonFiniteLoss(RuntimeError):
    """Raised when a training loss is NaN or infinite; carries where it happened."""

    def __init__(self, epoch, step, value):
        # Reported 1-based, as the logs and the progress bar count epochs.
        super().__init__(f"loss became {value} at epoch {epoch + 1} step {step}")
        self.epoch, self.step, self.value = epoch, step, value


def train_one_epoch(model, optimizer, loader, epoch, use_sam, sam_mask=None, freeze_bn_on_perturbed=False,
                    print_freq=50, desc="train", progress=True):
    """Train ``model`` for one epoch; returns a dict of true means and timings.

    ``use_sam`` False = plain SGD; True with ``sam_mask`` None = SAM on every sample; True with a
    bool ``sam_mask`` over the training split (CPU tensor, True = SAM sample) = SharpBalance.
    """
    model.train()
    loader.set_epoch(epoch)
    total_loss, total_correct, total_seen, total_sam = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, targets, indices) in enumerate(bar):
        if not use_sam:
            batch_mask = torch.zeros(len(indices), dtype=torch.bool)
        elif sam_mask is None:
            batch_mask = torch.ones(len(indices), dtype=torch.bool)
        else:
            batch_mask = sam_mask[indices]
        loss_sum, correct = mixed_step(model, optimizer, images, targets, batch_mask,
                                       freeze_bn_on_perturbed=freeze_bn_on_perturbed)
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(epoch, step, loss_sum)
        total_loss += loss_sum
        total_correct += correct
        total_seen += len(indices)
        total_sam += int(batch_mask.sum())
        if progress and (step % max(print_freq, 1) == 0):
            bar.set_postfix(loss=f"{total_loss / total_seen:.3f}", acc=f"{total_correct / total_seen:.3f}")
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
    """(mean cross-entropy, accuracy) over the loader; the loss is a true per-sample mean."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total_seen = 0.0, 0, 0
    for batch in loader:
        images, targets = batch[0], batch[1]
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        total_correct += int((logits.argmax(1) == targets).sum())
        total_seen += len(targets)
    model.train(was_training)
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1)
