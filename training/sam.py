"""Sharpness-Aware Minimization and the SharpBalance mixed step.

``SAM`` follows the small davda54/sam design: it owns a base optimizer (SGD here) built on the same
parameter groups and adds two half-steps around it. ``first_step`` climbs to θ+e with
e = rho·g/‖g‖₂ (the global L2 norm over every parameter that has a gradient); ``second_step``
returns to θ and lets the base optimizer step with the gradient that is now in ``.grad``.

``mixed_step`` is one SharpBalance update on a batch (SPEC §2.1 item 4): the member's *normal*
samples contribute their plain gradient at θ, its *SAM* samples their gradient at θ+e, with e taken
from the SAM samples alone, each weighted by its share of the batch. Plain SGD and plain SAM are the
two edge cases of the same code (an all-False and an all-True mask).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


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
    def first_step(self, zero_grad=False):
        """Move every parameter with a gradient from θ to θ + e and remember θ."""
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
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

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


def mixed_step(model, optimizer, images, targets, sam_mask, criterion=None, freeze_bn_on_perturbed=False):
    """One SharpBalance update of ``model`` on a batch; returns ``(loss_sum, correct)`` at θ.

    ``sam_mask``: bool tensor (batch,), True = the sample is trained with SAM, False = with the
    plain loss. The update direction is
        g = (|B_N|/|B|)·∇L_N(θ) + (|B_S|/|B|)·∇L_S(θ + e),   e = rho·∇L_S(θ)/‖∇L_S(θ)‖₂,
    with L the mean loss over a sub-batch, followed by one base-optimizer step (momentum and weight
    decay at θ). The two sub-batches go through the network separately in train mode, in the
    released order: normal forward/backward, SAM clean pass, perturb, perturbed pass, restore, step.
    BatchNorm running statistics are updated by every one of these passes, unless
    ``freeze_bn_on_perturbed`` keeps the perturbed pass from touching them.

    ``criterion(logits, targets)`` must return the mean loss of a sub-batch (default: cross-entropy).
    With no SAM samples the step is a plain step of ``optimizer`` (or of its base optimizer), so a
    plain ``torch.optim.SGD`` works for the all-False mask. ``loss_sum`` is the sum of per-sample
    losses at θ (divide by the batch size for the mean), ``correct`` the number of correct top-1
    predictions at θ.
    """
    batch_size = targets.shape[0]
    sam_mask = torch.as_tensor(sam_mask, dtype=torch.bool)
    if sam_mask.shape != (batch_size,):
        raise ValueError(f"sam_mask must have shape ({batch_size},), got {tuple(sam_mask.shape)}")
    if batch_size == 0:
        return 0.0, 0
    # Count before moving, so a mask built on the CPU costs no device synchronisation here.
    num_sam = int(sam_mask.sum())
    num_normal = batch_size - num_sam
    sam_mask = sam_mask.to(images.device, non_blocking=True)

    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)

    if num_normal > 0:
        normal_mask = ~sam_mask
        normal_images, normal_targets = images[normal_mask], targets[normal_mask]
        logits = model(normal_images)
        loss = _mean_loss(criterion, logits, normal_targets)
        # Weighting by the sub-batch's share makes the two parts one mean over the whole batch.
        (loss * (num_normal / batch_size)).backward()
        loss_sum += loss.detach() * num_normal
        correct += (logits.detach().argmax(dim=1) == normal_targets).sum()

    if num_sam == 0:
        _base(optimizer).step()
        return float(loss_sum), int(correct)

    if not isinstance(optimizer, SAM):
        raise TypeError("mixed_step with SAM samples needs a SAM optimizer")

    # Keep the normal gradient aside (no copy, just the tensors) so that the perturbation is
    # computed from the SAM sub-batch alone; it is added back before the base step.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    normal_grads = [p.grad for p in params]
    for p in params:
        p.grad = None

    sam_images, sam_targets = images[sam_mask], targets[sam_mask]
    logits = model(sam_images)
    loss = _mean_loss(criterion, logits, sam_targets)
    # The scale of this loss does not matter: only the direction of its gradient is used.
    loss.backward()
    loss_sum += loss.detach() * num_sam
    correct += (logits.detach().argmax(dim=1) == sam_targets).sum()
    optimizer.first_step(zero_grad=True)

    # The backward pass stays inside the block: BatchNorm's backward reads the running buffers,
    # so they may only be written back once it has run.
    with _frozen_batchnorm_statistics(model, enabled=freeze_bn_on_perturbed):
        perturbed_loss = _mean_loss(criterion, model(sam_images), sam_targets)
        (perturbed_loss * (num_sam / batch_size)).backward()

    with torch.no_grad():
        for p, normal_grad in zip(params, normal_grads):
            if normal_grad is None:
                continue
            if p.grad is None:
                p.grad = normal_grad
            else:
                p.grad.add_(normal_grad)
    optimizer.second_step(zero_grad=False)
    return float(loss_sum), int(correct)


def sgd_step(model, optimizer, images, targets, criterion=None):
    """Plain step on the whole batch (works with SAM's base optimizer or any plain optimizer)."""
    no_sam = torch.zeros(targets.shape[0], dtype=torch.bool)
    return mixed_step(model, optimizer, images, targets, no_sam, criterion=criterion)


def sam_step(model, optimizer, images, targets, criterion=None, freeze_bn_on_perturbed=False):
    """Plain SAM step on the whole batch."""
    all_sam = torch.ones(targets.shape[0], dtype=torch.bool)
    return mixed_step(model, optimizer, images, targets, all_sam, criterion=criterion,
                      freeze_bn_on_perturbed=freeze_bn_on_perturbed)
