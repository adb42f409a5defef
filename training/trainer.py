"""Training an ensemble: one member per seed, phase by phase, resumable, on one or several processes.

The run folder (``--save_path``: args.json, the lock, the split, seed_<s>/ with checkpoint,
model_best and log) and every check made of it are in utils/run_folder.py.

Why phase by phase: SharpBalance's split needs every member's scores at the same epoch. Training
all members to the split, scoring, splitting, then training all to the end means no process ever
waits on a barrier for another member, and one process can train the whole ensemble. Within a
phase the members of a process train one after the other, or with ``--lockstep`` side by side,
step by step (training/lockstep.py); each member's numbers are the same either way.
"""
import os
import random
import signal
import sys
import threading

import numpy as np
import torch

from data import BatchLoader
from models import create_model
from training.accel import FastPath
from training.engine import NonFiniteLoss, evaluate, train_epoch_steps
from training.graphs import member_graphs
from training.method import method_name, partition_epoch
from training.partition import build_sam_masks, resolve_split_rule
from training.sam import SAM
from training.lockstep import member_streams, run_in_lockstep
from training.scores import check_score_backend, squared_grad_norms
from utils import run_folder
from utils.checkpoint import copy_checkpoint, save_checkpoint
from utils.distributed import barrier, gather_member_rows, members_for_rank
from utils.errors import UserError

# Arguments that define what is trained: a resumed run must agree on all of them.
METHOD_KEYS = ("data", "model", "width", "seeds", "epochs", "lr", "lrsche", "batch_size", "momentum",
               "weight_decay", "sam", "rho", "flat_ratio", "initial_epochs", "train_subset", "select",
               "split_rule", "freeze_bn_on_perturbed", "tiny_val", "amp", "channels_last", "compile",
               "shortcut_scale", "cudnn")


def run_arguments(args):
    return {key: getattr(args, key) for key in METHOD_KEYS}


def split_settings(args):
    """What a saved SharpBalance split must record for this command; None without SharpBalance."""
    if partition_epoch(args) is None:
        return None
    return {"seeds": list(args.seeds), "flat_ratio": args.flat_ratio, "train_subset": args.train_subset,
            "split_rule": resolve_split_rule(args.split_rule, args.data), "select": args.select}


class Member:
    """One ensemble member: its model, optimizer, schedule, data order and files."""

    def __init__(self, args, position, seed, splits, device):
        self.args, self.position, self.seed, self.device = args, position, seed, device
        self.directory = run_folder.member_dir(args.save_path, seed)
        # Everything random about a member comes from its own seed: initialisation here, data order
        # and augmentation in its BatchLoader. A member trained alone equals it inside an ensemble.
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.model = create_model(args.model, splits.info.num_classes, width=args.width, dataset=args.data,
                                  shortcut_scale=args.shortcut_scale).to(device)
        self.fast = FastPath.from_args(args, device)  # --amp / --channels_last / --compile (off: unchanged)
        self.fast.prepare(self.model)
        sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        if args.sam:
            self.optimizer = SAM(self.model.parameters(), torch.optim.SGD, rho=args.rho, **sgd)
            base = self.optimizer.base_optimizer
        else:
            self.optimizer = base = torch.optim.SGD(self.model.parameters(), **sgd)
        # Schedulers attach to the base optimizer and step once per epoch.
        if args.lrsche == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=args.epochs)
        else:
            milestones = [int(args.epochs / 2), int(args.epochs * 3 / 4)]
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(base, milestones=milestones, gamma=0.1)
        self.graphs = member_graphs(args, self.model, self.optimizer, device)  # --cuda_graphs (None: eager)
        self.stream = None  # a CUDA stream of its own with --lockstep or --cuda_graphs (_train_members)
        self.train_loader = BatchLoader(splits.train, args.batch_size, device, shuffle=True, seed=seed)
        self.val_loader = BatchLoader(splits.val, args.eval_batch_size, device)
        # best_epoch: the epoch model_best.pth.tar holds (0 = none yet); None for checkpoints from
        # before it was recorded.
        self.epochs_done, self.best_acc, self.best_epoch, self.sam_mask = 0, 0.0, 0, None

    # -------------------------------------------------------------------------------- state
    def state(self):
        return {
            "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epochs_done, "best_acc": self.best_acc,
            "best_epoch": self.best_epoch, "run_args": run_arguments(self.args),
            "seed": self.seed, "model": self.args.model, "width": self.args.width, "dataset": self.args.data,
            "shortcut_scale": self.args.shortcut_scale,
            "num_classes": self.model.linear.out_features, "method": method_name(self.args),
            "sam_mask": self.sam_mask, "rng_cpu": torch.get_rng_state(), **self.fast.state_dict(),
        }

    def resume(self):
        """Continue from this member's checkpoint, if any (open_run_folder has checked that it
        belongs to this command). Without one the member starts afresh (log rows of an attempt
        that completed no epoch are dropped)."""
        path = os.path.join(self.directory, run_folder.CHECKPOINT_NAME)
        if not os.path.isfile(path):
            run_folder.truncate_log(self.directory, 0, label=f"[seed {self.seed}] ")
            return False
        state = run_folder.read_checkpoint(path, map_location=self.device)
        try:
            self.model.load_state_dict(state["state_dict"])
        except RuntimeError as err:  # the metadata checks missed a difference (e.g. a foreign file)
            hint = ""
            if self.args.data == "tiny_imgnet":
                # Runs from before the shortcut scales became the default recorded no shortcut_scale.
                from models.resnet_tiny import has_shortcut_scales
                saved = has_shortcut_scales(state["state_dict"])
                if saved != self.args.shortcut_scale:
                    hint = f"; it was trained with --shortcut_scale {saved}: pass that flag to resume it"
            raise UserError(f"'{path}' does not fit this command's model: "
                            f"{str(err).splitlines()[0][:200]}{hint}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epochs_done, self.best_acc = int(state["epoch"]), float(state["best_acc"])
        self.best_epoch = state.get("best_epoch")
        if self.best_epoch and not os.path.isfile(os.path.join(self.directory, run_folder.BEST_NAME)):
            print(f"[seed {self.seed}] note: {run_folder.BEST_NAME} is missing (epoch {self.best_epoch}, val acc "
                  f"{self.best_acc:.4f}, was the best); the best is tracked afresh from the next epoch", flush=True)
            self.best_acc, self.best_epoch = 0.0, 0
        self.sam_mask = state.get("sam_mask")
        self.fast.load_state_dict(state)
        torch.set_rng_state(state["rng_cpu"].cpu())
        # Drop log rows of epochs after the checkpoint (a crash between log and checkpoint).
        run_folder.truncate_log(self.directory, self.epochs_done, label=f"[seed {self.seed}] ")
        return True

    # ------------------------------------------------------------------------------ training
    def phase(self):
        method = method_name(self.args)
        if method == "deep_ensemble":
            return "sgd"
        if self.sam_mask is not None:
            return "mixed"
        return "warm-up" if method == "sharpbalance" else "sam"

    def train_until(self, end_epoch, progress=True):
        """Train until ``end_epoch`` epochs are done, on the member's stream if it has one."""
        run_in_lockstep([self.training(end_epoch, progress)], [self.stream])

    def training(self, end_epoch, progress=True):
        """Train until ``end_epoch`` epochs are done; a generator that yields after every training
        step, so that members can take turns (training/lockstep.py), and returns at the end."""
        args = self.args
        while self.epochs_done < end_epoch:
            epoch = self.epochs_done
            phase = self.phase()
            lr = self.scheduler.get_last_lr()[0]
            desc = f"seed {self.seed} epoch {epoch + 1}/{args.epochs}"
            stats = yield from train_epoch_steps(
                self.model, self.optimizer, self.train_loader, epoch, use_sam=args.sam, sam_mask=self.sam_mask,
                freeze_bn_on_perturbed=args.freeze_bn_on_perturbed, print_freq=args.print_freq, desc=desc,
                progress=progress, scaler=self.fast.scaler, graphs=self.graphs)
            val_loss, val_acc = evaluate(self.model, self.val_loader)
            self.scheduler.step()
            self.epochs_done = epoch + 1
            best_path = os.path.join(self.directory, run_folder.BEST_NAME)
            # The first epoch always writes a best file, even at 0% validation accuracy.
            is_best = val_acc > self.best_acc or not os.path.isfile(best_path)
            if is_best:
                self.best_acc, self.best_epoch = val_acc, epoch + 1
            row = dict(epoch=epoch + 1, phase=phase, lr=lr, val_loss=val_loss, val_acc=val_acc,
                       best_val_acc=self.best_acc, **stats)
            # Log first, checkpoint second: a crash in between leaves a row that resume truncates.
            run_folder.append_log(self.directory, [{k: (f"{v:.6g}" if isinstance(v, float) else v)
                                                    for k, v in row.items()}])
            # Checkpoint first, best second (a byte copy of the checkpoint). An interruption in
            # between leaves model_best one improving epoch behind a checkpoint that records itself
            # as the best; the next start copies it again (run_folder.repair_best).
            checkpoint_path = os.path.join(self.directory, run_folder.CHECKPOINT_NAME)
            try:
                save_checkpoint(self.state(), checkpoint_path)
                if is_best:
                    copy_checkpoint(checkpoint_path, best_path)
            except UserError as err:
                raise UserError(f"member seed {self.seed}, epoch {epoch + 1}: {err}; free space (or fix "
                                "permissions) and rerun the same command to resume from the last checkpoint") from None
            print(f"[seed {self.seed}] epoch {epoch + 1:3d}/{args.epochs} {phase:7s} lr {lr:.4g} | "
                  f"train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f} | "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f} | SAM {stats['sam_fraction']:.2f} | "
                  f"{stats['epoch_seconds']:.1f}s {stats['samples_per_second']:.0f} img/s", flush=True)


def choose_score_backend(args, members, splits, device, split_at):
    """The backend that will score the partition, tried before the first epoch on one chunk.

    A run that will score (SharpBalance without its split file yet) scores one chunk of the training
    split with this process's first member as the partition will (``scores.check_score_backend``):
    hooks that disagree with a plain backward pass become torch.func with one line now, and a
    backend that cannot score the model at all, or a chunk that does not fit in memory, fails now
    instead of after the warm-up. Returns ``--score_backend`` unchanged when nothing will be scored.
    """
    if (split_at is None or args.train_subset != "boosting" or not members
            or os.path.isfile(run_folder.split_path(args.save_path))):
        return args.score_backend
    loader = BatchLoader(splits.train_eval, args.eval_batch_size, device)
    backend, reason = check_score_backend(members[0].model, loader, device, args.score_backend, args.score_chunk)
    if reason:
        print(f"warning: --score_backend {args.score_backend}: {reason}", file=sys.stderr, flush=True)
    return backend


def compute_split(args, members, all_seeds, splits, device, rank, world_size, backend=None):
    """Score every member, share the scores, and return the (M, N) SAM masks (identical on all ranks).

    ``backend``: the scoring backend ``choose_score_backend`` settled on (default ``--score_backend``).
    Should the hooks still disagree with a plain backward pass on a trained member (float rounding
    near the tolerance), that member is scored with torch.func after one line: never a traceback here.

    The split is computed once and saved; a resumed run reads it back instead of rescoring (the
    models it was computed from no longer exist once training has moved on).
    """
    split_path = run_folder.split_path(args.save_path)
    if os.path.isfile(split_path):  # checked against the command by open_run_folder
        return run_folder.read_split(args.save_path)["sam_masks"]
    num_members, n = len(all_seeds), len(splits.train)
    if args.train_subset == "boosting":
        loader = BatchLoader(splits.train_eval, args.eval_batch_size, device)
        rows = {}
        for member in members:
            print(f"[seed {member.seed}] scoring {n} training samples (per-sample squared gradient norms)", flush=True)
            rows[member.position] = squared_grad_norms(
                member.model, loader, device, chunk_size=args.score_chunk, progress=not args.no_progress,
                num_samples=n, backend=backend or args.score_backend, print_freq=args.print_freq,
                fallback=lambda line, seed=member.seed: print(f"warning: [seed {seed}] {line}", file=sys.stderr,
                                                              flush=True))
        scores = gather_member_rows(rows, num_members, n, world_size, device)
    else:
        scores = torch.zeros(num_members, n)  # the ablations draw their subsets without scores
    masks = torch.as_tensor(np.asarray(build_sam_masks(
        scores.numpy(), args.flat_ratio, train_subset=args.train_subset, split_rule=args.split_rule,
        select=args.select, dataset=args.data, seeds=all_seeds)), dtype=torch.bool)
    if rank == 0:
        save_checkpoint({"scores": scores, "sam_masks": masks, **split_settings(args)}, split_path)
    fractions = ", ".join(f"seed {s}: {float(masks[i].float().mean()):.3f}" for i, s in enumerate(all_seeds))
    print(f"SharpBalance split done; SAM fraction per member: {fractions}", flush=True)
    return masks


def run_training(args, splits, device, rank=0, world_size=1):
    """Train this rank's members of the ensemble, phase by phase; returns them."""
    split_at = partition_epoch(args)
    # SIGTERM (a scheduler stopping the job, torchrun tearing down its workers) becomes SystemExit,
    # so the finally below releases the folder's lock even on another host's rerun of the job.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    lock = None
    try:
        lock = run_folder.open_run_folder(args, run_arguments(args), len(splits.train), splits.info.num_classes,
                                          method_name(args), split_at, split_settings(args), rank, world_size)
        return _train_members(args, splits, device, rank, world_size, split_at)
    finally:
        if lock is not None:
            lock.release()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    print("terminated (SIGTERM): the last completed checkpoint is kept; rerun the same command to resume",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _train_members(args, splits, device, rank, world_size, split_at):
    all_seeds = args.seeds
    members = [Member(args, position, all_seeds[position], splits, device)
               for position in members_for_rank(len(all_seeds), rank, world_size)]
    resumed = [member for member in members if member.resume()]
    if run_folder.finished(args.save_path, all_seeds, args.epochs):
        # Checked against the command, and every checkpoint loaded: rerunning a finished run costs no training.
        if rank == 0:
            print(f"nothing to train: every member in '{args.save_path}' has completed its {args.epochs} "
                  "epochs with these arguments", flush=True)
        return members
    for member in resumed:
        print(f"[seed {member.seed}] resumed after epoch {member.epochs_done}", flush=True)
    score_backend = choose_score_backend(args, members, splits, device, split_at)
    # On CUDA, members in lockstep or with graph-captured steps queue their work on a stream each
    # (a capture runs on the stream its warm-up steps ran on); otherwise everything stays on the
    # current stream, as without these options.
    if args.lockstep or args.cuda_graphs:
        for member, stream in zip(members, member_streams(device, len(members))):
            member.stream = stream
    boundaries = [split_at, args.epochs] if split_at is not None else [args.epochs]
    for boundary in boundaries:
        failures = [_failure(member, err) for member, err in _train_phase(args, members, boundary)]
        if failures:
            raise UserError(" | ".join(failures))
        if boundary == split_at:
            # Every rank enters, even one whose members are all resumed past the split, so the
            # collective inside is matched; with the split file present nobody rescored.
            masks = compute_split(args, members, all_seeds, splits, device, rank, world_size, score_backend)
            for member in members:
                member.sam_mask = masks[member.position]
        barrier(world_size)
    return members


def _train_phase(args, members, boundary):
    """Train every member up to epoch ``boundary``: all in lockstep (``--lockstep``), else one after
    the other, each on its own stream if it has one. Returns ``[(member, NonFiniteLoss)]`` for the
    members that stopped on one (the others carry on)."""
    progress = not args.no_progress
    if any(member.stream is not None for member in members):
        # What the members' loaders share and create on first use (the split's images on the device,
        # the normalisation constants) is made here, on the current stream, which the member streams
        # wait for: made on one member's stream it could be read by another's before it is there.
        for member in members:
            for loader in (member.train_loader, member.val_loader):
                next(iter(loader), None)
    if args.lockstep:
        results = run_in_lockstep([member.training(boundary, progress) for member in members],
                                  [member.stream for member in members], catch=NonFiniteLoss)
        return [(member, err) for member, (_, err) in zip(members, results) if err is not None]
    stopped = []
    for member in members:
        try:
            member.train_until(boundary, progress=progress)
        except NonFiniteLoss as err:
            stopped.append((member, err))
    return stopped


def _failure(member, err):
    kept = (f"its checkpoint of epoch {member.epochs_done} is kept" if member.epochs_done else
            "no epoch of this member completed, so it has no checkpoint")
    return f"member seed {member.seed}: {err}; {kept}; lower --lr or --rho"
