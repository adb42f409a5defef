"""Cost of worst-case sharpness (measure_sharpness.py --mode APGD_worst).

(a) One APGD iteration against a bare forward + backward pass of the same batch (5 digits
    training images, a trained ResNet18 of width --width), in one process, interleaved over
    --repeats rounds (the order rotates each round), medians:
      * ``fwd+bwd``     loss and parameter gradients of the batch (what any ascent step needs);
      * ``apgd l2``     an adaptive-l2 APGD batch of 20 iterations (rho 0.5), divided by 20 (it
                        includes the batch's one clean forward pass and its one read at the end),
                        with the device's default ellipsoid search (on a CPU: host scalars);
      * ``apgd l2, device scalars`` the same with the search a GPU runs (0-dim device tensors,
                        a fixed number of steps, no host reads), on this device;
      * ``apgd linf``   the same for the linf box;
      * ``apgd l2, bisection`` the l2 batch with the earlier projection (bisection, a host read per
                        step).
    The projections are timed where they run, inside the loop, so their share of an iteration is
    measured on the same runs.
(b) The time of the release-default measurement (adaptive, l2 and linf, rho 0.5, 20 iterations,
    100 batches of 5, measure_sharpness.py's batches) of a 3-member digits ensemble at width
    --width, member by member and norm by norm; each member's l2 search runs with the new projection
    and with the bisection, in alternating order (the linf box is the same in both).

The ensemble is trained here (main.py, --epochs epochs; how well it is trained does not change
what an iteration costs) unless --run_dir names a run folder of main.py.

    python benchmarks/bench_sharpness.py --threads 1 --json results/bench_sharpness.json
    python benchmarks/bench_sharpness.py --skip_measurement     # part (a) only, about a minute

The same command runs on a GPU with ``--device cuda``.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_training import machine_description, pick_device, synchronize  # noqa: E402
from measure import sharpness  # noqa: E402
from measure.ellipsoid import EllipsoidProjection, ellipsoid_search, project_l2_ellipsoid_bisection  # noqa: E402

SEEDS = ("13", "17", "27")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=8, help="ResNet18 first-stage channels")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the ensemble built here")
    parser.add_argument("--run_dir", default=None, help="a main.py run folder on digits to measure instead")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of part (a)")
    parser.add_argument("--batch_num", type=int, default=100, help="batches of part (b) (100 = release)")
    parser.add_argument("--skip_measurement", action="store_true", help="part (a) only")
    parser.add_argument("--skip_bisection_measurement", action="store_true",
                        help="part (b) with the new projection only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", default=None, help="write every timing and the summary here")
    return parser.parse_args(argv)


class BisectionProjection:
    """Stands in for EllipsoidProjection: the earlier bisection, which reports no gap."""

    def __init__(self, scale, rho, steps=None):
        self.scale, self.rho = scale, rho

    def __call__(self, v, start=None):
        return project_l2_ellipsoid_bisection(v, self.scale, self.rho), None

    def take_gap(self):
        return None


def train_ensemble(args, directory):
    import main as train_main
    train_main.main(["--data", "digits", "--seed", *SEEDS, "--epochs", str(args.epochs), "--width", str(args.width),
                     "--batch_size", "64", "--save_path", directory, "--no_progress", "--device", args.device])
    return directory


def part_a(args, run_dir, device):
    import measure_sharpness
    from measure.loading import find_member_checkpoints, load_member_files
    members, _ = load_member_files(find_member_checkpoints([run_dir], "last")[:1], "digits", device)
    model = members[0].model.eval()
    settings = measure_sharpness.get_parser().parse_args(["--dataset", "digits", "--resume", run_dir, "--batch-num", "1"])
    measure_sharpness.resolve_settings(settings)
    x, y = measure_sharpness.fixed_batches(settings, device)[0][0]
    flat = sharpness.FlatModel(model)
    scale = flat.w0.abs()
    ellipsoid, bisection = EllipsoidProjection(scale, 0.5), BisectionProjection(scale, 0.5)
    on_device = EllipsoidProjection(scale, 0.5, host_scalars=False)
    n_fb, gaps = 20, []

    def forward_backward():
        for _ in range(n_fb):
            loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, flat.params)
        return n_fb, 0.0

    def apgd(norm, project=None):
        # the projection is timed where it runs, inside the loop (on a GPU the clock waits for it)
        spent = [0.0]

        def timed_projection(v, start=None):
            synchronize(device)
            began = time.perf_counter()
            out = project(v, start)
            synchronize(device)
            spent[0] += time.perf_counter() - began
            return out
        timed_projection.take_gap = project.take_gap if project else None

        def run():
            spent[0] = 0.0
            result = sharpness.apgd_batch(flat, x, y, 0.5, norm, True, 20,
                                          projection=timed_projection if project else None)
            if project in (ellipsoid, on_device):
                gaps.append(result[5])
            return 20, spent[0] / 20
        return run

    cases = {"fwd+bwd": forward_backward, "apgd l2": apgd("l2", ellipsoid),
             "apgd l2, device scalars": apgd("l2", on_device), "apgd linf": apgd("linf"),
             "apgd l2, bisection": apgd("l2", bisection)}
    l2_cases = ("apgd l2", "apgd l2, device scalars", "apgd l2, bisection")

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        count, inner = fn()
        synchronize(device)
        return (time.perf_counter() - start) / count, inner

    for fn in cases.values():  # one untimed run each (first-call costs)
        timed(fn)
    times = {key: [] for key in cases}
    inner = {key: [] for key in cases}
    for round_index in range(args.repeats):
        keys = list(cases)
        keys = keys[round_index % len(keys):] + keys[:round_index % len(keys)]
        for key in keys:
            total, projection = timed(cases[key])
            times[key].append(total)
            inner[key].append(projection)
        print(f"round {round_index + 1}/{args.repeats}: "
              + ", ".join(f"{key} {times[key][-1] * 1e3:.2f} ms" for key in cases), flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    share = {key: statistics.median(p / t for p, t in zip(inner[key], times[key])) for key in cases}
    summary = {"iteration_over_fwd_bwd": median["apgd l2"] / median["fwd+bwd"],
               "linf_iteration_over_fwd_bwd": median["apgd linf"] / median["fwd+bwd"],
               "projection_share": share["apgd l2"], "bisection_share": share["apgd l2, bisection"],
               "device_scalars_share": share["apgd l2, device scalars"],
               "host_scalars": ellipsoid.host,
               "projection_ms": statistics.median(inner["apgd l2"]) * 1e3,
               "device_scalars_ms": statistics.median(inner["apgd l2, device scalars"]) * 1e3,
               "bisection_ms": statistics.median(inner["apgd l2, bisection"]) * 1e3,
               "max_projection_gap": max(gaps), "parameters": flat.w0.numel()}
    print()
    print(f"(a) ResNet18 width {args.width} ({flat.w0.numel():,} parameters), one batch of 5 digits training images, "
          f"rho 0.5, {args.repeats} interleaved rounds (medians)")
    print("| per call | median ms | min ms | / fwd+bwd | projection's share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    default_search = ellipsoid_search(device)
    labels = {"fwd+bwd": "forward + backward", "apgd l2": f"APGD iteration, adaptive l2 ({default_search})",
              "apgd l2, device scalars": "APGD iteration, adaptive l2 (device scalars)",
              "apgd linf": "APGD iteration, adaptive linf", "apgd l2, bisection": "APGD iteration, l2, bisection"}
    for key in cases:
        part = f"{share[key]:.1%}" if key in l2_cases else ""
        print(f"| {labels[key]} | {median[key] * 1e3:.2f} | {min(times[key]) * 1e3:.2f} | "
              f"{median[key] / median['fwd+bwd']:.2f} | {part} |")
    shares = sorted(p / t for p, t in zip(inner["apgd l2"], times["apgd l2"]))
    summary["projection_share_range"] = [shares[0], shares[-1]]
    print(f"projection: {summary['projection_ms']:.2f} ms per iteration ({summary['projection_share']:.1%}, "
          f"rounds {shares[0]:.1%} to {shares[-1]:.1%}); "
          f"device scalars: {summary['device_scalars_ms']:.2f} ms ({summary['device_scalars_share']:.1%}); "
          f"bisection: {summary['bisection_ms']:.2f} ms ({summary['bisection_share']:.1%}); "
          f"largest certified projection gap {summary['max_projection_gap']:.1e}")
    return {"seconds": times, "projection_seconds": inner, "median_seconds": median, "summary": summary}


def part_b(args, run_dir, device):
    """The release-default measurement of every member, unit by unit (member x norm), the l2 units
    with both projections in alternating order, so that a slow spell of the machine hits both."""
    import measure_sharpness
    from measure.loading import find_member_checkpoints, load_member_files
    members, _ = load_member_files(find_member_checkpoints([run_dir], "last"), "digits", device)
    settings = measure_sharpness.get_parser().parse_args(
        ["--dataset", "digits", "--resume", run_dir, "--batch-num", str(args.batch_num)])
    measure_sharpness.resolve_settings(settings)
    batches, _ = measure_sharpness.fixed_batches(settings, device)
    seconds = {"l2": 0.0, "l2, bisection": 0.0, "linf": 0.0}
    sharpness_sums = {key: 0.0 for key in seconds}
    for index, member in enumerate(members):
        flat = sharpness.FlatModel(member.model.eval())
        scale = flat.w0.abs()
        units = [("l2", "l2", EllipsoidProjection(scale, 0.5)),
                 ("l2, bisection", "l2", BisectionProjection(scale, 0.5))]
        units = (units if index % 2 == 0 else units[::-1]) + [("linf", "linf", None)]
        if args.skip_bisection_measurement:
            units = [unit for unit in units if unit[0] != "l2, bisection"]
        for key, norm, projection in units:
            synchronize(device)
            start = time.perf_counter()
            rows = [sharpness.apgd_batch(flat, x, y, 0.5, norm, True, 20, projection=projection) for x, y in batches]
            synchronize(device)
            seconds[key] += time.perf_counter() - start
            sharpness_sums[key] += sum(r[2] - r[0] for r in rows) / len(rows) / len(members)
            print(f"(b) member {index + 1}/{len(members)} {key}: {seconds[key]:.1f} s so far", flush=True)
    total = seconds["l2"] + seconds["linf"]
    result = {"seconds": seconds, "mean_sharpness": sharpness_sums, "total_seconds": total,
              "total_seconds_bisection": seconds["l2, bisection"] + seconds["linf"],
              "members": len(members), "batches": len(batches)}
    print(f"(b) release-default measurement ({len(members)} members x {len(batches)} batches of 5, l2 and linf, "
          f"rho 0.5, 20 iterations): {total:.1f} s (l2 {seconds['l2']:.1f} s + linf {seconds['linf']:.1f} s); "
          f"with the bisection: {result['total_seconds_bisection']:.1f} s (l2 {seconds['l2, bisection']:.1f} s)")
    print(f"    mean sharpness: l2 {sharpness_sums['l2']:.6g} (bisection {sharpness_sums['l2, bisection']:.6g}), "
          f"linf {sharpness_sums['linf']:.6g}", flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.device = str(device)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir
        training_seconds = None
        if run_dir is None:
            start = time.perf_counter()
            run_dir = train_ensemble(args, os.path.join(scratch, "run"))
            training_seconds = time.perf_counter() - start
            print(f"trained 3 members ({args.epochs} epochs, width {args.width}) in {training_seconds:.1f} s", flush=True)
        report = {"config": vars(args), "machine": machine_description(device),
                  "training_seconds": training_seconds, "iteration": part_a(args, run_dir, device)}
        if not args.skip_measurement:
            report["measurement"] = part_b(args, run_dir, device)
    machine = report["machine"]
    print(f"\nMachine: {machine['cpu']}, {machine['logical_cores']} logical cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), device {machine['device']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
