"""Sharpness-Aware Minimization and the SharpBalance mixed step.

``SAM`` follows the small davda54/sam design: it owns a base optimizer (SGD here) built on the same
parameter groups and adds two half-steps around it. ``first_step`` climbs to θ+e with
e = rho·g/‖g‖₂ (the global L2 norm over every parameter that has a gradient); ``second_step``
returns to θ and lets the base optimizer step with the gradient that is now in ``.grad``.

``mixed_step`` is one SharpBalance update on a batch (README: "What SharpBalance does", step 4): the member's *normal*
samples contribute their plain gradient at θ, its *SAM* samples their gradient at θ+e, with e taken
from the SAM samples alone, each weighted by its share of the batch. Plain SGD and plain SAM are the
two edge cases of the same code (an all-False and an all-True mask).
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from utils.device import host_to_device


class SAM(torch.optim.Optimizer):
    """SAM around ``base_optimizer`` (a class, e.g. ``torch.optim.SGD``; ``**kwargs`` go to it).

    Attach learning-rate schedulers to ``optimizer.base_optimizer``: both optimizers share the same
    ``param_groups`` list, so a scheduler changing ``lr`` there is seen by both.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        if not rho >= 0.0:  # also rejects NaN
            raise ValueError(f"SAM rho must be non-negative, got {rho}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        # One shared list: rho/adaptive live next to lr/momentum in every group.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False, finite_only=False):
        """Move every parameter with a gradient from θ to θ + e and remember θ; returns ‖g‖ (a tensor).

        e depends only on the direction of g, so gradients multiplied by a loss scale (fp16) give
        the same e. ``finite_only``: where ‖g‖ is not finite (an fp16 overflow), e = 0 instead of
        NaN, decided on the device (no host read), so the passes that follow stay finite.
        """
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            # The epsilon keeps a zero gradient from producing NaN (then e = 0).
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = p.grad * scale.to(p)
                if group["adaptive"]:
                    e_w = e_w * p.pow(2)
                if finite_only:
                    e_w = torch.nan_to_num(e_w, nan=0.0, posinf=0.0, neginf=0.0)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()
        return grad_norm

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Return to θ, then take the base optimizer's step with the gradient now in ``.grad``."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self):
        """Return to θ without stepping (for measuring the perturbed loss only)."""
        for group in self.param_groups:
            for p in group["params"]:
                # pop: the copy is only valid for one perturbation, and dropping it frees memory.
                old_p = self.state[p].pop("old_p", None)
                if old_p is not None:
                    p.copy_(old_p)

    @torch.no_grad()
    def step(self, closure=None):
        """Full SAM step; ``closure`` must zero nothing and run a forward and backward pass."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    def _grad_norm(self):
        # One device for the sum, in case the model is split across devices.
        shared_device = self.param_groups[0]["params"][0].device
        norms = [
            ((p.abs() * p.grad) if group["adaptive"] else p.grad).norm(p=2).to(shared_device)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros((), device=shared_device)
        return torch.linalg.vector_norm(torch.stack(norms), ord=2)

    def state_dict(self):
        """The base optimizer's state (momentum buffers) and the shared groups (lr, rho, ...).

        SAM's own state (the saved θ) only exists between ``first_step`` and ``second_step``, so
        there is nothing else to keep for an exact resume.
        """
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        # Loading rebuilds the base optimizer's group dicts; share them again.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])


def _base(optimizer):
    """The optimizer that takes the actual step: SAM's base optimizer, or a plain optimizer itself."""
    return getattr(optimizer, "base_optimizer", optimizer)


@contextlib.contextmanager
def _frozen_batchnorm_statistics(model, enabled=True):
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


def _mean_loss(criterion, logits, targets):
    return F.cross_entropy(logits, targets) if criterion is None else criterion(logits, targets)


def _host_mask(sam_mask, batch_size):
    """The mask as a numpy bool array: it is read on the host, where reading costs no device sync."""
    if isinstance(sam_mask, torch.Tensor):
        sam_mask = sam_mask.detach().cpu().numpy()  # a device mask costs one synchronisation here
    mask = np.asarray(sam_mask, dtype=bool)
    if mask.shape != (batch_size,):
        raise ValueError(f"sam_mask must have shape ({batch_size},), got {tuple(mask.shape)}")
    return mask


def _sub_batches(images, targets, mask):
    """((normal images, targets), (SAM images, targets)) in batch order; None for an empty part.

    The rows are found on the host from the host mask and sent as one index tensor (pinned,
    non-blocking on CUDA), so nothing waits for the device: a boolean mask on the device would make
    the host wait to learn how many rows it selects. A part that is the whole batch is the batch.
    """
    sam_rows, normal_rows = np.flatnonzero(mask), np.flatnonzero(~mask)
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

    ``criterion(logits, targets)`` must return the mean loss of a sub-batch (default: cross-entropy).
    With no SAM samples the step is a plain step of ``optimizer`` (or of its base optimizer), so a
    plain ``torch.optim.SGD`` works for the all-False mask. ``loss_sum`` (0-dim float32) is the sum
    of per-sample losses at θ (divide by the batch size for the mean), ``correct`` (0-dim int64) the
    number of correct top-1 predictions at θ; both stay on the device, so the host can queue the
    next step before this one has run (read them once per epoch).

    ``scaler``: a ``torch.amp.GradScaler`` for fp16 autocast. Every backward pass is scaled; the
    perturbation uses only the direction of the SAM gradient, so scaling leaves it unchanged. An
    overflow in any pass skips the step (θ is restored first) and lowers the scale; an overflow
    in the SAM clean pass gives e = 0 and marks the gradient non-finite so the scaler sees it.
    torch's ``GradScaler.step`` reads its overflow flag on the host, once per step.
    """
    batch_size = targets.shape[0]
    mask = _host_mask(sam_mask, batch_size)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    if batch_size == 0:
        return loss_sum, correct
    num_sam = int(mask.sum())
    num_normal = batch_size - num_sam
    normal_part, sam_part = _sub_batches(images, targets, mask)

    def backward(loss):
        (loss if scaler is None else scaler.scale(loss)).backward()

    optimizer.zero_grad(set_to_none=True)
    if normal_part is not None:
        normal_images, normal_targets = normal_part
        logits = model(normal_images)
        loss = _mean_loss(criterion, logits, normal_targets)
        # Weighting by the sub-batch's share makes the two parts one mean over the whole batch.
        backward(loss * (num_normal / batch_size))
        loss_sum += loss.detach() * num_normal
        correct += (logits.detach().argmax(dim=1) == normal_targets).sum()

    if sam_part is None:
        if scaler is None:
            _base(optimizer).step()
        else:
            scaler.step(_base(optimizer))
            scaler.update()
        return loss_sum, correct

    if not isinstance(optimizer, SAM):
        raise TypeError("mixed_step with SAM samples needs a SAM optimizer")

    # Keep the normal gradient aside (no copy, just the tensors) so that the perturbation is
    # computed from the SAM sub-batch alone; it is added back before the base step.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    normal_grads = [p.grad for p in params]
    for p in params:
        p.grad = None

    sam_images, sam_targets = sam_part
    logits = model(sam_images)
    loss = _mean_loss(criterion, logits, sam_targets)
    # The scale of this loss does not matter: only the direction of its gradient is used.
    backward(loss)
    loss_sum += loss.detach() * num_sam
    correct += (logits.detach().argmax(dim=1) == sam_targets).sum()
    clean_norm = optimizer.first_step(zero_grad=True, finite_only=scaler is not None)

    # The backward pass stays inside the block: BatchNorm's backward reads the running buffers,
    # so they may only be written back once it has run.
    with _frozen_batchnorm_statistics(model, enabled=freeze_bn_on_perturbed):
        perturbed_loss = _mean_loss(criterion, model(sam_images), sam_targets)
        backward(perturbed_loss * (num_sam / batch_size))

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
    scaler.step(optimizer.base_optimizer)
    scaler.update()
    return loss_sum, correct


def sgd_step(model, optimizer, images, targets, criterion=None):
    """Plain step on the whole batch (works with SAM's base optimizer or any plain optimizer)."""
    no_sam = torch.zeros(targets.shape[0], dtype=torch.bool)
    return mixed_step(model, optimizer, images, targets, no_sam, criterion=criterion)


def sam_step(model, optimizer, images, targets, criterion=None, freeze_bn_on_perturbed=False):
    """Plain SAM step on the whole batch."""
    all_sam = torch.ones(targets.shape[0], dtype=torch.bool)
    return mixed_step(model, optimizer, images, targets, all_sam, criterion=criterion,
                      freeze_bn_on_perturbed=freeze_bn_on_perturbed)
