"""The parts of benchmarks/gpu_check.sh: smoke run, the project's throughput under every setting,
the bare reference step, members sharing a GPU, graph-captured steps and lockstep members,
projections and goals.

    python benchmarks/gpu_check.py smoke      --device cuda --out results/gpu_check --budget 78
    python benchmarks/gpu_check.py throughput --device cuda --out results/gpu_check --budget 77
    python benchmarks/gpu_check.py projection --out results/gpu_check

Each part prints as it goes and writes its section of <out>/summary.json (a row that fails prints
one line and the part goes on; a part cut off by its budget keeps the rows it finished);
``projection`` reads the other sections. Run folders, data and logs go to <out>/work/, which can be
deleted. ``--quick`` runs the same code on toy sizes (tests/test_gpu_check.py runs it on the CPU).

smoke       main.py on digits for the three methods (lr 0.01; SharpBalance split before the first
            epoch, so both devices score the same initial weights) on --device and on the CPU, the
            three measure scripts, agreement (identical split masks, final losses within
            SMOKE_LOSS_TOLERANCE), the fast-path flags, SharpBalance with --cuda_graphs, --lockstep
            and both (+ bf16 + channels_last) against the CPU run and with --score_backend hooks,
            the graph-captured steps against the eager ones (graph_equality), repeatability (a run
            killed after its first checkpoint and resumed against a straight run, bit for bit,
            under --cudnn deterministic and the default), bad input, then torchrun with 3 ranks on
            one device with what is left. TF32 is off in this process so that the agreement
            compares fp32 with fp32.
throughput  the project's rows (PROJECT_ROWS) of this part, each ResNet18 width 64 on 45,000 synthetic
cudnn       32x32 images resident on the device, batch 128: the SGD, SAM and mixed (f = 0.8) steps
graphs      timed over an epoch (see measure_epoch), scoring (func, hooks) and evaluation; peak memory.
compile     ``cudnn`` holds the --cudnn settings whose cached cuDNN plans would collide with the
            default's; ``graphs`` the --cuda_graphs rows, one member and three members in lockstep
            (a process of their own: a CUDA error inside a capture can leave the process's CUDA
            context unusable); ``compile`` the torch.compile row (not in the default run: compiling
            takes minutes). throughput also times SGD on Tiny-ImageNet-shaped images for the cost
            ratio.
reference   the bare step (bare_step.py) in a CUDA graph: one member and three on three streams,
            bf16 + channels_last and fp32 (TF32), and the bf16 compute ceiling at batch 1024.
shared      three members training at once on the device (three processes, started together phase by
            phase): aggregate images/s and peak memory per process, fp32 and bf16 + channels_last.
projection  wall time of a 200-epoch 3-member run per method on CIFAR-10, CIFAR-100 and Tiny-ImageNet
            and of the whole Figure 7 (27 runs) for every project row; the --cudnn settings side by
            side; the project against the reference per phase; three members on one GPU (streams,
            processes, lockstep); the goals.
"""
import argparse
import contextlib
import csv
import functools
import gc
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.accel import COMPILE_BACKEND_ENV  # noqa: E402
from utils import run_folder  # noqa: E402
from utils.device import CUBLAS_WORKSPACE_ENV, apply_cudnn  # noqa: E402

# Relative. Two devices round differently and digits runs separate chaotically (ReLU inputs at zero on
# the uniform background flip): with --lr 0.01, 2 epochs, width 8, a pure rounding change on one CPU
# (--channels_last) moved the final train/val losses of 6 members (deep ensemble, SharpBalance) by
# up to 4.5%; at the default lr 0.1, by up to 40%.
SMOKE_LOSS_TOLERANCE = 0.10
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TRAIN_PHASES = ("sgd", "sam", "mixed")
ALL_PHASES = TRAIN_PHASES + ("score_func", "score_hooks", "eval")
# cold_cap / warm_cap: seconds of the two passes of measure_epoch per phase (a row with whole_epoch
# gets whole_epoch_cap for the mixed step's first pass; a row's cap_scale scales both); max_cold_steps
# cuts the first pass by steps (the quick run, so that the tests meet an extrapolated epoch);
# min_warm_steps: the second pass's least number of steps. warm_steps / timed_steps: the fixed-step
# rows (tiny, shared). graph_equality_steps: how often graph_equality repeats its two batches per
# kind of step. smoke_graph_runs: which of GRAPH_SMOKE_RUNS the smoke trains (the quick run trains
# --lockstep alone, bit for bit the eager run on a CPU; the others go through the same lines).
FULL = dict(smoke_width=8, smoke_epochs=2, smoke_seeds=["13", "17", "27"], smoke_batch=128, sharpness_batches=10,
            images=45000, width=64, batch=128, mixed_fraction=0.8, score_images=1024, eval_images=10000,
            cold_cap=dict(sgd=1.2, sam=2.5, mixed=7.0), warm_cap=dict(sgd=0.8, sam=1.5, mixed=4.0),
            whole_epoch_cap=16.0, max_cold_steps=None, min_warm_steps=30, warm_steps=5, timed_steps=30,
            tiny_images=2000, tiny_steps=15, reference_warm=3, reference_timed=40, ceiling_batch=1024,
            repeat_settings=2, graph_equality_steps=2, smoke_graph_runs=(0, 1, 2))
QUICK = dict(smoke_width=2, smoke_epochs=1, smoke_seeds=["13", "17"], smoke_batch=512, sharpness_batches=1,
             images=128, width=2, batch=16, mixed_fraction=0.8, score_images=16, eval_images=32,
             cold_cap=dict(sgd=60.0, sam=60.0, mixed=60.0), warm_cap=dict(sgd=60.0, sam=60.0, mixed=60.0),
             whole_epoch_cap=60.0, max_cold_steps=5, min_warm_steps=6, warm_steps=1, timed_steps=2,
             tiny_images=64, tiny_steps=1, reference_warm=1, reference_timed=2, ceiling_batch=64,
             repeat_settings=1, graph_equality_steps=1, smoke_graph_runs=(1,))
# One H200, the figures of this run (minutes and hours of wall time; ratios of img/s).
GOALS = {"mixed_over_sam": 1.0, "fast_over_reference": 0.8, "cifar10_sharpbalance_faithful_min": 60.0,
         "cifar10_sharpbalance_fast_min": 20.0, "figure7_fast_h": 12.0}
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Row:
    """One setting of the project to time: main.py's flags, as a user would pass them.

    kind       faithful (the method's fp32 arithmetic) or fast (the opt-in fast path); the goals
               compare the fast rows with the bare reference and project the fast runs.
    part       the gpu_check part (one process) that measures it.
    phases     what is timed; a row without scoring or evaluation borrows them from ``borrow``.
    reference  the bare reference row (REFERENCE_ROWS) to compare it with, per phase.
    shared_as  the shared part's row whose gain from three processes applies to it.
    whole_epoch  its mixed step's first pass may take a whole epoch (whole_epoch_cap).
    members    members trained side by side in one process (``--lockstep``: one CUDA stream each);
               its figures are the members' aggregate.
    cap_scale  scales the time caps of its epoch passes (the budget of its part).
    """
    label: str
    flags: tuple = ()
    part: str = "throughput"
    kind: str = "faithful"
    phases: tuple = ALL_PHASES
    borrow: str = None
    reference: str = None
    shared_as: str = None
    whole_epoch: bool = False
    members: int = 1
    cap_scale: float = 1.0

    @property
    def graphs(self):
        """Whether its steps are graph-captured: its one-time costs are then per member and key."""
        return "--cuda_graphs" in self.flags


FAST_FLAGS = ("--amp", "bf16", "--channels_last")
# The project's settings, one line each; the projection covers every row measured. A new setting
# is one more line with its flags. Rows of one part run in one process, in this order: cuDNN keeps
# the plans it chose per shape in a process-wide cache keyed by shape, dtype, memory format and the
# deterministic flag but not the benchmark flag, so the settings that differ from another only by
# benchmarking (torch vs benchmark, released vs deterministic) must not share a process: they are
# split between throughput and cudnn. The graph rows have a process of their own (graphs), after the
# others: a failed capture can leave a CUDA error behind that every later kernel of the process meets.
PROJECT_ROWS = (
    Row("fp32", (), whole_epoch=True, reference="fp32 (TF32) graph", shared_as="fp32"),  # main.py's defaults
    Row("bf16+channels_last", FAST_FLAGS, kind="fast", reference="bf16+channels_last graph",
        shared_as="bf16+channels_last"),
    Row("fp32 cudnn=deterministic", ("--cudnn", "deterministic"), phases=TRAIN_PHASES, borrow="fp32"),
    Row("fp32 cudnn=torch", ("--cudnn", "torch"), part="cudnn", phases=TRAIN_PHASES, borrow="fp32", cap_scale=0.7),
    Row("fp32 cudnn=released", ("--cudnn", "released"), part="cudnn", phases=TRAIN_PHASES, borrow="fp32",
        cap_scale=0.7),
    # The fast path with graph-captured steps, one member, then three members in lockstep (one CUDA
    # stream each, one process); scoring and evaluation are not captured: borrowed.
    Row("bf16+channels_last+graphs", FAST_FLAGS + ("--cuda_graphs",), part="graphs", kind="fast",
        phases=TRAIN_PHASES, borrow="bf16+channels_last", reference="bf16+channels_last graph", cap_scale=0.4),
    Row("bf16+channels_last+graphs+lockstep", FAST_FLAGS + ("--cuda_graphs", "--lockstep"), part="graphs",
        kind="fast", phases=TRAIN_PHASES, borrow="bf16+channels_last",
        reference="bf16+channels_last graph, 3 members on 3 streams", members=3, cap_scale=0.4),
    Row("bf16+channels_last+compile", FAST_FLAGS + ("--compile",), part="compile",
        kind="fast", phases=TRAIN_PHASES + ("eval",), borrow="bf16+channels_last",
        reference="bf16+channels_last graph", shared_as="bf16+channels_last"),
)
# SGD on Tiny-ImageNet-shaped images (64x64, 200 classes), per kind: the projections' cost ratio.
TINY_ROWS = {"faithful": ("tiny fp32", ()), "fast": ("tiny bf16+channels_last", ("--amp", "bf16", "--channels_last"))}
# The shared part's rows: the project rows run by three processes at once.
SHARED_LABELS = ("fp32", "bf16+channels_last")
SHARED_PHASES = ("sgd", "sam", "mixed", "eval")
# The bare reference (bare_step.py): label, autocast dtype, channels_last, members, phases, batch key.
REFERENCE_ROWS = (
    ("bf16+channels_last graph", "bf16", True, 1, ("sgd", "sam"), "batch"),
    ("bf16+channels_last graph, 3 members on 3 streams", "bf16", True, 3, ("sgd", "sam"), "batch"),
    ("fp32 (TF32) graph", None, False, 1, ("sgd", "sam"), "batch"),
    ("fp32 (TF32) graph, 3 members on 3 streams", None, False, 3, ("sgd", "sam"), "batch"),
    ("ceiling: bf16+channels_last graph, batch 1024", "bf16", True, 1, ("sgd",), "ceiling_batch"),
)
CEILING = REFERENCE_ROWS[-1][0]
# Project against reference, three members: the shared part's aggregate against the streams.
SHARED_REFERENCE = {"fp32": "fp32 (TF32) graph, 3 members on 3 streams",
                    "bf16+channels_last": "bf16+channels_last graph, 3 members on 3 streams"}


def say(text=""):
    print(text, flush=True)


def one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def gib(value):
    return "   n/a   " if value != value else f"{value:6.2f} GiB"  # NaN: not a GPU


def work_dir(out):
    """Run folders, data and logs: everything but the summary and the log, deletable."""
    return os.path.join(out, "work")


def read_summary(out):
    path = os.path.join(out, SUMMARY)
    if not os.path.isfile(path):
        return {"parts": {}}
    with open(path) as f:
        return json.load(f)


def save_part(out, part, payload):
    """Write ``payload`` as the part's section of <out>/summary.json (atomically; parts run one after
    another, so nothing else writes it meanwhile)."""
    os.makedirs(out, exist_ok=True)
    summary = read_summary(out)
    summary.setdefault("parts", {})[part] = dict(payload, written=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                               time.gmtime()))
    tmp = os.path.join(out, SUMMARY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, SUMMARY))


def isolated(what, fn, *fn_args, **fn_kwargs):
    """``(result, None)``, or ``(None, error)`` after printing the error as one line: one row (or
    phase) failing must not end its part. SystemExit is caught too (argparse refusing a row's flags)."""
    try:
        return fn(*fn_args, **fn_kwargs), None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - every failure of a row is reported the same way
        error = one_line(err)
        say(f"  {what}: FAILED: {error}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, error


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
    """Call a script's main(argv) in this process with its output in ``log_path``; (error, seconds)."""
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
        error = one_line(err)
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


# torch's warning for an operation with no deterministic implementation (warn_only mode).
NONDETERMINISTIC_WARNING = "does not have a deterministic implementation"


def compare_runs(a, b):
    """``(identical, largest |difference|, what)`` over every member's last checkpoint (weights and
    buffers) and the SharpBalance split's scores of run folders ``a`` and ``b``."""
    checkpoints = run_folder.member_checkpoints(a), run_folder.member_checkpoints(b)
    if set(checkpoints[0]) != set(checkpoints[1]) or not checkpoints[0]:
        return False, float("inf"), f"members {sorted(checkpoints[0])} and {sorted(checkpoints[1])}"
    pairs = []
    for seed, path in checkpoints[0].items():
        states = [torch.load(p, weights_only=True)["state_dict"] for p in (path, checkpoints[1][seed])]
        pairs += [(states[0][k], states[1][k]) for k in states[0]]
    splits = [os.path.join(r, run_folder.SPLIT_NAME) for r in (a, b)]
    if all(os.path.isfile(p) for p in splits):
        pairs.append(tuple(torch.load(p, weights_only=True)["scores"] for p in splits))
    identical = all(torch.equal(x, y) for x, y in pairs)
    worst = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in pairs)
    return identical, worst, f"{len(checkpoints[0])} members' weights and buffers" + (
        ", the split's scores" if all(os.path.isfile(p) for p in splits) else "")


def repeatability(flags, out, settings, timeout):
    """Per setting of ``settings`` (--cudnn), a SharpBalance run straight through against the same
    command killed (SIGKILL, tests/kill_at.py) right after its first member's first
    checkpoint and then rerun, which resumes: {setting: (entry, verdict)}. Equal bit for bit means
    the same algorithms ran both times and the resume is exact. Every run is a fresh main.py
    process (as a user runs it; this process's flags stay out of it), the runs of one wave at once."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    folder = {(s, name): os.path.join(out, "repeat", s, name) for s in settings for name in ("straight", "killed")}
    threads = str(max(1, (os.cpu_count() or 2) // (2 * len(settings))))

    def launch(setting, name, kill, log_name):
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.setdefault("OMP_NUM_THREADS", threads)
        # The tests' kill tool: SIGKILL before the first model_best copy, i.e. right after the first
        # member's first checkpoint.
        killer = [os.path.join(ROOT, "tests", "kill_at.py"), "training.trainer.copy_checkpoint", "1"] if kill else []
        log = open(os.path.join(logs, f"repeat_{setting}_{log_name}.log"), "w")
        process = subprocess.Popen([sys.executable, *killer, os.path.join(ROOT, "main.py"), *flags, "--cudnn", setting,
                                    "--save_path", folder[(setting, name)]], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        return process, log

    def wait(launched, end):
        codes = {}
        for key, (process, log) in launched.items():
            try:
                codes[key] = process.wait(timeout=max(1.0, end - time.perf_counter()))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[key] = None
            log.close()
        return codes

    end = time.perf_counter() + timeout
    first = wait({(s, name): launch(s, name, name == "killed", name) for s in settings
                  for name in ("straight", "killed")}, end)
    resumed = wait({(s, "killed"): launch(s, "killed", False, "resumed") for s in settings
                    if first[(s, "killed")] == -signal.SIGKILL and first[(s, "straight")] == 0}, end)
    found = {}
    for setting in settings:
        paths = [os.path.join(logs, f"repeat_{setting}_{name}.log") for name in ("straight", "killed", "resumed")]
        texts = []
        for path in paths:
            if os.path.isfile(path):
                with open(path) as f:
                    texts.append(f.read())
        if first[(setting, "straight")] != 0 or first[(setting, "killed")] != -signal.SIGKILL \
                or resumed.get((setting, "killed")) != 0:
            codes = (first[(setting, "straight")], first[(setting, "killed")], resumed.get((setting, "killed")))
            found[setting] = ({"error": f"exit statuses {codes}"}, f"FAILED: exit statuses straight/killed/resumed "
                                                                   f"{codes} (expected 0, -9, 0; logs in {logs})")
            continue
        identical, worst, what = compare_runs(folder[(setting, "straight")], folder[(setting, "killed")])
        warned = sum(NONDETERMINISTIC_WARNING in text for text in texts)
        entry = {"identical": identical, "max_abs_difference": worst, "compared": what,
                 "nondeterministic_op_warnings": warned}
        verdict = ("bit-identical" if identical else f"NOT identical (largest difference {worst:.3g})") + f" ({what})"
        if not identical and setting != "deterministic":
            verdict += "; this setting does not promise it"
        if warned:
            verdict += f"; torch warned of an operation without a deterministic implementation (logs in {logs})"
        found[setting] = entry, verdict
    return found


# The smoke part's runs with the options that change how steps are queued, not what they compute:
# SharpBalance on the device against the CPU run (same split masks, losses within
# SMOKE_LOSS_TOLERANCE) and against the device's eager run of the same precision.
GRAPH_SMOKE_RUNS = (("--cuda_graphs",), ("--lockstep",), ("--cuda_graphs", "--lockstep") + FAST_FLAGS)
# SharpBalance with the per-layer hooks scoring a fast-path model (plain fp32 copy): no traceback.
HOOKS_SMOKE_FLAGS = FAST_FLAGS + ("--score_backend", "hooks")
# What training/graphs.py prints when a capture fails (every later step of that member is eager).
CAPTURE_FAILED = "warning: --cuda_graphs: capturing"
# graph_equality's settings: fp32 and the fast path, each under --cudnn deterministic (added there).
EQUALITY_SETTINGS = ((), FAST_FLAGS)


def device_flags(flags, device):
    """``flags`` as main.py accepts them on ``device``: --channels_last is a GPU option (main.py
    refuses it on a CPU, training.accel.cpu_unsafe_flag), so a CPU run goes without it."""
    return tuple(f for f in flags if device.type == "cuda" or f != "--channels_last")


def agreement(run_a, run_b, seeds):
    """How two SharpBalance (or other) run folders agree: split masks (entries differing) and scores
    (largest relative difference) where both have a split, and the largest relative difference of
    the members' final train and validation losses."""
    entry = {}
    splits = [os.path.join(r, run_folder.SPLIT_NAME) for r in (run_a, run_b)]
    if all(os.path.isfile(p) for p in splits):
        masks = [run_folder.read_split(r) for r in (run_a, run_b)]
        scores = [m["scores"].double() for m in masks]
        entry["mask_entries"] = masks[0]["sam_masks"].numel()
        entry["mask_entries_differing"] = int((masks[0]["sam_masks"] != masks[1]["sam_masks"]).sum())
        entry["scores_max_rel_diff"] = float(((scores[0] - scores[1]).abs() / scores[1].abs().clamp_min(1e-30)).max())
    rows = [last_log_rows(r, seeds) for r in (run_a, run_b)]
    entry["final_loss_max_rel_diff"] = max(abs(float(rows[0][seed][key]) / float(rows[1][seed][key]) - 1)
                                           for seed in seeds for key in ("train_loss", "val_loss"))
    return entry


def log_lines(path, prefix):
    """The lines of a run's log that start with ``prefix``."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.startswith(prefix)]


def graph_equality(cfg, device, flags, repeats):
    """The graph-captured steps (training.graphs.StepGraphs) against the eager ones
    (training.steps.sgd_step / mixed_step) on the same batches, from the same weights.

    Two members of ``flags`` (main.py's, with --cudnn deterministic so that both sides pick the same
    cuDNN algorithms), TF32 as the caller left it. Two batches and two masks with the same number
    of SAM rows (one key, two row orders) take turns ``repeats`` times per kind of step (SGD, SAM,
    the mixed step), so every key runs eagerly once, is captured once and replayed; then lr drops
    tenfold as at a milestone (every graph dropped) and the mixed step runs twice more (captured
    again, replayed). The graph side runs on a stream of its own, as a member does in main.py. Loss
    sums per step, weights and buffers (BatchNorm statistics) and momentum buffers are compared with
    ``torch.testing.assert_close``'s default tolerances; raises AssertionError naming the first that
    differs beyond them, or when no step was replayed. Returns the figures. The process's algorithm
    flags and cuBLAS's workspace variable are as before afterwards (the smoke's later runs start
    processes that inherit the environment)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get(CUBLAS_WORKSPACE_ENV))
    try:
        return _graph_equality(cfg, device, flags, repeats)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved[4] is None:
            os.environ.pop(CUBLAS_WORKSPACE_ENV, None)
        else:
            os.environ[CUBLAS_WORKSPACE_ENV] = saved[4]


def _graph_equality(cfg, device, flags, repeats):
    from training.graphs import StepGraphs
    from training.lockstep import member_streams
    from training.steps import base_optimizer, mixed_step, sgd_step
    args = row_arguments(("--cudnn", "deterministic") + tuple(flags), cfg)
    apply_cudnn(args.cudnn)
    eager, graphed = (build_member(args, device) for _ in range(2))
    graphs = StepGraphs(graphed[1], graphed[2], device, freeze_bn_on_perturbed=args.freeze_bn_on_perturbed)
    stream = member_streams(device, 1)[0]
    batch = args.batch_size
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(batch, 3, 32, 32, generator=generator).to(device) for _ in range(2)]
    targets = [torch.randint(0, 10, (batch,), generator=generator).to(device) for _ in range(2)]
    order, count = torch.randperm(batch, generator=generator).numpy(), round(cfg["mixed_fraction"] * batch)
    masks = [np.zeros(batch, dtype=bool), np.zeros(batch, dtype=bool)]
    masks[0][order[:count]], masks[1][order[-count:]] = True, True
    schedule = [(kind, i % 2) for kind in ("sgd", "sam", "mixed") for i in range(2 * repeats)]
    schedule += [("milestone", None)] + [("mixed", i) for i in range(2)]
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(base_optimizer(member[2]), milestones=[1], gamma=0.1)
                  for member in (eager, graphed)]
    losses = {"eager": [], "graphs": []}
    for kind, i in schedule:
        if kind == "milestone":
            for scheduler in schedulers:
                scheduler.step()
            continue
        mask = {"sgd": None, "sam": np.ones(batch, dtype=bool), "mixed": masks[i]}[kind]
        _, model, optimizer = eager
        out = (sgd_step(model, optimizer, images[i], targets[i]) if mask is None
               else mixed_step(model, optimizer, images[i], targets[i], mask))
        losses["eager"].append(out[0].clone())
        with on_stream(stream):
            out = graphs.sgd_step(images[i], targets[i]) if mask is None else graphs.mixed_step(images[i], targets[i],
                                                                                                   mask)
            losses["graphs"].append(out[0].clone())  # a replay's outputs live until the next replay
    synchronize(device)
    if graphs.counts["replayed"] == 0:
        raise AssertionError(f"no step was replayed (counts {graphs.counts})")
    pairs = [("loss sums", torch.stack(losses["eager"]), torch.stack(losses["graphs"]))]
    states = [member[1].state_dict() for member in (eager, graphed)]
    pairs += [(f"'{key}'", states[0][key], states[1][key]) for key in states[0]]
    momenta = [[base_optimizer(member[2]).state[p]["momentum_buffer"] for p in member[1].parameters()]
               for member in (eager, graphed)]
    pairs += [("momentum buffers", torch.cat([m.flatten() for m in momenta[0]]),
               torch.cat([m.flatten() for m in momenta[1]]))]
    worst = max(float((a.double() - b.double()).abs().max()) for _, a, b in pairs)
    for name, a, b in pairs:
        try:
            torch.testing.assert_close(b, a)
        except AssertionError:
            difference = float((a.double() - b.double()).abs().max())
            raise AssertionError(f"{name} differ by up to {difference:.3g}, beyond assert_close's default "
                                 f"tolerances (counts {graphs.counts})") from None
    return {"steps": len(losses["eager"]), "counts": dict(graphs.counts), "identical": worst == 0.0,
            "max_abs_difference": worst, "compared": len(pairs)}


def smoke(args, cfg, device):
    import main as main_script
    import measure_diversity
    import measure_diversity_variance
    import measure_sharpness
    deadline = Deadline(args.budget)
    out = os.path.join(work_dir(args.out), "smoke")
    data = os.path.join(work_dir(args.out), "datasets")
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
    result = {"device": str(device), "runs": {}, "agreement": {}, "measure": {}, "repeatability": {},
              "fast_path": {}, "graphs": {}, "hooks": {}, "graph_equality": {}, "bad_input": {}}

    def log_of(tag, method):
        return os.path.join(out, "logs", f"{tag}_{method}.log")

    def train(tag, method, device_name, extra=()):
        run = os.path.join(out, tag, method)
        error, seconds = run_quietly(main_script.main, common + methods[method] + ["--device", device_name,
                                                                                   "--save_path", run, *extra],
                                     log_of(tag, method))
        result["runs"][f"{tag}/{method}"] = {"error": error, "seconds": round(seconds, 1), "flags": list(extra)}
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
        elif deadline.allows(8, f"CPU run of {method}"):
            runs[("cpu", method)] = train("cpu", method, "cpu")

    def agree_with_cpu(method, a, b):
        entry = agreement(a, b, cfg["smoke_seeds"])
        if "mask_entries_differing" in entry:
            differ = entry["mask_entries_differing"]
            say(f"  split masks: {'identical' if differ == 0 else f'{differ} entries differ'} "
                f"({entry['mask_entries']} entries); scores agree to {entry['scores_max_rel_diff']:.1e} relative")
        entry["ok"] = (entry["final_loss_max_rel_diff"] <= SMOKE_LOSS_TOLERANCE
                       and entry.get("mask_entries_differing", 0) == 0)
        result["agreement"][method] = entry
        say(f"  {method:13s} final train/val losses agree to {entry['final_loss_max_rel_diff']:.3f} relative "
            f"(tolerance {SMOKE_LOSS_TOLERANCE}): {'ok' if entry['ok'] else 'NOT OK'}")

    say("agreement with the CPU:")
    for method in trained:
        a, b = runs.get(("device", method)), runs.get(("cpu", method))
        if a and b:
            isolated(f"agreement of {method}", agree_with_cpu, method, a, b)

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
            if not deadline.allows(8, name):
                continue
            error, seconds = run_quietly(fn, ["--dataset", "digits", "--data_path", data, "--resume", sb, "--device",
                                              str(device), "--save", os.path.join(out, "measure"), *extra],
                                         os.path.join(out, "logs", f"{name}.log"))
            result["measure"][name] = {"error": error, "seconds": round(seconds, 1)}
            say(f"  {name:27s} " + (f"FAILED: {error}" if error else f"ok ({seconds:.1f}s)"))

    say("fast-path flags on the device:")
    # main.py refuses --channels_last on a CPU (training.accel.cpu_unsafe_flag).
    fast_runs = [device_flags(FAST_FLAGS, device)]
    if device.type == "cuda":
        fast_runs.append(("--amp", "fp16", "--channels_last"))
    fast_method = "deep_ensemble" if args.quick else "sharpbalance"
    eager_runs = {(): sb}  # the device's eager SharpBalance run per precision flags
    for i, flags in enumerate(fast_runs):
        if deadline.allows(6, f"main.py {' '.join(flags)}"):
            run = train(f"fast{i}", fast_method, str(device), flags)
            result["fast_path"][" ".join(flags)] = run is not None
            if fast_method == "sharpbalance":
                eager_runs[flags] = run

    say(f"SharpBalance with the step options on {device}, against the CPU run (split masks, final losses within "
        f"{SMOKE_LOSS_TOLERANCE}) and the eager run of the same precision on {device}:")
    cpu_sb = runs.get(("cpu", "sharpbalance"))

    def step_option_run(tag, flags):
        """SharpBalance with ``flags``: against the CPU run and the device's eager run, no failed capture."""
        run = train(tag, "sharpbalance", str(device), flags)
        entry = result["graphs"][" ".join(flags)] = {"error": result["runs"][f"{tag}/sharpbalance"]["error"],
                                                     "ok": False}
        if not run:
            return
        entry["capture_failures"] = log_lines(log_of(tag, "sharpbalance"), CAPTURE_FAILED)
        parts = [f"{len(entry['capture_failures'])} failed captures"]
        if cpu_sb:
            entry.update(agreement(run, cpu_sb, cfg["smoke_seeds"]))
            parts.insert(0, f"split masks {'identical' if entry['mask_entries_differing'] == 0 else 'DIFFER'}, "
                            f"losses {entry['final_loss_max_rel_diff']:.3f} from the CPU's")
        else:
            parts.insert(0, "no CPU run to compare with")
        eager = eager_runs.get(tuple(f for f in flags if f not in ("--cuda_graphs", "--lockstep")))
        if eager:
            entry["eager_loss_max_rel_diff"] = agreement(run, eager, cfg["smoke_seeds"])["final_loss_max_rel_diff"]
            parts.append(f"losses {entry['eager_loss_max_rel_diff']:.2g} from the eager run's")
        entry["ok"] = (entry.get("mask_entries_differing") == 0 and not entry["capture_failures"]
                       and entry["final_loss_max_rel_diff"] <= SMOKE_LOSS_TOLERANCE)
        say(f"    {'; '.join(parts)}: {'ok' if entry['ok'] else 'NOT OK'}")
        for line in entry["capture_failures"][:2]:
            say(f"    {line}")

    def hooks_run(flags):
        """SharpBalance scoring a fast-path model with the hooks: it must end without a traceback."""
        run = train("hooks", "sharpbalance", str(device), flags)
        with open(log_of("hooks", "sharpbalance")) as f:
            text = f.read()
        entry = result["hooks"] = {"flags": list(flags), "error": result["runs"]["hooks/sharpbalance"]["error"],
                                   "traceback": "Traceback" in text,
                                   "fallbacks": [line for line in text.splitlines()
                                                 if line.startswith("warning: --score_backend")]}
        entry["ok"] = run is not None and not entry["traceback"]
        say(f"    {'no traceback' if entry['ok'] else 'FAILED'}; the hooks fell back to torch.func "
            f"{len(entry['fallbacks'])} times (a warning line each)")

    for i in cfg["smoke_graph_runs"]:
        flags = device_flags(GRAPH_SMOKE_RUNS[i], device)
        if deadline.allows(6, "main.py " + " ".join(flags)):
            isolated("main.py " + " ".join(flags), step_option_run, f"graphs{i}", flags)
    hooks_flags = device_flags(HOOKS_SMOKE_FLAGS, device)
    if deadline.allows(6, "main.py " + " ".join(hooks_flags)):
        isolated("main.py " + " ".join(hooks_flags), hooks_run, hooks_flags)

    say("graph-captured steps against the eager steps (same batches and weights, --cudnn deterministic, TF32 off):")
    for flags in EQUALITY_SETTINGS:
        flags = device_flags(flags, device)
        label = " ".join(flags) or "fp32"
        if not deadline.allows(4, f"graph equality, {label}"):
            continue
        got, error = isolated(f"graph equality, {label}", graph_equality, cfg, device, flags,
                              cfg["graph_equality_steps"])
        result["graph_equality"][label] = got or {"error": error}
        if got:
            same = ("bit-identical" if got["identical"] else
                    f"within assert_close's default tolerances (largest difference {got['max_abs_difference']:.2g})")
            counts = ", ".join(f"{n} {k}" for k, n in got["counts"].items())
            how = "CUDA graphs" if device.type == "cuda" else "CPU stand-in, no capture"
            say(f"  {label:28s} {got['steps']} steps ({counts}; {how}): loss sums, weights, BatchNorm statistics, "
                f"momentum buffers {same}")

    # --cudnn deterministic promises bit-reproducible runs and resumes; the default is reported.
    settings = ("deterministic", "benchmark")[:cfg["repeat_settings"]]
    if deadline.allows(20, "repeatability"):
        say(f"repeatability on {device} (SharpBalance, 2 epochs, killed after the first checkpoint and resumed, "
            "against a straight run; fresh processes):")
        found, _ = isolated("repeatability", repeatability, common + methods["sharpbalance"]
                            + ["--device", str(device), "--epochs", "2"], out, settings,
                            timeout=max(10, deadline.left() - 12))
        for setting, (entry, verdict) in (found or {}).items():
            result["repeatability"][setting] = entry
            say(f"  --cudnn {setting:13s} {verdict}")

    say("bad input on the device:")
    bad = {"--device cuda:99": ["--device", "cuda:99"], "--amp fp16 on the CPU": ["--device", "cpu", "--amp", "fp16"]}
    for label, flags in bad.items():
        error, _ = run_quietly(main_script.main, common + ["--save_path", os.path.join(out, "bad"), *flags],
                               os.path.join(out, "logs", "bad_input.log"))
        result["bad_input"][label] = error
        say(f"  {label:22s} -> {error}")
    # Last: three processes starting CUDA take the longest, and the previous check ran it already.
    if device.type == "cuda" and deadline.allows(25, "torchrun with 3 ranks on one GPU"):
        run = os.path.join(out, "torchrun", "sharpbalance")
        entry, verdict = torchrun_one_device(common + methods["sharpbalance"] + ["--device", str(device)], run, sb,
                                             timeout=max(10, deadline.left() - 2))
        result["torchrun_3_ranks_one_gpu"] = entry
        say(f"  torchrun --nproc_per_node=3 on one GPU (gloo collectives): {verdict}")
    save_part(args.out, "smoke", result)


# ----------------------------------------------------------------------------------------- project rows

@functools.lru_cache(maxsize=4)
def synthetic(n, size, classes, seed=0):
    """uint8 (n, size, size, 3) images whose mean colour follows the label, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    noise = rng.integers(0, 96, (n, size, size, 3), dtype=np.uint8)
    return noise + (labels * 37 % 160).astype(np.uint8)[:, None, None, None], labels.astype(np.int64)


def row_arguments(flags, cfg):
    """main.py's arguments for a row: the bench's width, batch and lr, then the row's flags, parsed
    by main.py's own parser (a row can use any flag main.py has, and gets its defaults)."""
    import main as main_script
    parser = main_script.get_parser()

    def refuse(message):  # argparse would print usage and exit: one line instead
        raise ValueError(f"main.py refuses {' '.join(flags)}: {message}")
    parser.error = refuse
    return parser.parse_args(["--width", str(cfg["width"]), "--batch_size", str(cfg["batch"]), "--lr", "0.05",
                              "--sam", "True", *flags])


class StepMarks:
    """Time marks between training steps: CUDA events on a GPU (the host never waits for the device
    between steps), the host clock elsewhere (where an operation has finished when it returns)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self):
        """Seconds between consecutive marks (waits for the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class MarkedLoader:
    """A loader for train_one_epoch that marks the time before its first batch and after every
    step, and ends the epoch after ``cap`` seconds (host clock) or ``max_steps`` steps."""

    def __init__(self, loader, marks, cap=None, max_steps=None):
        self.loader, self.marks, self.cap, self.max_steps = loader, marks, cap, max_steps

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()
        self.marks.mark()
        for steps, batch in enumerate(self.loader, start=1):
            yield batch
            self.marks.mark()  # the step's work is queued: the mark follows it on the device
            if (self.max_steps and steps >= self.max_steps) or (self.cap is not None
                                                                and time.perf_counter() - start >= self.cap):
                return


class StoppableLoader:
    """A member's loader in a lockstep pass: ends the epoch once ``stop[0]`` is set (by the pass's
    round marker), so that every member stops after the same step."""

    def __init__(self, loader, stop):
        self.loader, self.stop = loader, stop

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            if self.stop[0]:
                return


@contextlib.contextmanager
def on_stream(stream):
    """Queue the block's work on ``stream`` (None: the current stream), ordered after what the
    current stream holds and before what it gets next, as run_in_lockstep orders a member's stream."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


def build_member(args, device, classes=10, dataset="cifar10", seed=0):
    """``(fast, model, optimizer)`` of one member as main.py builds it for ``args``
    (training.trainer.Member): seed, model, fast path, SAM around SGD."""
    from models import create_model
    from training.accel import FastPath
    from training.sam import SAM
    torch.manual_seed(seed)
    fast = FastPath.from_args(args, device)
    if args.compile and fast.compile_backend is None:
        raise RuntimeError("torch.compile is unavailable here (the line above says why)")
    model = fast.prepare(create_model(args.model, classes, width=args.width, dataset=dataset,
                                      shortcut_scale=args.shortcut_scale).to(device))
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay)
    return fast, model, optimizer


def graph_key(batch_size, num_sam):
    """The key training.graphs.StepGraphs files a step under: ("sgd", B, 0) for a plain step or a
    batch without SAM samples, else ("mixed", normal samples, SAM samples); plain SAM is
    ("mixed", 0, B). (tests/test_gpu_check.py checks it against the keys StepGraphs keeps.)"""
    return ("sgd", batch_size, 0) if num_sam == 0 else ("mixed", batch_size - num_sam, num_sam)


def graph_events(graphs, keys):
    """For each step of ``keys``, in order, the one-time costs StepGraphs pays on it, from its
    current state: 1 when the key is new (its first step runs eagerly, and cuDNN meets its
    sub-batch sizes there) or has run once (its second step is captured), else 0 (replayed, or
    eager past the bound). All 0 once a capture has failed (every step eager from then on). The
    bench never changes lr, so no graph is dropped."""
    if not graphs.enabled:
        return [0] * len(keys)
    warmed, captured, events = set(graphs.warmed), set(graphs.graphs), []
    for key in keys:
        if key not in warmed:
            warmed.add(key)
            events.append(1)
        elif key not in captured and len(captured) < graphs.limit:
            captured.add(key)
            events.append(1)
        else:
            events.append(0)
    return events


class Bench:
    """One member of a project row: main.py's model, fast path, cuDNN setting, optimizer and (with
    --cuda_graphs) step graphs for the row's flags, on synthetic images resident on the device.
    ``seen`` holds the batch sizes its training steps have met: cuDNN works out its plans once per
    size (and per process). ``data_from``: another member of the same row, whose images (one copy
    on the device) and ``seen`` it shares. ``stream``: the CUDA stream its training is queued on
    (set by make_benches; None: the current stream)."""

    def __init__(self, cfg, device, flags=(), size=32, classes=10, images=None, dataset="cifar10", seed=0,
                 data_from=None):
        from data.arrays import BatchLoader, ImageArrayDataset
        from training.graphs import StepGraphs, member_graphs
        self.args = row_arguments(flags, cfg)
        apply_cudnn(self.args.cudnn)
        self.cfg, self.device, self.BatchLoader, self.seed = cfg, device, BatchLoader, seed
        self.batch = self.args.batch_size
        if data_from is None:
            images, labels = synthetic(images or cfg["images"], size, classes, seed)
            self.train_set = ImageArrayDataset(images, labels, MEAN, STD, augment=True)
            self.eval_set = self.train_set.with_options(augment=False)
            # Scoring wants every sample of its split: a split of the first score_images images.
            n = min(cfg["score_images"], len(labels))
            self.score_set = ImageArrayDataset(images[:n], labels[:n], MEAN, STD)
            self.train_set.tensors_on(device)  # every image resident on the device, once
            self.seen = set()
        else:
            self.train_set, self.eval_set = data_from.train_set, data_from.eval_set
            self.score_set, self.seen = data_from.score_set, data_from.seen
        self.fast, self.model, self.optimizer = build_member(self.args, device, classes, dataset, seed)
        # As main.py: a StepGraphs with --cuda_graphs on CUDA, else None. Elsewhere (the tests on a
        # CPU) the row gets StepGraphs' CPU stand-in, whose replays run the recorded step eagerly on
        # the static buffers: the row's bookkeeping runs, its timings are those of eager steps.
        self.graphs = member_graphs(self.args, self.model, self.optimizer, device)
        if self.graphs is None and self.args.cuda_graphs:
            self.graphs = StepGraphs(self.model, self.optimizer, device,
                                     freeze_bn_on_perturbed=self.args.freeze_bn_on_perturbed)
        self.stream = None
        rng = np.random.default_rng(seed + 1)
        self.host_mask = rng.random(len(self.train_set)) < cfg["mixed_fraction"]
        self.mask = torch.as_tensor(self.host_mask)

    def sam_count(self, kind, indices):
        """How many of the samples ``indices`` a ``kind`` step trains with SAM."""
        if kind == "sgd":
            return 0
        return len(indices) if kind == "sam" else int(self.host_mask[indices.numpy()].sum())

    def sizes(self, kind, indices):
        """The batch sizes the convolutions meet in one ``kind`` step on the samples ``indices``."""
        sam = self.sam_count(kind, indices)
        return {size for size in (len(indices) - sam, sam) if size}

    def graph_keys(self, kind, batches):
        return [graph_key(len(indices), self.sam_count(kind, indices)) for indices in batches]

    def train_epoch(self, kind, loader):
        """The project's epoch loop over ``loader``: SGD, SAM, or the mixed step with the bench's
        mask; graph-captured steps with --cuda_graphs, on the bench's stream."""
        from training.engine import train_one_epoch
        with on_stream(self.stream):
            train_one_epoch(self.model, self.optimizer, loader, 0, use_sam=kind != "sgd",
                            sam_mask=self.mask if kind == "mixed" else None, progress=False, scaler=self.fast.scaler,
                            graphs=self.graphs)

    def epoch_batches(self, epoch=0):
        """The sample indices of every step of training epoch ``epoch``, in the loader's own order."""
        loader = self.BatchLoader(self.eval_set, self.batch, self.device, shuffle=True, seed=self.seed)
        loader.set_epoch(epoch)
        return [indices for _, _, indices in loader]

    def train_pass(self, kind, batches, cap=None, max_steps=None):
        """Train on ``batches`` (index tensors, one per step) in order, until ``cap`` seconds or
        ``max_steps`` steps; returns the seconds of every step run."""
        loader = self.BatchLoader(self.train_set, self.batch, self.device, subset=torch.cat(batches))
        marks = StepMarks(self.device)  # recorded on the bench's stream, where train_epoch queues the steps
        self.train_epoch(kind, MarkedLoader(loader, marks, cap, max_steps))
        seconds = marks.seconds()
        for indices in batches[:len(seconds)]:
            self.seen |= self.sizes(kind, indices)
        return seconds

    def start_libraries(self):
        """One SGD step on 2 images: CUDA's, cuBLAS's and cuDNN's own start-up falls here, not on
        the first size of the first timed row (and SGD's momentum buffers exist before a capture)."""
        self.train_pass("sgd", [torch.arange(2)])

    def loader(self, steps, offset=0):
        subset = (offset + np.arange(steps * self.batch)) % len(self.train_set)
        return self.BatchLoader(self.train_set, self.batch, self.device, shuffle=True, seed=offset, subset=subset)

    def train_steps(self, kind, steps, offset=0):
        self.train_epoch(kind, self.loader(steps, offset))
        return steps * self.batch

    def score(self, backend):
        from training.scores import squared_grad_norms
        loader = self.BatchLoader(self.score_set, self.batch, self.device)
        squared_grad_norms(self.model, loader, self.device, backend=backend)
        return len(self.score_set)

    def evaluate(self, n):
        from training.engine import evaluate
        n = min(n, len(self.eval_set))
        evaluate(self.model, self.BatchLoader(self.eval_set, self.args.eval_batch_size, self.device,
                                              subset=np.arange(n)))
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


def make_benches(row, cfg, device):
    """The row's members: one Bench, or ``row.members`` sharing one copy of the images. As in
    main.py, members with --cuda_graphs or --lockstep get a CUDA stream each (member_streams), after
    what their loaders share is made on the current stream."""
    from training.lockstep import member_streams
    first = Bench(cfg, device, row.flags)
    benches = [first] + [Bench(cfg, device, row.flags, seed=m, data_from=first) for m in range(1, row.members)]
    if first.args.cuda_graphs or first.args.lockstep:
        next(iter(first.BatchLoader(first.train_set, first.batch, device)), None)
        for bench, stream in zip(benches, member_streams(device, len(benches))):
            bench.stream = stream
    return benches


def lockstep_pass(benches, kind, batches, cap=None, max_steps=None):
    """Train every bench of a lockstep row on ``batches`` (the same samples; each member its own
    mask and graphs) as main.py --lockstep does: ``training.lockstep.run_in_lockstep`` over the
    members' ``train_epoch_steps``, each on its own stream, step i of every member before step i+1.
    A round marker after the members marks the end of every round (on CUDA: an event on the current
    stream after it waits for every member stream) and stops the members after ``cap`` seconds
    (host clock) or ``max_steps`` rounds. Returns the seconds of every round."""
    from training.engine import train_epoch_steps
    from training.lockstep import run_in_lockstep
    device = benches[0].device
    streams = [bench.stream for bench in benches]
    marks, stop, finished = StepMarks(device), [False], [0]

    def member(bench):
        loader = StoppableLoader(bench.BatchLoader(bench.train_set, bench.batch, device, subset=torch.cat(batches)),
                                 stop)
        yield from train_epoch_steps(bench.model, bench.optimizer, loader, 0, use_sam=kind != "sgd",
                                     sam_mask=bench.mask if kind == "mixed" else None, progress=False,
                                     scaler=bench.fast.scaler, graphs=bench.graphs)
        finished[0] += 1

    def rounds():
        start = time.perf_counter()
        while finished[0] < len(benches):
            if device.type == "cuda":
                current = torch.cuda.current_stream(device)
                for stream in streams:
                    current.wait_stream(stream)
            marks.mark()
            done = len(marks.marks) - 1
            if (max_steps and done >= max_steps) or (cap is not None and time.perf_counter() - start >= cap):
                stop[0] = True
            yield

    marks.mark()
    run_in_lockstep([member(bench) for bench in benches] + [rounds()], streams + [None])
    seconds = marks.seconds()
    for indices in batches[:len(seconds)]:
        for bench in benches:
            bench.seen |= bench.sizes(kind, indices)
    return seconds


def epoch_estimate(cold, warm, images, new_sizes, warm_images=None):

    """An epoch's figures from two passes over its first steps.

    ``images[i]`` and ``new_sizes[i]``: the images of step i and how many batch sizes it meets for
    the first time, for every step of the epoch (with graph-captured steps: how many graph events,
    see step_novelty; "size" below stands for either). ``cold[i]``: seconds of step i in the first
    pass (the epoch from its start, possibly cut short), where a new size pays cuDNN's per-shape
    work; ``warm[i]``: seconds of the same steps run again, every size known (``warm_images``: the
    images of each warm step; by default the first pass's; a short first pass is repeated in the
    second).

    Later epochs run at the warm rate. A new size costs what its steps took over their warm time,
    per new size (noise that makes it negative counts as 0). A cut first pass is completed by its
    remaining steps at the warm rate plus their new sizes at that cost: ``extrapolated``.
    """
    warm_images = images[:len(warm)] if warm_images is None else warm_images
    steps, run = len(images), len(cold)
    compared = min(run, len(warm))
    warm_rate = sum(warm_images) / sum(warm)
    compared_new = sum(new_sizes[:compared])
    extra = sum(c - w for c, w, new in zip(cold[:compared], warm[:compared], new_sizes) if new)
    new_size_s = max(0.0, extra / compared_new) if compared_new else None
    first = sum(cold)
    if run < steps:
        first += sum(images[run:]) / warm_rate + (new_size_s or 0.0) * sum(new_sizes[run:])
    return {"img_per_s": warm_rate, "warm_epoch_s": sum(images) / warm_rate, "first_epoch_s": first,
            "steps": steps, "steps_run": run, "steps_compared": compared, "warm_steps": len(warm),
            "extrapolated": run < steps, "new_sizes": sum(new_sizes), "new_sizes_compared": compared_new,
            "extra_s": max(0.0, extra), "new_size_s": new_size_s}


def step_novelty(benches, kind, batches):
    """For each step of ``batches``, the one-time costs the row's members meet on it, summed over
    them: batch sizes new to the process (cuDNN works out its plans once per size and process), or,
    with graph-captured steps, graph events (graph_events: each member has graphs of its own)."""
    if benches[0].graphs is not None:
        per_member = [graph_events(bench.graphs, bench.graph_keys(kind, batches)) for bench in benches]
        return [sum(step) for step in zip(*per_member)]
    seen, new = set(benches[0].seen), []
    for indices in batches:
        sizes = set().union(*(bench.sizes(kind, indices) for bench in benches))
        new.append(len(sizes - seen))
        seen |= sizes
    return new


def graph_counts(benches):
    """StepGraphs.counts summed over the members (None without graph-captured steps)."""
    if benches[0].graphs is None:
        return None
    return {key: sum(bench.graphs.counts[key] for bench in benches) for key in benches[0].graphs.counts}


def capture_pending(benches, kind, batches, cap):
    """With graph-captured steps: run, untimed, one step of every key of ``batches`` that has run
    eagerly but has no graph yet (its next step would be its capture), so that the second pass
    replays only; each member stops after its share of ``cap`` seconds (a key left over is captured
    in the second pass, which then says so). A last partial batch stays last."""
    for bench in benches:
        if bench.graphs is None or not bench.graphs.enabled:
            continue
        pending = {}
        for indices, key in zip(batches, bench.graph_keys(kind, batches)):
            if key in bench.graphs.warmed and key not in bench.graphs.graphs:
                pending.setdefault(key, indices)
        if pending:
            bench.train_pass(kind, sorted(pending.values(), key=lambda indices: len(indices) < bench.batch),
                             cap / len(benches))


def measure_epoch(benches, kind, cold_cap, warm_cap, max_steps, min_warm_steps):
    """``kind``'s steps over a training epoch of the bench's images (see epoch_estimate); several
    benches train in lockstep (lockstep_pass: a step is then a round, one step of every member, and
    the figures are their aggregate). A first pass cut after fewer than ``min_warm_steps`` full
    batches (a slow step per new size) is repeated in the second, so that the warm rate rests on
    enough steps. With graph-captured steps the one-time costs are graph events (step_novelty), the
    keys met once in the first pass are captured before the second (capture_pending), and the
    entry reports the graphs' counts over the phase, the first pass's events, expected and seen
    (they differ only when a capture failed or the bound on graphs was reached), and the second
    pass's steps that were not replays (0 unless a capture failed or the bound was reached)."""
    bench, members = benches[0], len(benches)
    run_pass = bench.train_pass if members == 1 else functools.partial(lockstep_pass, benches)
    batches = bench.epoch_batches()
    new = step_novelty(benches, kind, batches)
    before = graph_counts(benches)
    reset_peak(bench.device)
    cold = run_pass(kind, batches, cold_cap, max_steps)
    first = batches[:len(cold)]
    after_cold = graph_counts(benches)
    capture_pending(benches, kind, first, cold_cap)
    full = all(len(b) == bench.batch for b in first)  # a last partial batch must stay last
    again = first * (math.ceil(min_warm_steps / len(first)) if full else 1)
    before_warm = graph_counts(benches)
    warm = run_pass(kind, again, warm_cap)
    got = dict(epoch_estimate(cold, warm, [members * len(b) for b in batches], new,
                              [members * len(b) for b in again[:len(warm)]]),
               peak_gib=peak_gib(bench.device), members=members)
    if before is not None:
        after = graph_counts(benches)
        got["graphs"] = {"counts": {key: after[key] - before[key] for key in after},
                         "events_expected": sum(new[:len(cold)]),
                         "events_seen": sum(after_cold[k] - before[k] for k in ("eager", "captured")),
                         "second_pass_not_replayed": sum(after[k] - before_warm[k] for k in ("eager", "captured")),
                         "held": sum(len(b.graphs.graphs) for b in benches),
                         "failed": sum(not b.graphs.enabled for b in benches),
                         "how": "CUDA graphs" if bench.device.type == "cuda" else "CPU stand-in, no capture"}
    return got


def measure_phase(bench, phase, cfg):
    """Scoring or evaluation: one untimed run, then one timed run."""
    start = time.perf_counter()
    if phase.startswith("score_"):
        backend = phase.split("_", 1)[1]
        bench.score(backend)
        warm = time.perf_counter() - start
        rate, seconds, peak = bench.timed(bench.score, backend)
    else:
        bench.evaluate(1000)
        warm = time.perf_counter() - start
        rate, seconds, peak = bench.timed(bench.evaluate, cfg["eval_images"])
    return {"img_per_s": rate, "seconds": seconds, "peak_gib": peak, "warm_up_s": warm}


def describe_epoch(got):
    run = (f"{got['steps_run']}/{got['steps']} {'rounds' if got.get('members', 1) > 1 else 'steps'} run, rest "
           "extrapolated" if got["extrapolated"] else "whole epoch")
    per_size = "n/a" if got["new_size_s"] is None else f"{got['new_size_s']:.3f} s"
    what = "graph event" if "graphs" in got else "new size"
    return (f"epoch 1 {got['first_epoch_s']:7.2f} s ({run}); later epochs {got['warm_epoch_s']:7.2f} s = "
            f"{got['img_per_s']:7.0f} img/s; {got['new_sizes']} {what}{'' if got['new_sizes'] == 1 else 's'}, "
            f"{per_size} each")


def describe_graphs(got):
    """The graphs' counts over a phase (graph events: a key's eager first step, or its capture)."""
    graphs = got["graphs"]
    counts = ", ".join(f"{n} {key}" for key, n in graphs["counts"].items())
    line = (f"graphs: {counts}; {graphs['held']} held; first pass {graphs['events_seen']} events "
            f"(expected {graphs['events_expected']}) [{graphs['how']}]")
    if graphs["second_pass_not_replayed"]:
        line += f"; {graphs['second_pass_not_replayed']} steps of the second pass were not replays"
    if graphs["failed"]:
        line += f"; a capture FAILED for {graphs['failed']} member(s): their later steps ran eagerly"
    return line


def three_member_neighbours(summary, row):
    """For a lockstep row: the bare step on three streams (its reference row) and the same precision
    in three processes (the shared part), per phase, as measured so far in this run."""
    reference = summary["parts"].get("reference", {}).get("rows", {}).get(row.reference, {})
    label = next((name for name, ref in SHARED_REFERENCE.items() if ref == row.reference), None)
    shared_rows = summary["parts"].get("shared", {}).get("rows", {}).get(label, {})
    found = {}
    for phase in TRAIN_PHASES:
        pair = {}
        if ok(reference.get(phase)):
            pair["bare step on 3 streams"] = reference[phase]["img_per_s"]
        if isinstance(shared_rows.get(phase), dict) and "aggregate_img_per_s" in shared_rows[phase]:
            pair[f"3 processes ({label})"] = shared_rows[phase]["aggregate_img_per_s"]
        found[phase] = pair
    return found


def measure_row(row, cfg, device, deadline, entry, save, neighbours=None):
    """Every phase of ``row`` into ``entry``, each isolated; caps shrink to what the budget allows.
    ``neighbours``: per phase, other three-member figures to print next to a lockstep row's."""
    benches, error = isolated(row.label, make_benches, row, cfg, device)
    if error:
        entry["error"] = error
        return
    for i, bench in enumerate(benches):
        isolated(f"{row.label} start-up step, member {i}", bench.start_libraries)
    # With graph-captured steps, a pass between the two (capture_pending) takes up to the first
    # pass's cap.
    share = (0.4, 0.2) if row.graphs else (0.7, 0.3)
    for phase in row.phases:
        if phase in TRAIN_PHASES:
            cold_cap = cfg["whole_epoch_cap"] if row.whole_epoch and phase == "mixed" else cfg["cold_cap"][phase]
            cold_cap, warm_cap = cold_cap * row.cap_scale, cfg["warm_cap"][phase] * row.cap_scale
            if not deadline.allows(0 if cfg.get("quick") else 3, f"{row.label} {phase}"):
                entry.setdefault("skipped", []).append(phase)
                continue
            room = max(1.0, deadline.left() - 2)
            cold_cap, warm_cap = min(cold_cap, share[0] * room), min(warm_cap, share[1] * room)
            whole = row.whole_epoch and phase == "mixed"
            got, error = isolated(f"{row.label} {phase}", measure_epoch, benches, phase, cold_cap, warm_cap,
                                  None if whole else cfg["max_cold_steps"], cfg["min_warm_steps"])
            if got:
                say(f"  {row.label:34s} {phase:11s} {describe_epoch(got)}   peak {gib(got['peak_gib'])}")
                if "graphs" in got:
                    say(f"  {'':34s} {'':11s} {describe_graphs(got)}")
                if row.members > 1:
                    others = "; ".join(f"{name} {rate:.0f}" for name, rate in (neighbours or {}).get(phase, {}).items())
                    say(f"  {'':34s} {'':11s} {row.members} members in lockstep, aggregate {got['img_per_s']:.0f} "
                        f"img/s; " + (others or "no three-member figures from the reference and shared parts yet"))
        else:
            if not deadline.allows(0 if cfg.get("quick") else 6, f"{row.label} {phase}"):
                entry.setdefault("skipped", []).append(phase)
                continue
            got, error = isolated(f"{row.label} {phase}", measure_phase, benches[0], phase, cfg)
            if got:
                say(f"  {row.label:34s} {phase:11s} {got['img_per_s']:10.0f} img/s   peak {gib(got['peak_gib'])}   "
                    f"(warm-up {got['warm_up_s']:.1f}s)")
        entry[phase] = got if got else {"error": error}
        save()


def tiny_row(cfg, device, flags):
    """SGD img/s of the Tiny-ImageNet model on 64x64 images (fixed steps after warm-up steps)."""
    bench = Bench(cfg, device, flags, size=64, classes=200, images=cfg["tiny_images"], dataset="tiny_imgnet")
    bench.train_steps("sgd", cfg["warm_steps"], offset=1)
    rate, seconds, peak = bench.timed(bench.train_steps, "sgd", cfg["tiny_steps"], 2)
    return {"img_per_s": rate, "seconds": seconds, "peak_gib": peak}


def project_part(part):
    """The part that measures the PROJECT_ROWS whose ``part`` is ``part`` (throughput also the tiny rows)."""
    def run(args, cfg, device):
        deadline = Deadline(args.budget)
        rows, tiny = {}, {}
        result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "config": cfg, "rows": rows, "tiny": tiny}

        def save():
            save_part(args.out, part, result)

        chosen = [row for row in PROJECT_ROWS if row.part == part]
        say(f"{part}: ResNet18 width {cfg['width']}, {cfg['images']} synthetic 32x32 images resident on {device}, "
            f"batch {cfg['batch']}, mixed f = {cfg['mixed_fraction']}; rows: {', '.join(r.label for r in chosen)}")
        if part == "throughput":  # first: a few seconds, and every Tiny-ImageNet projection needs them
            say("Tiny-ImageNet shape (64x64, 200 classes), SGD only, for the projections' cost ratio:")
            for kind, (label, flags) in TINY_ROWS.items():
                if not deadline.allows(0 if args.quick else 6, label):
                    continue
                got, error = isolated(label, tiny_row, cfg, device, flags)
                tiny[kind] = dict(got or {"error": error}, label=label)
                if got:
                    say(f"  {label:34s} sgd         {got['img_per_s']:10.0f} img/s   peak {gib(got['peak_gib'])}")
        say("project rows (SGD, SAM and mixed: a first pass over the epoch from its start, cut at a time limit, "
            "then its first steps again; later epochs run at the second pass's rate):")
        summary = read_summary(args.out)
        for row in chosen:
            rows[row.label] = {"flags": list(row.flags), "kind": row.kind, "members": row.members}
            if deadline.allows(0 if args.quick else 8, f"row {row.label}"):
                neighbours = three_member_neighbours(summary, row) if row.members > 1 else None
                measure_row(row, cfg, device, deadline, rows[row.label], save, neighbours)
            else:
                rows[row.label]["skipped"] = list(row.phases)
            save()
            if device.type == "cuda":
                gc.collect()  # the row's graphs and their memory pools go with its benches
                torch.cuda.empty_cache()
        save()
        return 0
    return run

# ----------------------------------------------------------------------------------------- reference

def reference_row(cfg, device, amp, channels_last, members, phase, batch):
    """One bare reference row: ``members`` bare members, each step graphed, timed together."""
    from bare_step import BareMember, graphed, time_members
    bare = [BareMember(device, width=cfg["width"], batch=batch, amp=amp, channels_last=channels_last, seed=m)
            for m in range(members)]
    runs, how = [], None
    reset_peak(device)
    for member in bare:
        run, how = graphed(getattr(member, phase), device, warmup=cfg["reference_warm"])
        runs.append(run)
    seconds = time_members(runs, device, warm=cfg["reference_warm"], timed=cfg["reference_timed"])
    return {"img_per_s": members * batch * cfg["reference_timed"] / seconds, "seconds": seconds, "how": how,
            "members": members, "batch": batch, "peak_gib": peak_gib(device)}


def reference(args, cfg, device):
    from bare_step import BareMember, training_flops_per_image
    deadline = Deadline(args.budget)
    apply_cudnn("benchmark")
    rows = {}
    flops = training_flops_per_image(BareMember("cpu", width=cfg["width"], batch=1).model, (3, 32, 32))
    result = {"device": str(device), "rows": rows, "training_flops_per_image": flops}
    say(f"reference: the bare step of the same ResNet18 (width {cfg['width']}, batch {cfg['batch']}, static data on "
        f"{device}), {cfg['reference_timed']} timed steps after {cfg['reference_warm']}; "
        f"{flops / 1e9:.2f} GFLOP to train on one image")
    for label, amp, channels_last, members, phases, batch_key in REFERENCE_ROWS:
        for phase in phases:
            if not deadline.allows(0 if args.quick else 4, f"{label} {phase}"):
                continue
            got, error = isolated(f"{label} {phase}", reference_row, cfg, device, amp, channels_last, members, phase,
                                  cfg[batch_key])
            rows.setdefault(label, {})[phase] = got or {"error": error}
            if got:
                tflops = got["img_per_s"] * flops / 1e12
                say(f"  {label:48s} {phase:4s} {got['img_per_s']:10.0f} img/s  {tflops:7.2f} TFLOP/s  "
                    f"peak {gib(got['peak_gib'])}  [{got['how']}]")
            save_part(args.out, "reference", result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save_part(args.out, "reference", result)
    return 0


# ----------------------------------------------------------------------------------------- shared

def flags_of(label):
    return next(row.flags for row in PROJECT_ROWS if row.label == label)


def shared_worker(rank, members, cfg, device_name, barrier, queue):
    """One member: every phase of every label, each started together with the other members."""
    device = torch.device(device_name)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // members))
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = False  # as in main(): the channels_last rows on a CPU
    for label in SHARED_LABELS:
        bench = Bench(cfg, device, flags_of(label), seed=rank)
        for phase in SHARED_PHASES:
            if phase == "eval":
                bench.evaluate(1000)
            else:
                bench.train_steps(phase, cfg["warm_steps"], offset=1)
            synchronize(device)
            reset_peak(device)
            barrier.wait()  # the members start each phase together
            start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            images = (bench.evaluate(cfg["eval_images"]) if phase == "eval"
                      else bench.train_steps(phase, cfg["timed_steps"], 2))
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
    say(f"{members} members at once on {device} (one process each, phases started together, "
        f"{cfg['timed_steps']} steps after {cfg['warm_steps']}): aggregate img/s")
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
            save_part(args.out, "shared", result)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
    save_part(args.out, "shared", result)
    return 0 if len(result["rows"].get(SHARED_LABELS[-1], {})) == len(SHARED_PHASES) else 1


# ----------------------------------------------------------------------------------------- projection

DATASETS = {  # training images, validation images (per epoch), test + -C images, image side
    "CIFAR-10": dict(train=45000, val=5000, side=32, measure_images=10000 * (1 + 75)),
    "CIFAR-100": dict(train=45000, val=5000, side=32, measure_images=10000 * (1 + 75)),
    "Tiny-ImageNet": dict(train=90000, val=10000, side=64, measure_images=10000 * (1 + 75)),
}
EPOCHS, SPLIT_AFTER, MEMBERS, SEED_TRIPLES = 200, 101, 3, 3
PROJECTED_BATCH = 128  # main.py's --batch_size: the runs projected
METHODS = ("deep_ensemble", "sam", "sharpbalance")


def binomial_pmf(n, p):
    return [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]


def expected_distinct_sizes(batch, fraction, n_images, epochs, known=()):
    """Expected number of distinct batch sizes the mixed step's convolutions meet in ``epochs``
    epochs of ``n_images`` images, counting the sizes in ``known`` (met before) as met.

    A step of b images with s SAM samples (s ~ Binomial(b, fraction): each image is a SAM sample
    with probability ``fraction``) runs sub-batches of s and b - s images (an empty one runs
    nothing; s = 0 or s = b runs the whole batch, size b). An epoch has n_images // batch full steps
    and one of n_images % batch images. A size x is met in a step of b images with probability
    q_b(x) = P(s = x) + P(s = b - x) (once when x = b - x), so the expected count of met sizes is
    sum over x of 1 - (1 - q_batch(x))^(full steps) * (1 - q_last(x))^(epochs).
    """
    full, last = divmod(n_images, batch)

    def met_probability(b):
        pmf = binomial_pmf(b, fraction)
        return {x: pmf[x] + (pmf[b - x] if 2 * x != b else 0.0) for x in range(1, b + 1)}

    steps = [(met_probability(batch), full * epochs)] + ([(met_probability(last), epochs)] if last else [])
    total = float(len(set(known)))
    for size in range(1, batch + 1):
        if size in known:
            continue
        never = 1.0
        for probability, count in steps:
            never *= (1.0 - probability.get(size, 0.0)) ** count
        total += 1.0 - never
    return total


def run_sizes(method, n_images, fraction, batch=PROJECTED_BATCH):
    """Distinct batch sizes a whole run meets: a full and a last batch for SGD and SAM; for
    SharpBalance also the mixed step's sub-batches over its epochs after the split (expected)."""
    full_and_last = {batch} | ({n_images % batch} if n_images % batch else set())
    if method != "sharpbalance":
        return float(len(full_and_last))
    return expected_distinct_sizes(batch, fraction, n_images, EPOCHS - SPLIT_AFTER, known=full_and_last)


def member_seconds(rates, data, method, scale):
    """One member's 200 epochs in seconds at ``rates`` (img/s per phase, all sizes known) times the
    image-cost ``scale``: training, validation every epoch, SharpBalance's one scoring pass."""
    def seconds(images, phase):
        return images * scale / rates[phase]
    per_eval = seconds(data["val"], "eval")
    if method == "deep_ensemble":
        return EPOCHS * (seconds(data["train"], "sgd") + per_eval)
    if method == "sam":
        return EPOCHS * (seconds(data["train"], "sam") + per_eval)
    # SAM for initial_epochs + 1 = 101 epochs, one scoring pass, then the mixed step
    return (SPLIT_AFTER * seconds(data["train"], "sam") + seconds(data["train"], "score")
            + (EPOCHS - SPLIT_AFTER) * seconds(data["train"], "mixed") + EPOCHS * per_eval)


# main.py's default learning-rate schedule (--lrsche multistep, training/trainer.py): lr drops at
# epochs/2 and 3*epochs/4, and each drop makes every member's step graphs be captured again.
LR_MILESTONES = (EPOCHS // 2, EPOCHS * 3 // 4)


def method_phases(method, fraction):
    """A run's phases as (epochs, probability that a sample is trained with SAM): 0 for SGD, 1 for
    SAM, ``fraction`` for SharpBalance's mixed step after its SAM epochs."""
    if method == "deep_ensemble":
        return [(EPOCHS, 0.0)]
    if method == "sam":
        return [(EPOCHS, 1.0)]
    return [(SPLIT_AFTER, 1.0), (EPOCHS - SPLIT_AFTER, fraction)]


def expected_graph_events(batch, n_images, phases, milestones):
    """Expected number of graph events (a key's eager first step, each capture) of one member whose
    steps are graph-captured (training/graphs.py), over a run of ``phases`` ((epochs, SAM fraction),
    see method_phases) with lr drops at ``milestones`` (epochs).

    A step of b images with s SAM samples (s ~ Binomial(b, fraction); 0 for SGD, b for SAM) has the
    key (b, s); an epoch has n_images // batch steps of ``batch`` images and one of the rest. The
    first step of a key runs eagerly; a step of a key without a graph is captured; an lr drop drops
    every graph. So a key costs one event in every lr period in which it is used, plus one in the
    period of its first use when it is used twice or more there. With the periods p independent,
    the expectation per key is
        sum_p P(used in p) + sum_p P(unused before p) * P(used at least twice in p),
    where, within a period, the key is used in each of N_j steps of segment j (epochs of one
    fraction) with probability q_j: P(unused) = prod_j (1 - q_j)^N_j, P(used once) =
    sum_j N_j q_j (1 - q_j)^(N_j - 1) prod_(k != j) (1 - q_k)^N_k. The bound on graphs (128 per
    member) is left out: a few dozen keys per batch size at batch 128 and f = 0.8.
    """
    full, last = divmod(n_images, batch)
    fractions = [fraction for epochs, fraction in phases for _ in range(epochs)]
    bounds = [0] + [m for m in milestones if 0 < m < len(fractions)] + [len(fractions)]
    periods = []
    for start, end in zip(bounds, bounds[1:]):
        epochs = {}
        for fraction in fractions[start:end]:
            epochs[fraction] = epochs.get(fraction, 0) + 1
        periods.append(epochs)
    total = 0.0
    for size, per_epoch in ((batch, full), (last, 1)):
        if size == 0 or per_epoch == 0:
            continue
        pmfs = {fraction: binomial_pmf(size, fraction) for fraction in set(fractions)}
        for s in range(size + 1):
            unused_before = 1.0
            for epochs in periods:
                segments = [(per_epoch * count, pmfs[fraction][s]) for fraction, count in epochs.items()]
                unused = math.prod((1.0 - q) ** n for n, q in segments)
                once = sum(n * q * (1.0 - q) ** (n - 1) * math.prod((1.0 - q2) ** n2 for k, (n2, q2) in
                                                                    enumerate(segments) if k != j)
                           for j, (n, q) in enumerate(segments))
                total += (1.0 - unused) + unused_before * (1.0 - unused - once)
                unused_before *= unused
    return total


def run_hours(rates, new_size_s, data, method, scale, fraction, concurrent, graphs=False):
    """Wall time of one 3-member run: the members one after another in one process (main.py), or
    ``concurrent`` (three processes at once, or members in lockstep, ``rates`` being each one's
    share). cuDNN's per-size work is paid once per process, the processes paying theirs at the same
    time: once either way. With graph-captured steps (``graphs``) the one-time costs are graph
    events instead, per member (each has its own graphs; a capture holds up the whole device, so
    members in lockstep pay theirs one after another): ``new_size_s`` is then the cost per event."""
    member = member_seconds(rates, data, method, scale)
    if graphs:
        events = MEMBERS * expected_graph_events(PROJECTED_BATCH, data["train"], method_phases(method, fraction),
                                                 LR_MILESTONES)
    else:
        events = run_sizes(method, data["train"], fraction)
    once = new_size_s * scale * events
    return ((member if concurrent else MEMBERS * member) + once) / 3600


def merged_rows(summary):
    """Every measured project row (from the sections of the parts that measure them), by label."""
    rows = {}
    for part in dict.fromkeys(row.part for row in PROJECT_ROWS):
        rows.update(summary["parts"].get(part, {}).get("rows", {}))
    return rows


def ok(entry):
    return isinstance(entry, dict) and "img_per_s" in entry


def capture_note(row_entry):
    """' (a capture FAILED: eager steps)' for a graph row whose captures failed in some phase (its
    later figures are eager ones), else ''."""
    failed = any(isinstance(e, dict) and e.get("graphs", {}).get("failed") for e in row_entry.values())
    return " (a capture FAILED: eager steps)" if failed else ""


def row_rates(label, rows):
    """(img/s per phase, seconds per new size) of a row, or None when a training phase is missing.
    Scoring and evaluation come from the row or, failing that, from the row it borrows from. For a
    lockstep row the training rates are its members' aggregate and the seconds are per graph event
    (or new size) of any member; what it borrows is one member's."""
    row = rows.get(label, {})
    spec = next((r for r in PROJECT_ROWS if r.label == label), None)
    if not all(ok(row.get(phase)) for phase in TRAIN_PHASES):
        return None
    rates = {phase: row[phase]["img_per_s"] for phase in TRAIN_PHASES}
    lender = rows.get(spec.borrow, {}) if spec and spec.borrow else {}
    for phase, source in (("score", "score_func"), ("eval", "eval")):
        got = row.get(source) if ok(row.get(source)) else lender.get(source)
        if not ok(got):
            return None
        rates[phase] = got["img_per_s"]
    compared = sum(row[p]["new_sizes_compared"] for p in TRAIN_PHASES)
    new_size_s = sum(row[p]["extra_s"] for p in TRAIN_PHASES) / compared if compared else 0.0
    return rates, new_size_s


def projection_settings(summary):
    """Every setting that can be projected: each complete project row with its members one after
    another, then the same with three members sharing the device where the shared part measured it;
    a lockstep row as its members in lockstep. Each is a dict: name, kind, rates (img/s per phase,
    per member), new_size_s, concurrent, graphs (one-time costs per graph event) and eval_alone (one
    process's evaluation rate, for the measure scripts)."""
    rows = merged_rows(summary)
    shared_rows = summary["parts"].get("shared", {}).get("rows", {})
    settings = []
    for row in PROJECT_ROWS:
        got = row_rates(row.label, rows)
        if got is None:
            continue
        rates, new_size_s = got
        common = dict(kind=row.kind, new_size_s=new_size_s, eval_alone=rates["eval"], graphs=row.graphs)
        if row.members > 1:
            # Each member trains at 1/members of the aggregate; the scoring at the split and the
            # evaluations (a member's own, after its epoch) are counted one member after another.
            share = {p: rate / row.members for p, rate in rates.items()}
            settings.append(dict(common, name=f"{row.label}, {row.members} members in lockstep"
                                 f"{capture_note(rows[row.label])}", rates=share, concurrent=True))
            continue
        settings.append(dict(common, name=f"{row.label}, members one after another{capture_note(rows[row.label])}",
                             rates=rates, concurrent=False))
        gains_from = shared_rows.get(row.shared_as or "", {})
        alone = rows.get(row.shared_as or "", {})
        if all(p in gains_from and ok(alone.get(p)) for p in SHARED_PHASES):
            # Each of three members runs at (aggregate / 3) over one member alone, times the row's
            # own rate; scoring, not measured shared, is given SGD's gain.
            gains = {p: gains_from[p]["aggregate_img_per_s"] / alone[p]["img_per_s"] for p in SHARED_PHASES}
            shared_rates = {p: rates[p] * gains[p] / MEMBERS for p in SHARED_PHASES}
            shared_rates["score"] = rates["score"] * gains["sgd"] / MEMBERS
            note = "" if row.shared_as == row.label else f" (gain of sharing measured with {row.shared_as})"
            settings.append(dict(common, name=f"{row.label}, 3 members sharing the GPU{note}", rates=shared_rates,
                                 concurrent=True))
    return settings


def tiny_ratios(summary):
    """Tiny-ImageNet's cost per image over CIFAR's, per kind, measured on SGD (4.0 when unmeasured)."""
    parts = summary["parts"]
    rows, tiny = parts.get("throughput", {}).get("rows", {}), parts.get("throughput", {}).get("tiny", {})
    cifar = {"faithful": "fp32", "fast": "bf16+channels_last"}
    ratios = {}
    for kind, label in cifar.items():
        a, b = rows.get(label, {}).get("sgd"), tiny.get(kind)
        ratios[kind] = a["img_per_s"] / b["img_per_s"] if ok(a) and ok(b) else 4.0
    return ratios


def project_runs(setting, scale_of, fraction):
    """{"<dataset> <method>": hours, ..., "measure_h", "figure7": hours} for one setting."""
    table, figure7 = {}, 0.0
    for dataset, data in DATASETS.items():
        for method in METHODS:
            hours = run_hours(setting["rates"], setting["new_size_s"], data, method, scale_of(data), fraction,
                              setting["concurrent"], setting["graphs"])
            table[f"{dataset} {method}"] = hours
            figure7 += SEED_TRIPLES * hours
    # Measurement passes (test + 75 -C cells, two passes, every member), forward only, one process
    # at a time (the measure scripts run the members of a run together); APGD is not counted.
    table["measure_h"] = sum(SEED_TRIPLES * len(METHODS) * MEMBERS * 2 * d["measure_images"] * scale_of(d)
                             for d in DATASETS.values()) / setting["eval_alone"] / 3600
    table["figure7"] = figure7 + table["measure_h"]
    return table


def comparisons(summary):
    """Project against bare reference, per phase: [{name, row, kind, members, graphs, ratios}] for
    every pair measured (a project row and its reference row, a lockstep row's aggregate against
    three streams; the shared part and three streams; the fast path and the compute ceiling)."""
    parts = summary["parts"]
    rows, reference_rows = merged_rows(summary), parts.get("reference", {}).get("rows", {})
    shared_rows = parts.get("shared", {}).get("rows", {})
    kinds = {row.label: row.kind for row in PROJECT_ROWS}
    pairs = [(f"{row.label}{capture_note(rows.get(row.label, {}))} / {row.reference}", row.label, row.kind,
              row.members, row.graphs, rows.get(row.label, {}), reference_rows.get(row.reference, {}), "img_per_s")
             for row in PROJECT_ROWS if row.reference]
    pairs += [(f"{label}, 3 processes sharing / {ref}", label, kinds[label], 3, False, shared_rows.get(label, {}),
               reference_rows.get(ref, {}), "aggregate_img_per_s") for label, ref in SHARED_REFERENCE.items()]
    pairs += [(f"bf16+channels_last / {CEILING}", "bf16+channels_last", "ceiling", 1, False,
               rows.get("bf16+channels_last", {}), reference_rows.get(CEILING, {}), "img_per_s")]
    found = []
    for name, label, kind, members, graphs, project, bare, key in pairs:
        ratios = {p: project[p][key] / bare[p]["img_per_s"] for p in ("sgd", "sam")
                  if isinstance(project.get(p), dict) and key in project[p] and ok(bare.get(p))}
        if ratios:
            found.append({"name": name, "row": label, "kind": kind, "members": members, "graphs": graphs,
                          "ratios": ratios})
    return found


def three_members(summary):
    """Aggregate img/s of three members on one GPU, per phase, every way measured: the bare step on
    three streams (reference), three processes (shared), members in lockstep (the lockstep rows)."""
    parts = summary["parts"]
    reference_rows, shared_rows = parts.get("reference", {}).get("rows", {}), parts.get("shared", {}).get("rows", {})
    rows = merged_rows(summary)
    found = []
    for label, _, _, members, _, _ in REFERENCE_ROWS:
        if members == 3:
            found.append((f"bare step, {label}",
                          {p: e["img_per_s"] for p, e in reference_rows.get(label, {}).items() if ok(e)}))
    for label in SHARED_LABELS:
        found.append((f"{label}, 3 processes", {p: e["aggregate_img_per_s"] for p, e in
                                                shared_rows.get(label, {}).items() if "aggregate_img_per_s" in e}))
    for row in PROJECT_ROWS:
        if row.members == 3:
            found.append((f"{row.label}, one process", {p: e["img_per_s"] for p, e in rows.get(row.label, {}).items()
                                                         if p in TRAIN_PHASES and ok(e)}))
    return [{"name": name, "img_per_s": rates} for name, rates in found if rates]


def print_three_members(summary, result):
    say("three members on one GPU (aggregate img/s, measured in this run):")
    result["three_members"] = three_members(summary)
    for entry in result["three_members"]:
        say(f"  {entry['name']:62s} " + "  ".join(f"{p} {r:8.0f}" for p, r in entry["img_per_s"].items()))
    if not result["three_members"]:
        say("  nothing measured")


def verdict(met):
    return "met" if met else "NOT MET"


def print_projections(summary, fraction, result):
    settings = projection_settings(summary)
    if not settings:
        say("projection: no complete project row to project from")
        return
    tiny = result["tiny_ratio"] = tiny_ratios(summary)
    throughput = summary["parts"].get("throughput", {})
    say(f"projection: 200 epochs, 3 members, validation every epoch, SharpBalance split after 101 SAM epochs, "
        f"batch {PROJECTED_BATCH}, mixed f = {fraction} (from {throughput.get('gpu') or throughput.get('device')}; "
        f"Tiny-ImageNet cost per image = CIFAR's x {tiny['faithful']:.2f} faithful / x {tiny['fast']:.2f} fast, "
        "measured on SGD; cuDNN's per-size work once per run, for the expected number of distinct sizes; with "
        "graph-captured steps, each member's expected graph events instead)")
    for setting in settings:
        kind = setting["kind"]
        table = project_runs(setting, lambda d, kind=kind: tiny[kind] if d["side"] == 64 else 1.0, fraction)
        result["settings"][setting["name"]] = dict(table, kind=kind)
        say(f"  {setting['name']}:")
        for dataset in DATASETS:
            say("    " + f"{dataset:14s}" + "  ".join(f"{m} {table[f'{dataset} {m}']:6.2f} h" for m in METHODS))
        say(f"    whole Figure 7 (27 runs + {table['measure_h']:.1f} h of -C forward passes; APGD not counted): "
            f"{table['figure7']:.1f} h")


def print_cudnn_settings(summary, fraction, result):
    """The faithful rows (the --cudnn settings, fp32) side by side: one member on CIFAR-10."""
    rows, cifar10 = merged_rows(summary), DATASETS["CIFAR-10"]
    say("--cudnn settings, fp32, one member on CIFAR-10, epoch 1 (with cuDNN's work for every new size) / later "
        "epochs, and 200 epochs of each method:")
    for row in PROJECT_ROWS:
        if row.kind != "faithful" or row.label not in rows:
            continue
        entry = {p: rows[row.label][p] for p in TRAIN_PHASES if ok(rows[row.label].get(p))}
        line = "  ".join(f"{p} {e['first_epoch_s']:.1f}/{e['warm_epoch_s']:.1f} s" for p, e in entry.items())
        got = row_rates(row.label, rows)
        if got:
            rates, new_size_s = got
            hours = {m: (member_seconds(rates, cifar10, m, 1.0)
                         + new_size_s * run_sizes(m, cifar10["train"], fraction)) / 3600 for m in METHODS}
            entry["member_200_epochs_h"] = hours
            line += "  | " + "  ".join(f"{m} {h:.2f} h" for m, h in hours.items())
        result["cudnn"][row.label] = entry
        say(f"  {row.label:26s} {line or 'no epochs measured'}")


def print_versus_reference(summary, result):
    say("project / reference (img/s over img/s, per phase, measured in this run):")
    result["versus_reference"] = comparisons(summary)
    for pair in result["versus_reference"]:
        say(f"  {pair['name']:90s} " + "  ".join(f"{p} {r:.2f}" for p, r in pair["ratios"].items()))


def print_goals(summary, result):
    rows, goals = merged_rows(summary), result["goals"]
    say("goals (one H200, this run's figures):")

    def goal(what, target, value, met):
        goals.append({"goal": what, "target": target, "measured": value, "met": met})
        shown = "not measured: UNKNOWN" if value is None else f"measured {value:.2f}: {verdict(met)}"
        say(f"  {what:96s} goal {target}, {shown}")

    measured = [row for row in PROJECT_ROWS if all(ok(rows.get(row.label, {}).get(p)) for p in ("sam", "mixed"))]
    for row in measured:
        got = rows[row.label]
        ratio = got["mixed"]["img_per_s"] / got["sam"]["img_per_s"]
        first = got["sam"]["first_epoch_s"] / got["mixed"]["first_epoch_s"]
        goal(f"mixed step img/s / SAM img/s, {row.label} (epoch 1: {first:.2f})", f">= {GOALS['mixed_over_sam']}",
             ratio, ratio >= GOALS["mixed_over_sam"])
    if not measured:
        goal("mixed step img/s / SAM img/s, every setting", f">= {GOALS['mixed_over_sam']}", None, False)
    # The fast path of the goal: bf16 + channels_last with graph-captured steps; three members are
    # the lockstep row (one process), against the bare step on three streams.
    for members in (1, 3):
        candidates = [pair for pair in result["versus_reference"]
                      if pair["kind"] == "fast" and pair["members"] == members and pair["graphs"]]
        for phase in ("sgd", "sam"):
            best = max(((pair["ratios"][phase], pair["name"].split(" / ")[0]) for pair in candidates
                        if phase in pair["ratios"]), default=(None, "no row measured"))
            who = "one member" if members == 1 else "3 members"
            goal(f"fast path {phase.upper()} / bare CUDA-graph reference, {who} ({best[1]})",
                 f">= {GOALS['fast_over_reference']}", best[0],
                 best[0] is not None and best[0] >= GOALS["fast_over_reference"])
    faithful = result["settings"].get("fp32, members one after another", {}).get("CIFAR-10 sharpbalance")
    goal("CIFAR-10 SharpBalance, 3 members, 200 epochs, faithful defaults (minutes)",
         f"<= {GOALS['cifar10_sharpbalance_faithful_min']:.0f}", None if faithful is None else 60 * faithful,
         faithful is not None and 60 * faithful <= GOALS["cifar10_sharpbalance_faithful_min"])
    fast = [t for t in result["settings"].values() if t["kind"] == "fast"]
    best_run = min((t["CIFAR-10 sharpbalance"] for t in fast), default=None)
    goal("CIFAR-10 SharpBalance, 3 members, 200 epochs, fast path (minutes)",
         f"<= {GOALS['cifar10_sharpbalance_fast_min']:.0f}", None if best_run is None else 60 * best_run,
         best_run is not None and 60 * best_run <= GOALS["cifar10_sharpbalance_fast_min"])
    best_f7 = min((t["figure7"] for t in fast), default=None)
    goal("whole Figure 7, fast path (hours)", f"<= {GOALS['figure7_fast_h']:.0f}", best_f7,
         best_f7 is not None and best_f7 <= GOALS["figure7_fast_h"])


def projection(args, cfg):
    """Every section on its own: one that fails prints one line and the others still print."""
    summary = read_summary(args.out)
    result = {"settings": {}, "cudnn": {}, "versus_reference": [], "three_members": [], "goals": []}
    isolated("projections", print_projections, summary, cfg["mixed_fraction"], result)
    isolated("--cudnn settings", print_cudnn_settings, summary, cfg["mixed_fraction"], result)
    isolated("project / reference", print_versus_reference, summary, result)
    isolated("three members on one GPU", print_three_members, summary, result)
    isolated("goals", print_goals, summary, result)
    save_part(args.out, "projection", result)
    return 0


# ----------------------------------------------------------------------------------------- entry

PARTS = {"smoke": smoke, "throughput": project_part("throughput"), "cudnn": project_part("cudnn"),
         "graphs": project_part("graphs"), "compile": project_part("compile"), "reference": reference,
         "shared": shared}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=tuple(PARTS) + ("projection",))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="results/gpu_check")
    parser.add_argument("--budget", type=float, default=120, help="seconds this part may take")
    parser.add_argument("--quick", action="store_true", help="toy sizes (the same code; for tests on a CPU)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    if args.part == "projection":
        return projection(args, cfg)
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
    return PARTS[args.part](args, cfg, device) or 0


if __name__ == "__main__":
    sys.exit(main())
