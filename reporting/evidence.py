"""The claims' evidence: every ensemble's numbers and the settings they were made with, read from the
runs' own records, as small files that can be committed (results/claims/).

    python -m reporting.evidence --runs runs/claims --out results/claims

Walks ``--runs`` for measured ensembles (folders holding predict.json, as scripts/figure7.sh writes
them under <OUT>/results/<dataset>/<method>/seeds_a_b_c/) and writes:
  ensembles.csv   one row per (setting, method, seed set, checkpoint): sharpness, Fisher trace, diversity,
                  accuracy (the columns in ENSEMBLE_COLUMNS)
  members.csv     one row per measured member: the epoch of the checkpoint measured, whether it precedes
                  SharpBalance's partition, its sharpness, Fisher trace and accuracy
  settings.json   the training and measurement settings shared by every ensemble, the ones that vary
                  (epochs, width, SAM's rho, SharpBalance's flags), software versions, the machine

Nothing is taken from the environment or from folder names: the training settings come from each run's
args.json (found through the checkpoints the measurement recorded), the measurement settings from each
result file's meta. Files that disagree are refused with one line naming the file: a result measured
with other sharpness batches, a run trained with another batch size, a result folder whose method
differs from its run's flags, result files of one ensemble that measured different checkpoints.
"""
import argparse
import csv
import json
import math
import os
import sys
from argparse import Namespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from reporting import results as rp  # noqa: E402
from reporting.claims import seed_set_order  # noqa: E402
from training.method import method_name, partition_epoch  # noqa: E402
from utils.device import cpu_name  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402

NAN = float("nan")
REQUIRED_FILES = ("predict", "disagreement", "APGD_worst")  # an ensemble without them is refused
OPTIONAL_FILES = ("variance_mse_c", "fisher")                # NaN when absent (e.g. the last checkpoints)
RADII = (0.05, 0.5)

# Training settings every ensemble must share (args.json); those that define a setting vary.
SHARED_TRAINING = ("data", "model", "batch_size", "lr", "lrsche", "momentum", "weight_decay", "train_subset",
                   "split_rule", "freeze_bn_on_perturbed", "amp", "tiny_val", "shortcut_scale")
# Measurement settings every sharpness / Fisher result must share (their meta).
SHARED_SHARPNESS = ("norms", "adaptive", "n_iters", "apgd_restart", "batch_num", "batch_size", "batch_seed",
                    "logit_norm", "preset")
SHARED_DIVERSITY = ("dataset", "corruptions", "ensemble_rule", "ece_bins")

ENSEMBLE_COLUMNS = (
    "epochs", "width", "method", "sam_rho", "flat_ratio", "initial_epochs", "select", "seed_set", "checkpoint",
    "members", "incomplete", "measured_epochs", "sharpness_0.05", "sharpness_0.5", "fisher", "der_ood",
    "disagreement_ood", "variance_ood", "ensemble_acc_ood", "member_acc_ood", "gain_ood", "ensemble_acc_id",
    "member_acc_id", "gain_id", "disagreement_id", "ensemble_nll_ood", "ensemble_ece_ood", "result_folder")
MEMBER_COLUMNS = (
    "epochs", "width", "method", "sam_rho", "seed_set", "checkpoint", "seed", "measured_epoch", "trained_epochs",
    "partition_epoch", "before_partition", "sharpness_0.05", "sharpness_0.5", "fisher", "acc_id", "acc_ood")
INTEGER_COLUMNS = ("epochs", "width", "initial_epochs", "members", "seed", "measured_epoch", "trained_epochs",
                   "partition_epoch")
TEXT_COLUMNS = ("method", "select", "seed_set", "checkpoint", "incomplete", "measured_epochs", "result_folder",
                "before_partition")


# ------------------------------------------------------------------------------------- reading
def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({err}); measure that ensemble again") from None


def result_folders(runs):
    """Every folder under ``runs`` holding a predict.json, sorted (symlinked folders are not followed,
    so an ensemble shared between two settings through a link is read once)."""
    if not os.path.isdir(runs):
        raise UserError(f"runs folder '{runs}' does not exist (run scripts/claims.sh first, or pass its OUT)")
    found = []
    for folder, dirs, files in os.walk(runs):
        dirs.sort()
        if "predict.json" in files:
            found.append(folder)
    return found


def checkpoint_kind(paths, where):
    """"best" (model_best.pth.tar) or "last" (checkpoint.pth.tar) for the checkpoints a result measured."""
    names = {os.path.basename(p) for p in paths}
    if names == {"model_best.pth.tar"}:
        return "best"
    if names == {"checkpoint.pth.tar"}:
        return "last"
    raise UserError(f"{where}: measured checkpoints {sorted(names)}, not all model_best or all checkpoint files")


def run_arguments(checkpoints, where):
    """The training arguments of the run the checkpoints belong to (its args.json)."""
    runs = {os.path.dirname(os.path.dirname(p)) for p in checkpoints}
    if len(runs) != 1:
        raise UserError(f"{where}: its members come from several runs ({', '.join(sorted(runs))})")
    path = os.path.join(runs.pop(), "args.json")
    if not os.path.isfile(path):
        raise UserError(f"{where}: the run's {path} is missing, so its settings cannot be read; "
                        "measure a complete run folder")
    return _load(path), path


def method_of(args):
    """The method folder name a run's arguments train (sharpbalance_sharpest: the paper's --select sharpest)."""
    name = method_name(Namespace(**args))
    if name == "sharpbalance" and args.get("select") == "sharpest":
        return "sharpbalance_sharpest"
    return name


def read_ensemble(folder):
    """(ensemble row, member rows, shared settings) of one measured ensemble folder."""
    payloads = {}
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        path = os.path.join(folder, f"{name}.json")
        if os.path.isfile(path):
            payloads[name] = _load(path)
        elif name in REQUIRED_FILES:
            raise UserError(f"{path} is missing: the ensemble in {folder} was not measured completely; "
                            "rerun scripts/claims.sh to measure it")
    metas = {name: payload.get("meta") or {} for name, payload in payloads.items()}
    predict_meta = metas["predict"]
    checkpoints = predict_meta.get("checkpoints")
    if not checkpoints:
        raise UserError(f"{os.path.join(folder, 'predict.json')} records no checkpoints; measure it again")
    for name, meta in metas.items():
        if meta.get("checkpoints") != checkpoints or meta.get("members") != predict_meta.get("members"):
            raise UserError(f"{os.path.join(folder, name + '.json')} measured other checkpoints than "
                            f"{os.path.join(folder, 'predict.json')} (retrained in between?); measure the ensemble again")
    kind = checkpoint_kind(checkpoints, os.path.join(folder, "predict.json"))
    args, args_path = run_arguments(checkpoints, os.path.join(folder, "predict.json"))
    method = method_of(args)
    folder_method = os.path.basename(os.path.dirname(folder))
    if folder_method != method:
        raise UserError(f"{folder}: the folder says {folder_method} but its run {args_path} trained {method}")
    seeds = tuple(int(s) for s in args.get("seeds", []))
    if rp.folder_seeds(os.path.basename(folder)) not in (None, seeds):
        raise UserError(f"{folder}: the folder's seeds differ from its run's ({' '.join(map(str, seeds))})")
    members = predict_meta.get("members") or []
    partition = partition_epoch(Namespace(**args))
    apgd = payloads["APGD_worst"]
    means = apgd.get("mean_sharpness") or {}
    for radius in (RADII[0],):
        if f"l2_{radius}" not in means:
            raise UserError(f"{os.path.join(folder, 'APGD_worst.json')} has no l2 sharpness at radius {radius} "
                            f"(has {', '.join(means) or 'none'}); measure it with --norm l2 --rho {radius}")
    predict, disagreement = payloads["predict"], payloads["disagreement"]
    variance = payloads.get("variance_mse_c", {})
    fisher = payloads.get("fisher", {})
    ood = ("corruptions", "ood")
    row = dict(
        epochs=int(args["epochs"]), width=int(args["width"]), method=method,
        sam_rho=float(args["rho"]) if args.get("sam") else NAN,
        flat_ratio=float(args["flat_ratio"]) if partition is not None else NAN,
        initial_epochs=int(args["initial_epochs"]) if partition is not None else None,
        select=args.get("select", "") if partition is not None else "",
        seed_set=" ".join(map(str, seeds)), checkpoint=kind, members=len(members),
        incomplete="; ".join(map(str, predict_meta.get("incomplete_ensemble") or [])),
        measured_epochs=" ".join(str(m.get("epoch")) for m in members),
        fisher=rp.finite_number(fisher.get("mean_fisher")),
        der_ood=rp.finite_number(rp.dig(disagreement, *ood, "DER")),
        disagreement_ood=rp.finite_number(rp.dig(disagreement, *ood, "mean_disagreement")),
        variance_ood=rp.finite_number(variance.get("variance_unbias")),
        ensemble_acc_ood=rp.finite_number(rp.dig(predict, *ood, "ensemble_accuracy"), 100.0),
        member_acc_ood=rp.finite_number(rp.dig(predict, *ood, "average_individual_accuracy"), 100.0),
        ensemble_acc_id=rp.finite_number(rp.dig(predict, "test", "ensemble_accuracy"), 100.0),
        member_acc_id=rp.finite_number(rp.dig(predict, "test", "average_individual_accuracy"), 100.0),
        disagreement_id=rp.finite_number(rp.dig(disagreement, "test", "mean_disagreement")),
        ensemble_nll_ood=rp.finite_number(rp.dig(predict, *ood, "ensemble_loss")),
        ensemble_ece_ood=rp.finite_number(rp.dig(predict, *ood, "ensemble_ece")),
        result_folder=folder)
    for radius in RADII:
        row[f"sharpness_{radius}"] = rp.finite_number(means.get(f"l2_{radius}"))
    row["gain_ood"] = row["ensemble_acc_ood"] - row["member_acc_ood"]
    row["gain_id"] = row["ensemble_acc_id"] - row["member_acc_id"]
    if len(seeds) != len(members) and not row["incomplete"]:
        row["incomplete"] = f"{len(members)} of {len(seeds)} members measured"

    member_rows = []
    individual = apgd.get("individual_sharpness") or []
    fishers = fisher.get("individual_fisher") or []
    acc_id = rp.dig(predict, "test", "individual_accuracy") or []
    acc_ood = rp.dig(predict, *ood, "individual_accuracy") or []
    for i, member in enumerate(members):
        epoch = member.get("epoch")
        entry = dict(epochs=row["epochs"], width=row["width"], method=method, sam_rho=row["sam_rho"],
                     seed_set=row["seed_set"], checkpoint=kind, seed=member.get("seed"), measured_epoch=epoch,
                     trained_epochs=member.get("trained_epochs"), partition_epoch=partition,
                     before_partition="" if partition is None else ("yes" if epoch is not None and epoch <= partition else "no"),
                     fisher=rp.finite_number(fishers[i]) if i < len(fishers) else NAN,
                     acc_id=rp.finite_number(acc_id[i], 100.0) if i < len(acc_id) else NAN,
                     acc_ood=rp.finite_number(acc_ood[i], 100.0) if i < len(acc_ood) else NAN)
        for radius in RADII:
            value = rp.dig(individual[i], f"l2_{radius}", "sharpness") if i < len(individual) else None
            entry[f"sharpness_{radius}"] = rp.finite_number(value)
        member_rows.append(entry)

    shared = {"training": {key: args.get(key) for key in SHARED_TRAINING},
              "sharpness": {key: metas["APGD_worst"].get(key) for key in SHARED_SHARPNESS},
              "diversity": {key: predict_meta.get(key) for key in SHARED_DIVERSITY}}
    if "fisher" in metas:
        fisher_shared = {key: metas["fisher"].get(key) for key in SHARED_SHARPNESS}
        if fisher_shared != shared["sharpness"]:
            raise UserError(f"{os.path.join(folder, 'fisher.json')} used other batches than APGD_worst.json there; "
                            "measure both in one call (SHARPNESS_MODES=APGD_worst,fisher)")
    sources = {"training": args_path, "sharpness": os.path.join(folder, "APGD_worst.json"),
               "diversity": os.path.join(folder, "predict.json")}
    versions = predict_meta.get("versions") or {}
    return row, member_rows, shared, sources, versions


def setting_key(row):
    """What identifies one ensemble in the evidence: its setting, method, seed set and checkpoint."""
    rho = row["sam_rho"]
    return (row["epochs"], row["width"], row["method"], None if not math.isfinite(rho) else rho,
            row["flat_ratio"] if math.isfinite(row["flat_ratio"]) else None, row["initial_epochs"], row["seed_set"],
            row["checkpoint"])


def collect(runs):
    """(ensemble rows, member rows, settings) of every measured ensemble under ``runs``; one UserError
    line for any file that disagrees with the others."""
    ensembles, members, read = [], [], []
    versions = {}
    seen = {}
    for folder in result_folders(runs):
        row, member_rows, shared, sources, version = read_ensemble(folder)
        key = setting_key(row)
        if key in seen:
            raise UserError(f"{folder} and {seen[key]} are the same ensemble (setting, method, seed set, checkpoint) "
                            "measured twice; keep one")
        seen[key] = folder
        ensembles.append(row)
        members += member_rows
        read.append((shared, sources))
        for name, value in version.items():
            versions.setdefault(name, set()).add(str(value))
    if not ensembles:
        raise UserError(f"no measured ensemble under '{runs}' (no predict.json found); run scripts/claims.sh first")
    reference = check_shared(read, runs)
    check_sharpbalance_flags(ensembles)
    order = lambda r: (r["epochs"], r["width"], r["method"], r["sam_rho"] if math.isfinite(r["sam_rho"]) else -1.0,  # noqa: E731
                       r["checkpoint"], seed_set_order(r["seed_set"]))
    ensembles.sort(key=order)
    members.sort(key=lambda r: order(r) + (r["seed"],))
    settings = describe(ensembles, reference, versions)
    return ensembles, members, settings


def check_shared(read, runs):
    """The settings every ensemble must share, as most of them have them; a UserError naming the first
    file (in folder order) that differs, the value it has and the one the others have."""
    reference = {}
    for part in read[0][0]:
        reference[part] = {}
        for key in read[0][0][part]:
            values = [json.dumps(shared[part][key], sort_keys=True) for shared, _ in read]
            common = max(dict.fromkeys(values), key=values.count)  # the most frequent; ties: the first seen
            reference[part][key] = json.loads(common)
            for (shared, sources), value in zip(read, values):
                if value != common:
                    others = values.count(common)
                    raise UserError(f"{sources[part]}: {key} = {shared[part][key]!r}, but {others} other ensemble(s) "
                                    f"have {reference[part][key]!r}; files from other settings cannot enter the claims "
                                    f"(move that run or result out of {runs}, or rerun it with the same settings)")
    return reference


def check_sharpbalance_flags(ensembles):
    """Every SharpBalance ensemble of one (epochs, width, rho, method) has the same flat_ratio and
    initial_epochs: otherwise two settings would be averaged as one."""
    flags = {}
    for row in ensembles:
        if not math.isfinite(row["flat_ratio"]):
            continue
        where = (row["epochs"], row["width"], row["sam_rho"], row["method"])
        value = (row["flat_ratio"], row["initial_epochs"])
        first = flags.setdefault(where, (value, row["result_folder"]))
        if first[0] != value:
            raise UserError(f"{row['result_folder']}: flat_ratio {value[0]}, initial_epochs {value[1]}, but "
                            f"{first[1]} has {first[0][0]}, {first[0][1]}; files from other settings cannot enter "
                            "the claims")


def describe(ensembles, shared, versions):
    """The settings of the evidence: shared ones, the ones that vary, seed sets, versions."""
    varying = sorted({(r["epochs"], r["width"], r["method"], r["sam_rho"] if math.isfinite(r["sam_rho"]) else None,
                       r["flat_ratio"] if math.isfinite(r["flat_ratio"]) else None, r["initial_epochs"], r["select"],
                       r["checkpoint"]) for r in ensembles}, key=lambda s: tuple("" if v is None else v for v in s))
    settings = []
    for epochs, width, method, rho, flat_ratio, initial_epochs, select, checkpoint in varying:
        chosen = [r for r in ensembles if (r["epochs"], r["width"], r["method"], r["checkpoint"]) ==
                  (epochs, width, method, checkpoint) and (r["sam_rho"] == rho or rho is None)]
        entry = dict(epochs=epochs, width=width, method=method, checkpoint=checkpoint, ensembles=len(chosen))
        if rho is not None:
            entry["sam_rho"] = rho
        if flat_ratio is not None:
            entry.update(flat_ratio=flat_ratio, initial_epochs=initial_epochs, select=select)
        settings.append(entry)
    seed_sets = sorted({r["seed_set"] for r in ensembles}, key=seed_set_order)
    return {"shared": shared, "settings": settings, "seed_sets": seed_sets,
            "versions": {name: sorted(values) for name, values in sorted(versions.items())},
            "collected_on": cpu_name()}


# ------------------------------------------------------------------------------------- the files
def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write_table(path, rows, columns):
    """CSV with exact floats (repr: reading them back gives the same numbers bit for bit)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])


def read_table(path):
    """Rows of a table written by write_table, with numbers as numbers (NaN / None where empty)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist (write it with python -m reporting.evidence)")
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, text in raw.items():
                if key in TEXT_COLUMNS:
                    row[key] = text
                elif key in INTEGER_COLUMNS:
                    row[key] = int(text) if text else None
                else:
                    row[key] = float(text) if text else NAN
            rows.append(row)
    return rows


def write(out, ensembles, members, settings):
    os.makedirs(out, exist_ok=True)
    write_table(os.path.join(out, "ensembles.csv"), ensembles, ENSEMBLE_COLUMNS)
    write_table(os.path.join(out, "members.csv"), members, MEMBER_COLUMNS)
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
        f.write("\n")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="the claims' output folder (scripts/claims.sh OUT)")
    parser.add_argument("--out", required=True, help="folder for ensembles.csv, members.csv, settings.json")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    ensembles, members, settings = collect(args.runs)
    write(args.out, ensembles, members, settings)
    print(f"evidence: {len(ensembles)} ensemble(s), {len(members)} member(s) from {args.runs} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
