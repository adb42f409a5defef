"""The parts of benchmarks/gpu_check.sh: smoke run, throughput, members sharing a GPU, projections.

    python benchmarks/gpu_check.py smoke      --device cuda --out results/gpu_check --budget 160
    python benchmarks/gpu_check.py throughput --device cuda --out results/gpu_check --budget 170
    python benchmarks/gpu_check.py shared     --device cuda --out results/gpu_check --budget 60
    python benchmarks/gpu_check.py projection --out results/gpu_check

Each part prints as it goes and writes <out>/<part>.json; ``projection`` reads what the others left
(a part cut off by its time limit leaves the rows it finished). ``--quick`` runs the same code on
toy sizes (tests/test_gpu_check.py runs it on the CPU).

smoke       main.py on digits for the three methods (lr 0.01; SharpBalance split before the first
            epoch, so both devices score the same initial weights) on --device and on the CPU, the fast-path
            flags (--amp bf16/fp16, --channels_last) and torchrun with 3 ranks on one device; the
            three measure scripts on the device's SharpBalance run; agreement: the split masks must
            be identical and the final losses within SMOKE_LOSS_TOLERANCE. TF32 is off during the
            smoke run so that the comparison is fp32 against fp32.
throughput  ResNet18 (width 64) on 45,000 synthetic 32x32 images resident on the device, batch 128:
            SGD, SAM, the mixed step at f = 0.8, scoring (func and hooks), evaluation, in fp32 and
            with the fast path (bf16 + channels_last, then + torch.compile); a short SGD timing of the
            Tiny-ImageNet model on 64x64 images gives the cost ratio used in the projections. Peak
            device memory per row.
shared      three members training at once on the device (three processes, started together phase by
            phase): aggregate images/s and peak memory per process, fp32 and bf16 + channels_last.
projection  wall time of a 200-epoch 3-member run per method on CIFAR-10, CIFAR-100 and Tiny-ImageNet
            and of the whole Figure 7 (27 runs), next to the goals set for one H200.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.accel import COMPILE_BACKEND_ENV  # noqa: E402
from utils import run_folder  # noqa: E402

# Relative. Two devices round differently and digits runs separate chaotically (ReLU inputs at zero on
# the uniform background flip): with --lr 0.01, 2 epochs, width 8, a pure rounding change on one CPU
# (--channels_last) moved the final train/val losses of 6 members (deep ensemble, SharpBalance) by
# up to 4.5%; at the default lr 0.1, by up to 40%.
SMOKE_LOSS_TOLERANCE = 0.10
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FULL = dict(smoke_width=8, smoke_epochs=2, smoke_seeds=["13", "17", "27"], smoke_batch=128, sharpness_batches=10,
            images=45000, width=64, batch=128, warm_steps=5, timed_steps=40, score_images=1024,
            eval_images=10000, tiny_images=2000, tiny_steps=15, mixed_fraction=0.8)
QUICK = dict(smoke_width=2, smoke_epochs=1, smoke_seeds=["13", "17"], smoke_batch=512, sharpness_batches=1,
             images=512, width=4, batch=32, warm_steps=1, timed_steps=2, score_images=32,
             eval_images=64, tiny_images=64, tiny_steps=1, mixed_fraction=0.8)
GOALS = {"cifar10_sharpbalance_fp32_h": 1.0, "cifar10_sharpbalance_fast_shared_h": 0.5, "figure7_h": 24.0}


def say(text=""):
    print(text, flush=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def save_json(out, name, payload):
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, os.path.join(out, name))


def load_json(out, name):
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class Deadline:
    """The part's own time budget, so it stops between rows, prints and saves, before the shell's
    hard limit would kill it mid-row."""

    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    def left(self):
        return self.end - time.perf_counter()

    def allows(self, seconds, what):
        if self.left() >= seconds:
            return True
        say(f"  (skipped: {what}; {self.left():.0f}s of the part's budget left, it needs about {seconds:.0f}s)")
        return False


# ----------------------------------------------------------------------------------------- smoke

def run_quietly(main_fn, argv, log_path):
    """Call a script's main(argv) in this process with its output in ``log_path``; (ok, error)."""
    from utils.errors import UserError
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    buffer = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            main_fn(argv)
        error = None
    except UserError as err:
        error = f"error: {err}"
    except Exception as err:  # noqa: BLE001 - the check reports and goes on with the next run
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    with open(log_path, "w") as f:
        f.write(buffer.getvalue() + ("" if error is None else error + "\n"))
    return error, time.perf_counter() - start


def last_log_rows(run_dir, seeds):
    return {seed: run_folder.read_log(run_folder.member_file(run_dir, seed, run_folder.LOG_NAME))[0][-1]
            for seed in seeds}


def torchrun_one_device(main_args, run, single_run, timeout, ranks=3):
    """main.py under torchrun with ``ranks`` ranks all on the first visible GPU; (entry, verdict).
    Compares its split with the one-process run ``single_run`` when both exist."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29577",
               os.path.join(ROOT, "main.py"), *main_args, "--save_path", run]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": timeout}, f"FAILED: still running after {timeout:.0f}s"
    entry = {"ok": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1)}
    if not entry["ok"]:
        return entry, "FAILED: " + (done.stderr.strip().splitlines() or ["no output"])[-1]
    verdict = f"ok ({entry['seconds']}s)"
    if single_run:
        a, b = (run_folder.read_split(r)["sam_masks"] for r in (run, single_run))
        entry["mask_entries_differing_from_one_process"] = int((a != b).sum())
        verdict += f"; split masks differ from the one-process run in {int((a != b).sum())} entries"
    return entry, verdict


def smoke(args, cfg, device):
    import main as main_script
    import measure_diversity
    import measure_diversity_variance
    import measure_sharpness
    deadline = Deadline(args.budget)
    out = os.path.join(args.out, "smoke")
    data = os.path.join(args.out, "datasets")
    # Fresh runs every time: a rerun must not resume (and so skip) runs left by an earlier check.
    shutil.rmtree(out, ignore_errors=True)
    # fp32 against fp32: TF32 convolutions/matmuls would move the device run by ~1e-3 per op.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    methods = {"deep_ensemble": [], "sam": ["--sam", "True", "--rho", "0.05"],
               "sharpbalance": ["--sam", "True", "--rho", "0.05", "--flat_ratio", "0.5", "--initial_epochs", "-1"]}
    common = ["--data", "digits", "--data_path", data, "--lr", "0.01", "--width", str(cfg["smoke_width"]), "--epochs",
              str(cfg["smoke_epochs"]), "--batch_size", str(cfg["smoke_batch"]), "--no_progress",
              "--seed", *cfg["smoke_seeds"]]
    result = {"device": str(device), "runs": {}, "agreement": {}, "measure": {}, "fast_path": {}, "bad_input": {}}

    def train(tag, method, device_name, extra=()):
        run = os.path.join(out, tag, method)
        error, seconds = run_quietly(main_script.main, common + methods[method] + ["--device", device_name,
                                                                                   "--save_path", run, *extra],
                                     os.path.join(out, "logs", f"{tag}_{method}.log"))
        result["runs"][f"{tag}/{method}"] = {"error": error, "seconds": round(seconds, 1)}
        say(f"  main.py {method:13s} on {device_name:6s} {' '.join(extra):32s} "
            + (f"FAILED: {error}" if error else f"ok ({seconds:.1f}s)"))
        return run if error is None else None

    # --quick trains SharpBalance alone: the other methods go through the same lines.
    trained = ["sharpbalance"] if args.quick else list(methods)
    say(f"smoke: main.py on digits, {', '.join(trained)}, {cfg['smoke_epochs']} epoch(s), seeds "
        f"{' '.join(cfg['smoke_seeds'])}, width {cfg['smoke_width']}, on {device} and on the CPU")
    runs = {}
    for method in trained:
        runs[("device", method)] = train("device", method, str(device))
    for method in trained:
        if device.type == "cpu":  # the device run is the CPU run
            runs[("cpu", method)] = runs[("device", method)]
        elif deadline.allows(15, f"CPU run of {method}"):
            runs[("cpu", method)] = train("cpu", method, "cpu")

    say("agreement with the CPU:")
    for method in trained:
        a, b = runs.get(("device", method)), runs.get(("cpu", method))
        if not a or not b:
            continue
        entry = {}
        if method == "sharpbalance":
            masks = [run_folder.read_split(r) for r in (a, b)]
            differ = int((masks[0]["sam_masks"] != masks[1]["sam_masks"]).sum())
            scores = [m["scores"].double() for m in masks]
            entry["mask_entries_differing"] = differ
            entry["scores_max_rel_diff"] = float(((scores[0] - scores[1]).abs() / scores[1].abs().clamp_min(1e-30)).max())
            say(f"  split masks: {'identical' if differ == 0 else f'{differ} entries differ'} "
                f"({masks[0]['sam_masks'].numel()} entries); scores agree to {entry['scores_max_rel_diff']:.1e} relative")
        rows = [last_log_rows(r, cfg["smoke_seeds"]) for r in (a, b)]
        worst = 0.0
        for seed in cfg["smoke_seeds"]:
            for key in ("train_loss", "val_loss"):
                x, y = float(rows[0][seed][key]), float(rows[1][seed][key])
                worst = max(worst, abs(x / y - 1))
        entry["final_loss_max_rel_diff"] = worst
        entry["ok"] = worst <= SMOKE_LOSS_TOLERANCE and entry.get("mask_entries_differing", 0) == 0
        result["agreement"][method] = entry
        say(f"  {method:13s} final train/val losses agree to {worst:.3f} relative "
            f"(tolerance {SMOKE_LOSS_TOLERANCE}): {'ok' if entry['ok'] else 'NOT OK'}")

    sb = runs.get(("device", "sharpbalance"))
    if sb:
        say("measure scripts on the device's SharpBalance run:")
        corruptions = [] if not args.quick else ["--corruptions", "gaussian_noise"]
        scripts = [
            ("measure_diversity", measure_diversity.main, ["--mode", "predict,disagreement"] + corruptions),
            ("measure_diversity_variance", measure_diversity_variance.main,
             ["--mode", "variance_mse_c"] + corruptions),
            ("measure_sharpness", measure_sharpness.main,
             ["--mode", "APGD_worst", "--batch-num", str(cfg["sharpness_batches"])]
             + (["--n_iters", "2"] if args.quick else [])),
        ]
        for name, fn, extra in scripts:
            if not deadline.allows(10, name):
                continue
            error, seconds = run_quietly(fn, ["--dataset", "digits", "--data_path", data, "--resume", sb, "--device",
                                              str(device), "--save", os.path.join(out, "measure"), *extra],
                                         os.path.join(out, "logs", f"{name}.log"))
            result["measure"][name] = {"error": error, "seconds": round(seconds, 1)}
            say(f"  {name:27s} " + (f"FAILED: {error}" if error else f"ok ({seconds:.1f}s)"))

    if device.type == "cuda" and deadline.allows(45, "torchrun with 3 ranks on one GPU"):
        run = os.path.join(out, "torchrun", "sharpbalance")
        entry, verdict = torchrun_one_device(common + methods["sharpbalance"] + ["--device", str(device)], run, sb,
                                             timeout=max(10, deadline.left() - 5))
        result["torchrun_3_ranks_one_gpu"] = entry
        say(f"  torchrun --nproc_per_node=3 on one GPU (gloo collectives): {verdict}")

    say("fast-path flags and bad input on the device:")
    # main.py refuses --channels_last on a CPU (training.accel.cpu_unsafe_flag).
    fast_runs = [["--amp", "bf16", "--channels_last"] if device.type == "cuda" else ["--amp", "bf16"]]
    if device.type == "cuda":
        fast_runs.append(["--amp", "fp16", "--channels_last"])
    for i, flags in enumerate(fast_runs):
        if deadline.allows(10, f"main.py {' '.join(flags)}"):
            run = train(f"fast{i}", "deep_ensemble" if args.quick else "sharpbalance", str(device), flags)
            result["fast_path"][" ".join(flags)] = run is not None
    bad = {"--device cuda:99": ["--device", "cuda:99"], "--amp fp16 on the CPU": ["--device", "cpu", "--amp", "fp16"]}
    for label, flags in bad.items():
        error, _ = run_quietly(main_script.main, common + ["--save_path", os.path.join(out, "bad"), *flags],
                               os.path.join(out, "logs", "bad_input.log"))
        result["bad_input"][label] = error
        say(f"  {label:22s} -> {error}")
    save_json(args.out, "smoke.json", result)


# ----------------------------------------------------------------------------------------- throughput

def synthetic(n, size, classes, seed=0):
    """uint8 (n, size, size, 3) images whose mean colour follows the label, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    noise = rng.integers(0, 96, (n, size, size, 3), dtype=np.uint8)
    return noise + (labels * 37 % 160).astype(np.uint8)[:, None, None, None], labels.astype(np.int64)


class Bench:
    """One member's model, optimizer and resident data; each method times one phase."""

    def __init__(self, cfg, device, fast_path=None, size=32, classes=10, images=None, dataset="cifar10", seed=0):
        from data.arrays import BatchLoader, ImageArrayDataset
        from models import create_model
        from training.accel import FastPath
        from training.sam import SAM
        self.cfg, self.device, self.BatchLoader = cfg, device, BatchLoader
        images, labels = synthetic(images or cfg["images"], size, classes, seed)
        self.train_set = ImageArrayDataset(images, labels, MEAN, STD, augment=True)
        self.eval_set = self.train_set.with_options(augment=False)
        # Scoring wants every sample of its split: a split of the first score_images images.
        n = min(cfg["score_images"], len(labels))
        self.score_set = ImageArrayDataset(images[:n], labels[:n], MEAN, STD)
        self.train_set.tensors_on(device)  # every image resident on the device, once
        torch.manual_seed(seed)
        self.fast = fast_path or FastPath(device=device)
        self.model = self.fast.prepare(create_model("resnet18", classes, width=cfg["width"], dataset=dataset).to(device))
        self.optimizer = SAM(self.model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                             weight_decay=5e-4)
        rng = np.random.default_rng(seed + 1)
        self.mask = torch.as_tensor(rng.random(len(labels)) < cfg["mixed_fraction"])

    def loader(self, steps, offset=0):
        subset = (offset + np.arange(steps * self.cfg["batch"])) % len(self.train_set)
        return self.BatchLoader(self.train_set, self.cfg["batch"], self.device, shuffle=True, seed=offset, subset=subset)

    def train(self, kind, steps, offset=0):
        from training.engine import train_one_epoch
        mask = self.mask if kind == "mixed" else None
        train_one_epoch(self.model, self.optimizer, self.loader(steps, offset), 0, use_sam=kind != "sgd",
                        sam_mask=mask, progress=False, scaler=self.fast.scaler)
        return steps * self.cfg["batch"]

    def score(self, backend):
        from training.scores import squared_grad_norms
        loader = self.BatchLoader(self.score_set, self.cfg["batch"], self.device)
        squared_grad_norms(self.model, loader, self.device, backend=backend)
        return len(self.score_set)

    def evaluate(self, n):
        from training.engine import evaluate
        n = min(n, len(self.eval_set))
        evaluate(self.model, self.BatchLoader(self.eval_set, 500, self.device, subset=np.arange(n)))
        return n

    def timed(self, fn, *fn_args):
        """(images/s, seconds, peak GiB) of one run of fn, after everything queued before it ran."""
        synchronize(self.device)
        reset_peak(self.device)
        start = time.perf_counter()
        images = fn(*fn_args)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return images / seconds, seconds, peak_gib(self.device)


def gib(value):
    return "   n/a   " if value != value else f"{value:6.2f} GiB"  # NaN: not a GPU


def measure_rows(bench, cfg, deadline, label, rows, phases, save=None):
    """Warm each phase up, then time it; rows[label][phase] = {img_per_s, seconds, peak_gib}."""
    rows.setdefault(label, {})
    for phase in phases:
        if not deadline.allows(8 if not cfg.get("quick") else 0, f"{label} {phase}"):
            break
        warm_start = time.perf_counter()
        if phase in ("sgd", "sam", "mixed"):
            bench.train(phase, cfg["warm_steps"], offset=1)
            warm = time.perf_counter() - warm_start
            rate, seconds, peak = bench.timed(bench.train, phase, cfg["timed_steps"], 2)
        elif phase.startswith("score_"):
            backend = phase.split("_", 1)[1]
            bench.score(backend)
            warm = time.perf_counter() - warm_start
            rate, seconds, peak = bench.timed(bench.score, backend)
        else:
            bench.evaluate(1000)
            warm = time.perf_counter() - warm_start
            rate, seconds, peak = bench.timed(bench.evaluate, cfg["eval_images"])
        rows[label][phase] = {"img_per_s": rate, "seconds": seconds, "peak_gib": peak, "warm_up_s": warm}
        say(f"  {label:28s} {phase:11s} {rate:10.0f} img/s   peak {gib(peak)}   (warm-up {warm:.1f}s)")
        if save:
            save()


PHASES = ("sgd", "sam", "mixed", "score_func", "score_hooks", "eval")


def throughput(args, cfg, device):
    from training.accel import FastPath
    deadline = Deadline(args.budget)
    cfg = dict(cfg, quick=args.quick)
    rows = {}
    result = {"device": str(device), "config": cfg, "rows": rows,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    say(f"throughput: ResNet18 width {cfg['width']}, {cfg['images']} synthetic 32x32 images resident on {device}, "
        f"batch {cfg['batch']}, {cfg['timed_steps']} timed steps per training row, mixed f = {cfg['mixed_fraction']}")
    def save():
        save_json(args.out, "throughput.json", result)

    fp32 = Bench(cfg, device)
    measure_rows(fp32, cfg, deadline, "fp32", rows, PHASES, save)
    del fp32

    fast = Bench(cfg, device, FastPath("bf16", True, False, device))
    measure_rows(fast, cfg, deadline, "bf16+channels_last", rows, PHASES, save)
    del fast

    say(f"Tiny-ImageNet shape (64x64, 200 classes), SGD only, for the projections' cost ratio:")
    for label, fast_path in (("tiny fp32", None), ("tiny bf16+channels_last", FastPath("bf16", True, False, device))):
        if not deadline.allows(10, label):
            continue
        tiny = Bench(dict(cfg, timed_steps=cfg["tiny_steps"]), device, fast_path, size=64, classes=200,
                     images=cfg["tiny_images"], dataset="tiny_imgnet")
        measure_rows(tiny, dict(cfg, timed_steps=cfg["tiny_steps"]), deadline, label, rows, ("sgd",), save)
        del tiny

    # Compiling takes a minute or more per graph on a GPU: last, so the rows above are in already.
    if deadline.allows(60 if not args.quick else 0, "bf16+channels_last+compile"):
        compiled = Bench(cfg, device, FastPath("bf16", True, True, device))
        if compiled.fast.compile_backend is None:
            say("  (compile unavailable here: no compiled rows)")
        else:
            phases = ("sgd",) if args.quick else ("sgd", "sam", "mixed", "eval")
            measure_rows(compiled, cfg, deadline, "bf16+channels_last+compile", rows, phases, save)


# ----------------------------------------------------------------------------------------- shared

SHARED_PHASES = ("sgd", "sam", "mixed", "eval")


SHARED_LABELS = ("fp32", "bf16+channels_last")


def shared_worker(rank, members, cfg, device_name, barrier, queue):
    """One member: every phase of every label, each started together with the other members."""
    from training.accel import FastPath
    device = torch.device(device_name)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // members))
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = False  # as in main(): the channels_last rows on a CPU
    for label in SHARED_LABELS:
        fast = FastPath("bf16", True, False, device) if label != "fp32" else None
        bench = Bench(cfg, device, fast, seed=rank)
        for phase in SHARED_PHASES:
            if phase == "eval":
                bench.evaluate(1000)
            else:
                bench.train(phase, cfg["warm_steps"], offset=1)
            synchronize(device)
            reset_peak(device)
            barrier.wait()  # the members start each phase together
            start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            images = bench.evaluate(cfg["eval_images"]) if phase == "eval" else bench.train(phase, cfg["timed_steps"], 2)
            synchronize(device)
            queue.put((label, phase, start, time.perf_counter(), images, peak_gib(device)))
            barrier.wait()
        del bench


def shared(args, cfg, device):
    import multiprocessing as mp
    import queue as queue_module
    deadline = Deadline(args.budget)
    members = 3
    result = {"device": str(device), "members": members, "rows": {}}
    say(f"{members} members at once on {device} (one process each, phases started together): aggregate img/s")
    context = mp.get_context("spawn")
    barrier, queue = context.Barrier(members), context.Queue()
    workers = [context.Process(target=shared_worker, args=(rank, members, cfg, str(device), barrier, queue))
               for rank in range(members)]
    for worker in workers:
        worker.start()
    def report():
        """The next worker report; None when a worker died or the budget ran out."""
        while deadline.left() > 0:
            try:
                return queue.get(timeout=1.0)
            except queue_module.Empty:
                if any(w.exitcode not in (None, 0) for w in workers):
                    say(f"  (a member process failed with exit status "
                        f"{[w.exitcode for w in workers if w.exitcode]}; its error is above)")
                    return None
        say("  (stopped at the part's budget; the rows above are kept)")
        return None

    expected = [(label, phase) for label in SHARED_LABELS for phase in SHARED_PHASES]
    try:
        for label, phase in expected:
            got = [report() for _ in range(members)]
            if None in got:
                break
            window = max(r[3] for r in got) - min(r[2] for r in got)
            images = sum(r[4] for r in got)
            peak = max(r[5] for r in got)
            result["rows"].setdefault(label, {})[phase] = {"aggregate_img_per_s": images / window,
                                                          "peak_gib_per_process": peak}
            say(f"  {label:28s} {phase:11s} {images / window:10.0f} img/s together   peak {gib(peak)} per process")
            save_json(args.out, "shared.json", result)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
    save_json(args.out, "shared.json", result)
    return 0 if len(result["rows"].get(SHARED_LABELS[-1], {})) == len(SHARED_PHASES) else 1


# ----------------------------------------------------------------------------------------- projection

DATASETS = {  # training images, validation images (per epoch), test + -C images, image side
    "CIFAR-10": dict(train=45000, val=5000, side=32, measure_images=10000 * (1 + 75)),
    "CIFAR-100": dict(train=45000, val=5000, side=32, measure_images=10000 * (1 + 75)),
    "Tiny-ImageNet": dict(train=90000, val=10000, side=64, measure_images=10000 * (1 + 75)),
}
EPOCHS, SPLIT_AFTER, MEMBERS, SEED_TRIPLES = 200, 101, 3, 3


def member_hours(rates, data, method, scale):
    """One member's 200 epochs in hours at ``rates`` (img/s per phase) times the image-cost ``scale``."""
    def seconds(images, phase):
        return images * scale / rates[phase]
    per_eval = seconds(data["val"], "eval")
    if method == "deep_ensemble":
        total = EPOCHS * (seconds(data["train"], "sgd") + per_eval)
    elif method == "sam":
        total = EPOCHS * (seconds(data["train"], "sam") + per_eval)
    else:  # SAM for initial_epochs + 1 = 101 epochs, one scoring pass, then the mixed step
        total = (SPLIT_AFTER * seconds(data["train"], "sam") + seconds(data["train"], "score")
                 + (EPOCHS - SPLIT_AFTER) * seconds(data["train"], "mixed") + EPOCHS * per_eval)
    return total / 3600


def projection(args):
    tp, sh = load_json(args.out, "throughput.json"), load_json(args.out, "shared.json")
    if not tp or "fp32" not in tp["rows"]:
        say("projection: no throughput rows to project from")
        return
    rows = tp["rows"]

    def rates_of(label):
        got = rows.get(label, {})
        needed = ("sgd", "sam", "mixed", "eval")
        if not all(k in got for k in needed):
            return None
        scoring = got.get("score_func") or rows["fp32"].get("score_func")
        if not scoring:
            return None
        return {**{k: got[k]["img_per_s"] for k in needed}, "score": scoring["img_per_s"]}

    fp32 = rates_of("fp32")
    fast_label = "bf16+channels_last+compile" if rates_of("bf16+channels_last+compile") else "bf16+channels_last"
    fast = rates_of(fast_label)
    if fast and fast_label.endswith("compile"):
        fast["score"] = rows["bf16+channels_last"].get("score_func", {}).get("img_per_s", fast["score"])
    tiny_ratio = {"fp32": 4.0, "fast": 4.0}
    if "tiny fp32" in rows and "sgd" in rows["tiny fp32"]:
        tiny_ratio["fp32"] = rows["fp32"]["sgd"]["img_per_s"] / rows["tiny fp32"]["sgd"]["img_per_s"]
    if "tiny bf16+channels_last" in rows and "bf16+channels_last" in rows:
        tiny_ratio["fast"] = (rows["bf16+channels_last"]["sgd"]["img_per_s"]
                              / rows["tiny bf16+channels_last"]["sgd"]["img_per_s"])
    # Three members sharing the device: each runs at (aggregate / 3); scoring and evaluation shared alike.
    share_gain = {}
    for label in ("fp32", "bf16+channels_last"):
        got = (sh or {}).get("rows", {}).get(label, {})
        alone = rows.get(label, {})
        share_gain[label] = {p: got[p]["aggregate_img_per_s"] / alone[p]["img_per_s"]
                             for p in SHARED_PHASES if p in got and p in alone}

    def shared_rates(rates, label):
        """Each member's rates with three at once: the aggregate gain over one member alone, split
        three ways (scoring, not measured shared, is given SGD's gain)."""
        gains = share_gain.get(label, {})
        if not all(p in gains for p in SHARED_PHASES):
            return None
        per_member = {p: rates[p] * gains[p] / MEMBERS for p in SHARED_PHASES}
        per_member["score"] = rates["score"] * gains["sgd"] / MEMBERS
        return per_member

    settings = [("fp32, members one after another", fp32, "fp32", False)]
    if fast:
        settings.append((f"{fast_label}, one after another", fast, "fast", False))
        shared_fast = shared_rates(fast, "bf16+channels_last")
        if shared_fast:
            note = " (gain of sharing measured with bf16+channels_last)" if fast_label.endswith("compile") else ""
            settings.append((f"{fast_label}, 3 members sharing the GPU{note}", shared_fast, "fast", True))
    shared_fp32 = shared_rates(fp32, "fp32") if fp32 else None
    if shared_fp32:
        settings.insert(1, ("fp32, 3 members sharing the GPU", shared_fp32, "fp32", True))

    say(f"projection: 200 epochs, 3 members, validation every epoch, SharpBalance split after 101 SAM epochs "
        f"(from {tp.get('gpu') or tp['device']}; Tiny-ImageNet cost per image = CIFAR's x "
        f"{tiny_ratio['fp32']:.2f} fp32 / x {tiny_ratio['fast']:.2f} fast, measured on SGD)")
    result = {"settings": {}, "goals": GOALS, "tiny_ratio": tiny_ratio}
    for name, rates, kind, concurrent in settings:
        if rates is None:
            continue
        say(f"  {name}:")
        table, figure7 = {}, 0.0
        for dataset, data in DATASETS.items():
            scale = tiny_ratio[kind] if data["side"] == 64 else 1.0
            for method in ("deep_ensemble", "sam", "sharpbalance"):
                one = member_hours(rates, data, method, scale)
                hours = one if concurrent else MEMBERS * one
                table[f"{dataset} {method}"] = hours
                figure7 += SEED_TRIPLES * hours
            say("    " + f"{dataset:14s}" + "  ".join(f"{m} {table[f'{dataset} {m}']:6.2f} h"
                                                      for m in ("deep_ensemble", "sam", "sharpbalance")))
        # Measurement passes (test + 75 -C cells, two passes, every member), forward only, one
        # process at a time (the measure scripts run the members of a run together).
        alone_eval = (fp32 if kind == "fp32" else fast)["eval"]
        measure = sum(SEED_TRIPLES * 3 * MEMBERS * 2 * d["measure_images"] * (tiny_ratio[kind] if d["side"] == 64 else 1)
                      / alone_eval for d in DATASETS.values()) / 3600
        figure7 += measure
        table["figure7"] = figure7
        say(f"    whole Figure 7 (27 runs + {measure:.1f} h of -C forward passes; APGD not counted): {figure7:.1f} h")
        result["settings"][name] = table
    c10_fp32 = result["settings"].get("fp32, members one after another", {}).get("CIFAR-10 sharpbalance")
    shared_names = [n for n in result["settings"] if "sharing" in n and not n.startswith("fp32")]
    c10_fast = result["settings"][shared_names[0]]["CIFAR-10 sharpbalance"] if shared_names else None
    best_f7 = min(t["figure7"] for t in result["settings"].values())
    say("goals (one H200):")
    say(f"  CIFAR-10 SharpBalance, 3 members, fp32:                 goal < {GOALS['cifar10_sharpbalance_fp32_h']:.1f} h, "
        f"projected {c10_fp32:.2f} h" if c10_fp32 is not None else "  CIFAR-10 fp32: no projection")
    say(f"  CIFAR-10 SharpBalance, fast path + 3 members sharing:   goal < {GOALS['cifar10_sharpbalance_fast_shared_h']:.1f} h, "
        + (f"projected {c10_fast:.2f} h" if c10_fast is not None else "no projection (no shared fast-path rows)"))
    say(f"  whole Figure 7:                                         goal < {GOALS['figure7_h']:.0f} h, "
        f"projected {best_f7:.1f} h (best setting)")
    save_json(args.out, "projection.json", result)


# ----------------------------------------------------------------------------------------- entry

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("smoke", "throughput", "shared", "projection"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="results/gpu_check")
    parser.add_argument("--budget", type=float, default=120, help="seconds this part may take")
    parser.add_argument("--quick", action="store_true", help="toy sizes (the same code; for tests on a CPU)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.part == "projection":
        return projection(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        say(f"{args.part}: no CUDA device visible; nothing to check (use --device cpu --quick to try the code)")
        return 1
    if args.quick:
        # Toy sizes; compiling with inductor would take minutes on a CPU: the cheap backend runs the
        # same path (training.accel reads the backend from this variable).
        os.environ.setdefault(COMPILE_BACKEND_ENV, "eager")
        if device.type == "cpu":
            torch.set_num_threads(1)
            # The channels_last rows build FastPath directly; oneDNN's channels_last convolution
            # backward corrupts memory on AVX2 CPUs, torch's own kernels run the same code safely.
            torch.backends.mkldnn.enabled = False
    return {"smoke": smoke, "throughput": throughput, "shared": shared}[args.part](args, cfg, device) or 0


if __name__ == "__main__":
    sys.exit(main())
