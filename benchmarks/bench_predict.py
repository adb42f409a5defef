"""Is evaluation bounded by the forward passes? Images per second of measure_diversity's per-split
work (all members' logits through ``LogitCache`` + the predict, disagreement and KL reports) against a
bare ``model(x)`` loop over the same batches, on random CIFAR-sized images.

    python benchmarks/bench_predict.py                      # CPU, ResNet18 width 16, 3 members
    python benchmarks/bench_predict.py --device cuda --width 64 --images 10000

Reports both rates (member-forward images per second) and their ratio (goal: >= 0.9). The two are
timed alternately, ``--repeats`` times each, and the best run of each is kept, so that noise from
other processes on the machine penalises neither side.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import BatchLoader, ImageArrayDataset, dataset_info  # noqa: E402
from models import create_model  # noqa: E402
from measure import forward, inputs, loading  # noqa: E402
from utils.device import select_device  # noqa: E402


def bare_loop(models, dataset, batch_size, device):
    loader = BatchLoader(dataset, batch_size, device)
    with torch.inference_mode():
        for x, _, _ in loader:
            for model in models:
                out = model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def predict_pass(members, dataset, batch_size, device):
    import measure_diversity
    cache = forward.LogitCache(members, device, batch_size)
    split = inputs.Split("test", "test", None, None, dataset)
    logits, labels = cache.get(split)
    reports = {mode: fn(logits, labels) for mode, (fn, _, _) in measure_diversity.MODES.items()}
    cache.drop(split.key)
    return reports


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    info = dataset_info("cifar10")
    rng = np.random.RandomState(0)
    dataset = ImageArrayDataset(rng.randint(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8),
                                rng.randint(0, 10, size=args.images), info.mean, info.std)
    members = []
    for seed in range(args.members):
        torch.manual_seed(seed)
        model = create_model("resnet18", 10, width=args.width).to(device).eval()
        members.append(loading.LoadedMember(f"member{seed}", model, seed))
    models = [m.model for m in members]
    bare_loop(models, dataset, args.batch_size, device)  # warm-up (allocator, kernels, device copy)
    times = {"bare": [], "predict": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        bare_loop(models, dataset, args.batch_size, device)
        times["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        predict_pass(members, dataset, args.batch_size, device)
        times["predict"].append(time.perf_counter() - start)
    work = args.members * args.images
    rates = {k: work / min(v) for k, v in times.items()}
    result = {"device": str(device), "width": args.width, "members": args.members, "images": args.images,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "bare_images_per_s": rates["bare"], "predict_images_per_s": rates["predict"],
              "ratio": rates["predict"] / rates["bare"], "seconds": times, "torch": torch.__version__}
    print(f"bare model(x) loop : {rates['bare']:9.1f} member-images/s")
    print(f"predict pass       : {rates['predict']:9.1f} member-images/s (logits + predict/disagreement/KL)")
    print(f"ratio              : {result['ratio']:.3f} (goal >= 0.9)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
