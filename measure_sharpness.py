"""Sharpness of each member on fixed training batches: worst case (APGD), average case, Fisher.

    python measure_sharpness.py --dataset cifar10 --data_path ./datasets --model resnet18 \\
        --resume runs/sharpbalance --mode APGD_worst --save results/sharpbalance

Modes (comma-separated):
  APGD_worst    adaptive worst-case sharpness: mean over batches of max_{δ in the set} L(w+δ) − L(w),
                found by 20 APGD iterations, for every norm (l2 ellipsoid, linf box) and rho
  APGD_average  average-case sharpness: mean loss under δ = rho·|w|·N(0,1) (l2) or rho·|w|·U(−1,1)
                (linf), --avg_draws draws per batch, minus the clean loss
  fisher        mean per-sample squared gradient norm (trace of the empirical Fisher)
Released defaults: rho 0.5, adaptive, l2 and linf, 100 batches of 5 training images (no
augmentation, model in eval mode) in the order of a DataLoader shuffled after torch.manual_seed(13),
the same batches for every model; on a step halving APGD takes its next gradient at the worst point
but keeps its current delta (--apgd_restart release; worst = return to the worst point). --preset
tml: adaptive linf, rho 0.001,0.002,0.004,0.008, 8 batches of 128 (flags given explicitly still win).
Output: <save>/<mode>.json and .csv, keys <norm>_<rho>.
"""
import numpy as np

from measure import cli, ellipsoid, inputs, result_files, sharpness
from utils.args import str2bool
from utils.errors import MEASURE_INTERRUPTED, UserError, run_main

MODES = ("APGD_worst", "APGD_average", "fisher")
PRESETS = {"release": dict(rho="0.5", norm="l2,linf", batch_num=100, eval_batch_size=5),
           "tml": dict(rho="0.001,0.002,0.004,0.008", norm="linf", batch_num=8, eval_batch_size=128)}
SUMMARY_KEYS = ("sharpness", "error_increase", "max_delta_norm", "init_loss", "init_error", "saturated_fraction")


def get_parser():
    parser, group = cli.build_parser(__doc__, MODES, "APGD_worst", None,
                                           "images per sharpness batch (None = the preset's)")
    group.add_argument("--preset", default="release", choices=tuple(PRESETS),
                       help="release: SharpBalance's settings; tml: the tml-epfl sharpness paper's linf setting")
    group.add_argument("--rho", "--gamma", dest="rho", default=None,
                       help="comma list of radii (None = the preset's)")
    group.add_argument("--norm", default=None, help="comma list of l2, linf (None = the preset's)")
    group.add_argument("--adaptive", type=str2bool, default=True, metavar="{True,False}",
                       help="scale the set by |w| elementwise (zero weights stay unperturbed)")
    group.add_argument("--n_iters", type=int, default=20, help="APGD iterations per batch")
    group.add_argument("--apgd_restart", default="release", choices=sharpness.APGD_RESTARTS,
                       help="when APGD halves its step: release = the next gradient is taken at the worst "
                            "point and added to the current delta (the released code); worst = delta and "
                            "its momentum partner return to the worst point")
    group.add_argument("--avg_draws", type=int, default=100, help="random draws per batch for APGD_average")
    group.add_argument("--batch-num", "--batch_num", dest="batch_num", type=int, default=None,
                       help="number of batches (None = the preset's)")
    group.add_argument("--logit-norm", "--logit_norm", dest="logit_norm", type=str2bool, default=False,
                       metavar="{True,False}", help="centre and L2-normalise the logits before the loss")
    return parser


def resolve_settings(args):
    """Fill unset flags from the preset; parse the lists."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        rhos = [float(r) for r in str(args.rho).split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rho must be a comma list of numbers, got '{args.rho}'") from None
    norms = [n.strip() for n in str(args.norm).split(",") if n.strip()]
    if not rhos or any(r < 0 for r in rhos):
        raise UserError(f"--rho must be non-negative numbers, got '{args.rho}'")
    if not norms or any(n not in ("l2", "linf") for n in norms):
        raise UserError(f"--norm must be a comma list of l2, linf; got '{args.norm}'")
    if args.batch_num < 1 or args.eval_batch_size < 1 or args.n_iters < 1 or args.avg_draws < 1:
        raise UserError("--batch-num, --eval-batch-size, --n_iters and --avg_draws must be positive")
    return rhos, norms


def fixed_batches(args, device):
    """The seeded training batches every model is measured on, and their sample indices."""
    from data import BatchLoader
    train = next(inputs.clean_splits(args, which=("train_eval",))).dataset
    order = sharpness.release_shuffle_order(len(train), args.seed)[: args.batch_num * args.eval_batch_size]
    if len(order) < args.batch_num * args.eval_batch_size:
        print(f"note: the training split has {len(order)} images, fewer than "
              f"{args.batch_num} x {args.eval_batch_size}", flush=True)
    loader = BatchLoader(train, args.eval_batch_size, device, subset=order)
    return [(x, y) for x, y, _ in loader], order.tolist()


def measure_member(mode, model, batches, args, rhos, norms):
    if args.logit_norm:
        model = sharpness.LogitNormalization(model)
    if mode == "APGD_worst":
        return sharpness.worst_case_sharpness(model, batches, rhos, norms, args.adaptive, args.n_iters,
                                              restart=args.apgd_restart)
    if mode == "APGD_average":
        return sharpness.average_case_sharpness(model, batches, rhos, norms, args.adaptive, args.avg_draws,
                                                seed=args.seed)
    return sharpness.fisher_sharpness(model, batches)


def tidy(mode, individual):
    rows = []
    for i, result in enumerate(individual):
        if mode == "fisher":
            rows.append(dict(mode=mode, split="train", member=str(i), metric="fisher", value=result["fisher"]))
            continue
        for setting, summary in result.items():
            rows += [dict(mode=mode, split="train", member=str(i), setting=setting, metric=k, value=summary[k])
                     for k in SUMMARY_KEYS if k in summary]
    return rows


def saturation_note(mode, key, individual):
    """One line when most batches' worst-case loss reached a uniform guess's: the number is then
    saturated (it measures how far the logits blow up, not flatness)."""
    fractions = [r[key].get("saturated_fraction") for r in individual]
    if mode != "APGD_worst" or not fractions or None in fractions or max(fractions) < 0.5:
        return
    chance = individual[0][key]["uniform_loss"]
    print(f"note: {key} is saturated: on {100 * max(fractions):.0f}% of a member's batches the worst-case loss "
          f"reached ln C = {chance:.3f}, the loss of a uniform guess, so the perturbation destroys the model and "
          "the number says how large the logits grow, not how flat the minimum is; compare models at a smaller "
          "--rho (e.g. 0.05)", flush=True)


def main(argv=None):
    args = get_parser().parse_args(argv)
    modes = cli.parse_modes(args.mode, MODES)
    rhos, norms = resolve_settings(args)
    modes, keys = cli.modes_to_measure(args, modes, inputs.data_sources(args))
    if not modes:
        return
    device, members, spec = cli.open_run(args, min_members=1)
    batches, indices = fixed_batches(args, device)
    meta = result_files.run_metadata(
        args, __file__, members, spec, device, preset=args.preset, rho=rhos, norms=norms,
        adaptive=args.adaptive, n_iters=args.n_iters, apgd_restart=args.apgd_restart, avg_draws=args.avg_draws,
        batch_num=len(batches),
        batch_size=args.eval_batch_size, batch_seed=args.seed, logit_norm=args.logit_norm,
        split="train (no augmentation, eval mode)", sample_indices=indices,
        apgd_checkpoints=sharpness.apgd_checkpoints(args.n_iters),
        ellipsoid_search=ellipsoid.ellipsoid_search(device))
    for mode in modes:
        individual = [measure_member(mode, m.model, batches, args, rhos, norms) for m in members]
        if mode == "fisher":
            values = [r["fisher"] for r in individual]
            payload = {"individual_fisher": values, "mean_fisher": float(np.mean(values))}
            rows = tidy(mode, individual) + [dict(mode=mode, split="train", member="mean_individual",
                                                  metric="fisher", value=payload["mean_fisher"])]
            print(f"fisher: {', '.join(f'{v:.4g}' for v in values)}", flush=True)
        else:
            mean = {key: float(np.mean([r[key]["sharpness"] for r in individual])) for key in individual[0]}
            payload = {"individual_sharpness": individual, "mean_sharpness": mean}
            rows = tidy(mode, individual) + [dict(mode=mode, split="train", member="mean_individual",
                                                  setting=k, metric="sharpness", value=v) for k, v in mean.items()]
            for key, value in mean.items():
                per = ", ".join(f"{r[key]['sharpness']:.4g}" for r in individual)
                print(f"{mode} {key}: mean {value:.4g} (members {per})", flush=True)
                saturation_note(mode, key, individual)
        result_files.write_results(args.save, mode, dict(meta=dict(meta, mode=mode), **payload), rows,
                                   key=keys[mode])


if __name__ == "__main__":
    run_main(main, interrupted=MEASURE_INTERRUPTED)
