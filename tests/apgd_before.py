"""The APGD loop as it was before the sync-free rewrite (commit 0439fda), kept as a reference:
Python floats for the losses, ``if`` on them for the worst point and the halving rule, a return to
the worst point on halving (what ``restart="worst"`` does now), and the bisection projection with a
host read per step (``ellipsoid.project_l2_ellipsoid_bisection``)."""
import torch

from measure import ellipsoid
from measure import sharpness as sh


def _loss_err(flat, x, y, delta):
    loss, err = flat.loss_err(x, y, delta)
    return loss.item(), err.item()


def _project(v, scale, rho, norm, adaptive):
    if norm == "linf":
        bound = rho * scale
        return torch.maximum(torch.minimum(v, bound), -bound)
    if adaptive:
        return ellipsoid.project_l2_ellipsoid_bisection(v, scale, rho)
    length = v.norm().item()
    return v * (rho / length) if length > rho else v


def apgd_batch_before(flat, x, y, rho, norm="l2", adaptive=True, n_iters=20, trace=None):
    """(init_loss, init_err, worst_loss, worst_err, ‖δ_worst‖₂), as the earlier code computed them."""
    init_loss, init_err = _loss_err(flat, x, y, torch.zeros_like(flat.w0))
    scale = sh.weight_scale(flat.w0, adaptive)
    checkpoints = set(sh.apgd_checkpoints(n_iters))
    delta = torch.zeros_like(flat.w0)
    prev_delta = delta.clone()
    worst_delta = delta.clone()
    worst_loss, worst_err = init_loss, init_err
    step = prev_step = 2.0 * rho
    prev_worst_loss, prev_cp, n_updates = init_loss, 0, 0
    for i in range(n_iters):
        g = flat.grad(x, y, delta)
        ascent = g / (g.norm() + 1e-12) * scale if norm == "l2" else g.sign() * scale
        candidate = _project(delta + step * ascent, scale, rho, norm, adaptive)
        new_delta = sh.MOMENTUM * candidate + (1 - sh.MOMENTUM) * prev_delta
        prev_delta, delta = delta, new_delta
        if trace is not None:
            trace.append(delta.detach().clone())
        loss, err = _loss_err(flat, x, y, delta)
        if loss > worst_loss:
            worst_loss, worst_err, worst_delta = loss, err, delta.clone()
            n_updates += 1
        if i in checkpoints:
            too_few = n_updates < sh.MIN_UPDATE_RATIO * (i - prev_cp)
            stalled = prev_step == step and prev_worst_loss == worst_loss
            prev_step, prev_worst_loss, prev_cp, n_updates = step, worst_loss, i, 0
            if too_few or stalled:
                step *= sh.STEP_SCALER
                delta, prev_delta = worst_delta.clone(), worst_delta.clone()
    flat.restore()
    return init_loss, init_err, worst_loss, worst_err, worst_delta.norm().item()
