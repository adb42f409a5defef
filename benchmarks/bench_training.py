"""Cost of SharpBalance's phases against plain SGD, for one ensemble member.

For the same member (ResNet18 at a small width, synthetic 32x32 images, 10 classes) this times, in
one process and interleaved over ``--repeats`` rounds:

* one epoch of plain SGD,
* one epoch of SAM on every sample,
* one epoch of SharpBalance's mixed phase with a realistic mask (random scores for 3 members,
  flat_ratio 0.5; the ``boost`` rule gives a SAM fraction of about 0.83, ``share`` about 0.79),
* the scoring pass (per-sample squared gradient norms over the same images, no augmentation), with
  the hooks backend (auto) and with the torch.func backend (the default).

Every measurement starts from the same weights (restored before each run) and a fresh optimizer;
each phase runs once untimed first (one-time costs such as torch.func's first import or oneDNN
kernel creation are reported separately as "first run"). The table gives medians and the ratios
the issue sets as goals: mixed/SGD within 10% of 1+f (f = measured SAM fraction), SAM/SGD about 2,
scoring/SGD at most 3.

    python benchmarks/bench_training.py --width 16 --images 2048 --repeats 5 --threads 1 \
        --json results/bench_training.json

The same command runs on a GPU with ``--device cuda`` (or ``auto``).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.arrays import BatchLoader, ImageArrayDataset  # noqa: E402
from models import create_model  # noqa: E402
from training.engine import train_one_epoch  # noqa: E402
from training.partition import sam_masks  # noqa: E402
from training.sam import SAM  # noqa: E402
from training.scores import squared_grad_norms  # noqa: E402
from utils.device import cpu_name  # noqa: E402

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=16, help="ResNet18 first-stage channels (64 in the paper)")
    parser.add_argument("--images", type=int, default=2048, help="synthetic 32x32 training images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--score_chunk", type=int, default=64, help="samples per chunk when scoring")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each phase once per round)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every timing and the summary here")
    return parser.parse_args(argv)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible")
    return device


def machine_description(device):
    info = {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synthetic_data(n, classes, seed):
    """uint8 (n, 32, 32, 3) images whose colour depends a little on the label, and the labels."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, classes, size=n).astype(np.int64)
    base = (labels[:, None, None, None] * 37 % 256).astype(np.float64)
    images = np.clip(base + rng.normal(0, 60, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return images, labels


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    images, labels = synthetic_data(args.images, args.classes, args.seed)
    train_set = ImageArrayDataset(images, labels, CIFAR10_MEAN, CIFAR10_STD, augment=True)
    score_set = train_set.with_options(augment=False)
    train_loader = BatchLoader(train_set, args.batch_size, device, shuffle=True, seed=args.seed)
    score_loader = BatchLoader(score_set, args.batch_size, device)

    model = create_model("resnet18", args.classes, width=args.width).to(device)
    # A few plain steps first, so BatchNorm's running statistics and the weights are a member's,
    # not an initialisation's (the scores then are not all alike).
    warm = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_one_epoch(model, warm, train_loader, epoch=0, use_sam=False, progress=False)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Realistic masks: 3 members, flat_ratio 0.5, random scores (no two members agree).
    scores = np.random.RandomState(args.seed + 1).rand(3, args.images)
    masks = {rule: torch.as_tensor(sam_masks(scores, 0.5, rule=rule)[0]) for rule in ("boost", "share")}

    def fresh_optimizer():
        return SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def epoch(use_sam, sam_mask=None):
        def run():
            stats = train_one_epoch(model, fresh_optimizer(), train_loader, epoch=1, use_sam=use_sam,
                                    sam_mask=sam_mask, progress=False)
            return {"sam_fraction": stats["sam_fraction"]}
        return run

    def scoring(backend):
        def run():
            squared_grad_norms(model, score_loader, device, chunk_size=args.score_chunk, backend=backend)
            return {}
        return run

    phases = {
        "sgd": ("one epoch, SGD", epoch(False)),
        "sam": ("one epoch, SAM", epoch(True)),
        "mixed_boost": ("one epoch, SharpBalance mixed (boost)", epoch(True, masks["boost"])),
        "mixed_share": ("one epoch, SharpBalance mixed (share)", epoch(True, masks["share"])),
        "score_auto": ("scoring pass, hooks backend (auto)", scoring("auto")),
        "score_func": ("scoring pass, torch.func backend", scoring("func")),
    }

    def timed(fn):
        model.load_state_dict(snapshot)
        synchronize(device)
        start = time.perf_counter()
        extra = fn()
        synchronize(device)
        return time.perf_counter() - start, extra

    first, times, extras = {}, {key: [] for key in phases}, {}
    for key, (_, fn) in phases.items():
        first[key], extras[key] = timed(fn)
        print(f"first run  {key:12s} {first[key]:8.3f} s", flush=True)
    for round_index in range(args.repeats):
        # Rotate the order each round, so slow spells of a shared machine hit every phase alike.
        keys = list(phases)
        keys = keys[round_index % len(keys):] + keys[:round_index % len(keys)]
        for key in keys:
            seconds, extras[key] = timed(phases[key][1])
            times[key].append(seconds)
        print(f"round {round_index + 1}/{args.repeats}: "
              + ", ".join(f"{key} {times[key][-1]:.3f}" for key in phases), flush=True)

    median = {key: statistics.median(values) for key, values in times.items()}
    sgd = median["sgd"]
    summary = {}
    for rule in ("boost", "share"):
        f = extras[f"mixed_{rule}"]["sam_fraction"]
        ratio = median[f"mixed_{rule}"] / sgd
        summary[f"mixed_{rule}"] = {"ratio": ratio, "sam_fraction": f, "goal": 1 + f,
                                    "met": abs(ratio / (1 + f) - 1) <= 0.10}
    summary["sam"] = {"ratio": median["sam"] / sgd, "goal": 2.0, "met": abs(median["sam"] / sgd / 2 - 1) <= 0.10}
    for backend in ("auto", "func"):
        ratio = median[f"score_{backend}"] / sgd
        summary[f"score_{backend}"] = {"ratio": ratio, "goal": 3.0, "met": ratio <= 3.0}

    machine = machine_description(device)
    print()
    print(f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), device {machine['device']}"
          + (f" ({machine['gpu']})" if "gpu" in machine else ""))
    print(f"Setup: ResNet18 width {args.width}, {args.images} synthetic 32x32 images, {args.classes} classes, "
          f"batch {args.batch_size}, score chunk {args.score_chunk}, {args.repeats} interleaved rounds (medians)")
    print()
    print("| phase | median s | min s | first run s | / SGD | goal | met |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    goals = {"sgd": ("1", None), "sam": ("≈ 2 (±10%)", summary["sam"]),
             "mixed_boost": (f"1+f = {summary['mixed_boost']['goal']:.2f} (±10%)", summary["mixed_boost"]),
             "mixed_share": (f"1+f = {summary['mixed_share']['goal']:.2f} (±10%)", summary["mixed_share"]),
             "score_auto": ("≤ 3", summary["score_auto"]), "score_func": ("≤ 3", summary["score_func"])}
    for key, (label, _) in phases.items():
        goal, result = goals[key]
        if key.startswith("mixed"):
            label += f", f = {extras[key]['sam_fraction']:.3f}"
        met = "" if result is None else ("yes" if result["met"] else "no")
        print(f"| {label} | {median[key]:.3f} | {min(times[key]):.3f} | {first[key]:.3f} | "
              f"{median[key] / sgd:.2f} | {goal} | {met} |")

    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "machine": machine, "first_run_seconds": first,
                       "seconds": times, "median_seconds": median, "summary": summary}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
