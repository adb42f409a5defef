"""One optimisation step on a batch: plain SGD (``sgd_step``) and SharpBalance's mixed step (``mixed_step``).

``sgd_step`` is the deep ensemble's step: forward, backward, one step of the optimizer. ``mixed_step``
is SharpBalance's update (README: "What SharpBalance does", step 4): the batch is cut into the
member's *normal* samples, trained with their plain gradient at θ, and its *SAM* samples, trained
with their gradient at θ+e where e is taken from the SAM samples alone; each part is weighted by its
share of the batch. Plain SAM is the all-True mask, and a batch with no SAM samples is exactly
``sgd_step`` (the mixed step hands it over).

The pieces the mixed step is made of live here too: finding a batch's two parts on the host
(``partition_rows``) and cutting it (``sub_batches``), the device work on the two parts
(``mixed_update``: a fixed sequence of kernels for fixed part sizes, which training/graphs.py records
in CUDA graphs) and keeping BatchNorm's running statistics unchanged over a pass
(``frozen_batchnorm_statistics``). Both steps take an optional fp16 ``GradScaler``.

Both steps return ``(loss_sum, correct)`` at θ as 0-dim device tensors and read nothing back from
the device, so the host can queue the next step before this one has run.
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from training.sam import SAM
from utils.device import host_to_device


def base_optimizer(optimizer):
    """The optimizer that takes the actual step: SAM's base optimizer, or a plain optimizer itself."""
    return getattr(optimizer, "base_optimizer", optimizer)


def _mean_loss(criterion, logits, targets):
    return F.cross_entropy(logits, targets) if criterion is None else criterion(logits, targets)


def _backward(loss, scaler):
    """Backward pass of ``loss``, multiplied by the fp16 loss scale when there is a scaler."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def _step(optimizer, scaler):
    """The optimizer's step; with a scaler it is skipped (and the scale lowered) on an overflow."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def _zeros(device):
    """(loss_sum, correct) of an empty batch, as the steps return them."""
    return torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)


def sgd_step(model, optimizer, images, targets, criterion=None, scaler=None):
    """One plain step on the whole batch; returns ``(loss_sum, correct)`` at θ.

    ``optimizer`` is a plain optimizer (e.g. ``torch.optim.SGD``) or a SAM optimizer, whose base
    optimizer then takes the step. ``criterion(logits, targets)`` must return the mean loss of the
    batch (default: cross-entropy). ``loss_sum`` (0-dim float32) is the sum of the per-sample losses,
    ``correct`` (0-dim int64) the number of correct top-1 predictions; both stay on the device.
    ``scaler``: a ``torch.amp.GradScaler`` for fp16 autocast; a step whose scaled gradient
    overflowed is skipped and the scale lowered (torch's ``GradScaler.step`` reads its overflow
    flag on the host, once per step).
    """
    batch_size = targets.shape[0]
    if batch_size == 0:
        return _zeros(images.device)
    optimizer.zero_grad(set_to_none=True)
    logits = model(images)
    loss = _mean_loss(criterion, logits, targets)
    _backward(loss, scaler)
    _step(base_optimizer(optimizer), scaler)
    return (loss.detach() * batch_size).float(), (logits.detach().argmax(dim=1) == targets).sum()


@contextlib.contextmanager
def frozen_batchnorm_statistics(model, enabled=True):
    """Keep every BatchNorm running buffer unchanged inside the block.

    The forward pass still normalises with the batch's statistics (train mode); only the update of
    running_mean / running_var / num_batches_tracked is undone. Saving and restoring the buffers
    (rather than setting momentum to 0) also covers momentum=None, the cumulative average. Run the
    backward pass inside the block too: autograd saved the buffers and rejects an earlier write.
    """
    if not enabled:
        yield
        return
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            buffers = {name: getattr(module, name)
                       for name in ("running_mean", "running_var", "num_batches_tracked")
                       if getattr(module, name, None) is not None}
            saved.append((buffers, {name: buf.clone() for name, buf in buffers.items()}))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for name, buf in buffers.items():
                    buf.copy_(copies[name])


def host_mask(sam_mask, batch_size):
    """The batch's SAM mask as a numpy bool array: it is read on the host, where reading costs no
    device synchronisation (a mask given as a device tensor costs one, here)."""
    if isinstance(sam_mask, torch.Tensor):
        sam_mask = sam_mask.detach().cpu().numpy()
    mask = np.asarray(sam_mask, dtype=bool)
    if mask.shape != (batch_size,):
        raise ValueError(f"sam_mask must have shape ({batch_size},), got {tuple(mask.shape)}")
    return mask


def partition_rows(mask):
    """(normal rows, SAM rows) of a batch as numpy int64 arrays, in batch order, from the host mask."""
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def sub_batches(images, targets, mask):
    """((normal images, targets), (SAM images, targets)) in batch order; None for an empty part.

    The rows are found on the host from the host mask and sent as one index tensor (pinned,
    non-blocking on CUDA), so nothing waits for the device: a boolean mask on the device would make
    the host wait to learn how many rows it selects. A part that is the whole batch is the batch.
    """
    normal_rows, sam_rows = partition_rows(mask)
    if len(sam_rows) == 0:
        return (images, targets), None
    if len(normal_rows) == 0:
        return None, (images, targets)
    rows = host_to_device(torch.from_numpy(np.concatenate([normal_rows, sam_rows])), images.device)
    normal, sam = rows[:len(normal_rows)], rows[len(normal_rows):]
    return ((images.index_select(0, normal), targets.index_select(0, normal)),
            (images.index_select(0, sam), targets.index_select(0, sam)))


def mixed_step(model, optimizer, images, targets, sam_mask, criterion=None, freeze_bn_on_perturbed=False,
               scaler=None):
    """One SharpBalance update of ``model`` on a batch; returns ``(loss_sum, correct)`` at θ.

    ``sam_mask``: bool (batch,) on the host (tensor or array), True = the sample is trained with
    SAM, False = with the plain loss. The update direction is
        g = (|B_N|/|B|)·∇L_N(θ) + (|B_S|/|B|)·∇L_S(θ + e),   e = rho·∇L_S(θ)/‖∇L_S(θ)‖₂,
    with L the mean loss over a sub-batch, followed by one base-optimizer step (momentum and weight
    decay at θ). The two sub-batches go through the network separately in train mode, in the
    released order: normal forward/backward, SAM clean pass, perturb, perturbed pass, restore, step.
    BatchNorm running statistics are updated by every one of these passes, unless
    ``freeze_bn_on_perturbed`` keeps the perturbed pass from touching them.

    With no SAM samples this is ``sgd_step`` (so a plain optimizer works for the all-False mask);
    with SAM samples ``optimizer`` must be a ``SAM``. ``criterion``, the return values and
    ``scaler`` are as for ``sgd_step``. With a scaler every backward pass is scaled; the
    perturbation uses only the direction of the SAM gradient, so scaling leaves it unchanged. An
    overflow in any pass skips the step (θ is restored first) and lowers the scale; an overflow
    in the SAM clean pass gives e = 0 and marks the gradient non-finite so the scaler sees it.
    """
    batch_size = targets.shape[0]
    mask = host_mask(sam_mask, batch_size)
    if batch_size == 0:
        return _zeros(images.device)
    num_sam = int(mask.sum())
    if num_sam == 0:
        return sgd_step(model, optimizer, images, targets, criterion=criterion, scaler=scaler)
    if not isinstance(optimizer, SAM):
        raise TypeError("mixed_step with SAM samples needs a SAM optimizer")
    normal_part, sam_part = sub_batches(images, targets, mask)
    return mixed_update(model, optimizer, normal_part, sam_part, criterion=criterion,
                        freeze_bn_on_perturbed=freeze_bn_on_perturbed, scaler=scaler)


def mixed_update(model, optimizer, normal_part, sam_part, criterion=None, freeze_bn_on_perturbed=False, scaler=None):
    """The device work of ``mixed_step`` on a batch already cut into its two parts.

    ``normal_part`` is ``(images, targets)`` or None (plain SAM); ``sam_part`` is ``(images,
    targets)`` with at least one sample; ``optimizer`` is a ``SAM``. Everything here is a fixed
    sequence of device operations for fixed part sizes (no host reads, no data-dependent shapes),
    which is what lets training/graphs.py record it in a CUDA graph once per pair of sizes.
    """
    sam_images, sam_targets = sam_part
    num_sam = sam_targets.shape[0]
    num_normal = 0 if normal_part is None else normal_part[1].shape[0]
    batch_size = num_normal + num_sam
    loss_sum, correct = _zeros(sam_images.device)

    optimizer.zero_grad(set_to_none=True)
    if normal_part is not None:
        normal_images, normal_targets = normal_part
        logits = model(normal_images)
        loss = _mean_loss(criterion, logits, normal_targets)
        # Weighting by the sub-batch's share makes the two parts one mean over the whole batch.
        _backward(loss * (num_normal / batch_size), scaler)
        loss_sum += loss.detach() * num_normal
        correct += (logits.detach().argmax(dim=1) == normal_targets).sum()

    # Keep the normal gradient aside (no copy, just the tensors) so that the perturbation is
    # computed from the SAM sub-batch alone; it is added back before the base step.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    normal_grads = [p.grad for p in params]
    for p in params:
        p.grad = None

    logits = model(sam_images)
    loss = _mean_loss(criterion, logits, sam_targets)
    # The scale of this loss does not matter: only the direction of its gradient is used.
    _backward(loss, scaler)
    loss_sum += loss.detach() * num_sam
    correct += (logits.detach().argmax(dim=1) == sam_targets).sum()
    clean_norm = optimizer.first_step(zero_grad=True, finite_only=scaler is not None)

    # The backward pass stays inside the block: BatchNorm's backward reads the running buffers,
    # so they may only be written back once it has run.
    with frozen_batchnorm_statistics(model, enabled=freeze_bn_on_perturbed):
        perturbed_loss = _mean_loss(criterion, model(sam_images), sam_targets)
        _backward(perturbed_loss * (num_sam / batch_size), scaler)

    with torch.no_grad():
        for p, normal_grad in zip(params, normal_grads):
            if normal_grad is None:
                continue
            if p.grad is None:
                p.grad = normal_grad
            else:
                p.grad.add_(normal_grad)
    if scaler is None:
        optimizer.second_step(zero_grad=False)
        return loss_sum, correct
    optimizer.restore()
    with torch.no_grad():
        # The clean pass's gradient is gone; its overflow reaches the scaler as a NaN gradient.
        first = next((p for p in params if p.grad is not None), None)
        if first is not None:
            first.grad.masked_fill_(~torch.isfinite(clean_norm), float("nan"))
    _step(optimizer.base_optimizer, scaler)
    return loss_sum, correct
