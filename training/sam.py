"""Sharpness-Aware Minimization: the optimizer.

``SAM`` follows the small davda54/sam design: it owns a base optimizer (SGD here) built on the same
parameter groups and adds two half-steps around it. ``first_step`` climbs to θ+e with
e = rho·g/‖g‖₂ (the global L2 norm over every parameter that has a gradient); ``second_step``
returns to θ and lets the base optimizer step with the gradient that is now in ``.grad``.
The training steps built on it (plain SAM, SharpBalance's mixed step) are in ``training/steps.py``.
"""
import torch


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
