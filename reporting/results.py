"""The results of many ensembles: reading their measurement JSON files, and the Figure 7 tables.

Layout read (written by scripts/figure7.sh through scripts/measure/*.sh):
    <results>/<dataset>/<method>/<ensemble>/{predict,disagreement,variance_mse_c,APGD_worst}.json
    and, when measured (SHARPNESS_MODES=APGD_worst,fisher), fisher.json
where <ensemble> is ``seeds_13_17_27`` etc. Every number kept per ensemble is listed in FIELDS;
a missing file or key leaves NaN and adds one line to the list of missing inputs, never an error
(fisher.json only counts as missing when a caller requires it).
Accuracies are in percent. Means and standard deviations (sample std, ddof = 1) are over ensembles.
"""
import csv
import json
import math
import os

import numpy as np
from scipy import stats

METHODS = ("deep_ensemble", "sam", "sharpbalance")
METHOD_LABELS = {"deep_ensemble": "Deep Ensemble", "sam": "DE + SAM", "sharpbalance": "SharpBalance",
                 "sharpbalance_sharpest": "SharpBalance (sharpest)"}  # the paper's --select sharpest reading
DATASETS = ("cifar10", "cifar100", "tiny_imgnet", "digits")
DATASET_LABELS = {"cifar10": ("CIFAR-10", "CIFAR-10-C"), "cifar100": ("CIFAR-100", "CIFAR-100-C"),
                  "tiny_imgnet": ("Tiny-ImageNet", "Tiny-ImageNet-C"), "digits": ("digits", "digits-C")}

# The paper's Figure 7: (ensemble accuracy, mean individual accuracy) in %, mean of 3 ensembles.
PAPER = {
    ("cifar10", "ID"): {"deep_ensemble": (95.58, 94.74), "sam": (96.06, 95.66), "sharpbalance": (96.18, 95.73)},
    ("cifar100", "ID"): {"deep_ensemble": (79.28, 76.77), "sam": (79.50, 77.81), "sharpbalance": (79.84, 78.06)},
    ("tiny_imgnet", "ID"): {"deep_ensemble": (69.60, 65.75), "sam": (70.69, 68.26), "sharpbalance": (70.83, 68.36)},
    ("cifar10", "OOD"): {"deep_ensemble": (75.83, 74.19), "sam": (76.32, 75.45), "sharpbalance": (77.32, 76.12)},
    ("cifar100", "OOD"): {"deep_ensemble": (50.67, 47.66), "sam": (51.29, 49.41), "sharpbalance": (52.46, 50.43)},
    ("tiny_imgnet", "OOD"): {"deep_ensemble": (29.64, 26.30), "sam": (30.82, 28.37), "sharpbalance": (31.98, 29.27)},
}

# field -> (file, path of keys inside it, scale)
FIELDS = {
    "id_ensemble_acc": ("predict", ("test", "ensemble_accuracy"), 100.0),
    "id_individual_acc": ("predict", ("test", "average_individual_accuracy"), 100.0),
    "ood_ensemble_acc": ("predict", ("corruptions", "ood", "ensemble_accuracy"), 100.0),
    "ood_individual_acc": ("predict", ("corruptions", "ood", "average_individual_accuracy"), 100.0),
    "id_disagreement": ("disagreement", ("test", "mean_disagreement"), 1.0),
    "ood_disagreement": ("disagreement", ("corruptions", "ood", "mean_disagreement"), 1.0),
    "ood_variance": ("variance_mse_c", ("variance_unbias",), 1.0),
    "fisher": ("fisher", ("mean_fisher",), 1.0),
    # calibration: NLL (mean −log p of the true class) and ECE (a fraction, 15 bins)
    "id_ensemble_nll": ("predict", ("test", "ensemble_loss"), 1.0),
    "id_individual_nll": ("predict", ("test", "average_individual_loss"), 1.0),
    "ood_ensemble_nll": ("predict", ("corruptions", "ood", "ensemble_loss"), 1.0),
    "ood_individual_nll": ("predict", ("corruptions", "ood", "average_individual_loss"), 1.0),
    "id_ensemble_ece": ("predict", ("test", "ensemble_ece"), 1.0),
    "id_individual_ece": ("predict", ("test", "average_individual_ece"), 1.0),
    "ood_ensemble_ece": ("predict", ("corruptions", "ood", "ensemble_ece"), 1.0),
    "ood_individual_ece": ("predict", ("corruptions", "ood", "average_individual_ece"), 1.0),
}
FILES = ("predict", "disagreement", "variance_mse_c", "APGD_worst")
OPTIONAL_FILES = ("fisher",)  # read when present; missing only when a caller requires it
NAN = float("nan")


def ensemble_folder(seeds):
    """The folder of one ensemble's runs and results: "13 17 27", "13,17,27" or (13, 17, 27) ->
    "seeds_13_17_27" (scripts/train/_common.sh seeds_tag writes the same names)."""
    if isinstance(seeds, str):
        seeds = seeds.replace(",", " ").split()
    return "seeds_" + "_".join(str(s) for s in seeds)


def folder_seeds(name):
    """"seeds_13_17_27" -> (13, 17, 27); None when the name is not an ensemble folder."""
    prefix, *seeds = name.split("_")
    if prefix != "seeds" or not seeds or not all(s.isdigit() for s in seeds):
        return None
    return tuple(int(s) for s in seeds)


def dataset_label(dataset, split="ID"):
    labels = DATASET_LABELS.get(dataset, (dataset, f"{dataset}-C"))
    return labels[0] if split == "ID" else labels[1]


def method_label(method):
    return METHOD_LABELS.get(method, method)


def dig(payload, *keys):
    """payload[k1][k2]..., or None where a key is missing or a level is not a dict."""
    for key in keys:
        if not isinstance(payload, dict) or key not in payload:
            return None
        payload = payload[key]
    return payload


def finite_number(value, scale=1.0):
    """A finite JSON number times scale, else NaN (missing, null, bool, inf)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value) * scale
    return NAN


def chosen_apgd_setting(keys, wanted="auto"):
    """The APGD setting shown (``l2_0.5`` ...): ``wanted`` if given, else the first l2 one, else the first."""
    keys = list(keys)
    if wanted != "auto":
        return wanted if wanted in keys else None
    l2 = sorted((k for k in keys if k.startswith("l2_")), key=lambda k: float(k.split("_", 1)[1]))
    return l2[0] if l2 else (keys[0] if keys else None)


def load_ensemble(directory, wanted_sharpness="auto", required=FILES):
    """(record of FIELDS + sharpness, list of missing inputs) for one ensemble's result folder.

    Files in ``required`` are listed as missing when absent; OPTIONAL_FILES are read when present."""
    record = {field: NAN for field in FIELDS}
    record.update(sharpness=NAN, sharpness_setting=None, members=None)
    missing, payloads = [], {}
    for name in dict.fromkeys(tuple(FILES) + OPTIONAL_FILES + tuple(required)):
        path = os.path.join(directory, f"{name}.json")
        if not os.path.isfile(path):
            if name in required:
                missing.append(f"{path} (file missing)")
            continue
        try:
            with open(path) as f:
                payloads[name] = json.load(f)
        except (OSError, ValueError) as err:
            missing.append(f"{path} (unreadable: {err})")
    for field, (name, keys, scale) in FIELDS.items():
        if name not in payloads:
            continue
        record[field] = finite_number(dig(payloads[name], *keys), scale)
        if math.isnan(record[field]):
            missing.append(f"{os.path.join(directory, name + '.json')}: no finite value at {'/'.join(keys)}")
    if "predict" in payloads:
        record["members"] = len(dig(payloads["predict"], "test", "individual_accuracy") or []) or None
    if "APGD_worst" in payloads:
        means = payloads["APGD_worst"].get("mean_sharpness") or {}
        key = chosen_apgd_setting(means.keys(), wanted_sharpness)
        if key is None:
            missing.append(f"{os.path.join(directory, 'APGD_worst.json')}: no sharpness setting "
                           f"'{wanted_sharpness}' (has {', '.join(means) or 'none'})")
        else:
            record["sharpness"] = finite_number(means.get(key))
            record["sharpness_setting"] = key
    return record, missing


def collect(results, datasets=DATASETS, methods=METHODS, ensembles=None, wanted_sharpness="auto", required=FILES):
    """Every ensemble's record under ``results`` and the missing inputs.

    ``ensembles``: the expected ensemble folder names (``seeds_13_17_27`` ...); None = whatever exists.
    ``required``: the result files whose absence is listed (see load_ensemble).
    """
    records, missing = [], []
    for dataset in datasets:
        for method in methods:
            folder = os.path.join(results, dataset, method)
            found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) \
                if os.path.isdir(folder) else []
            expected = list(ensembles) if ensembles else found
            if not expected:
                missing.append(f"{folder} (no ensemble results)")
            for name in expected:
                directory = os.path.join(folder, name)
                if not os.path.isdir(directory):
                    missing.append(f"{directory} (folder missing)")
                    continue
                record, lost = load_ensemble(directory, wanted_sharpness, required)
                record.update(dataset=dataset, method=method, ensemble=name)
                records.append(record)
                missing += lost
    return records, missing


def mean_std(values):
    """(mean, sample std, count) of the finite values; NaN where undefined (std needs two)."""
    values = np.asarray([v for v in values if isinstance(v, float) and math.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return NAN, NAN, 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else NAN, len(values)


def ci95(std, n):
    """Half-width of the 95% t-interval of a mean of n values with sample std ``std`` (NaN for n < 2)."""
    return float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n >= 2 and math.isfinite(std) else NAN


def member_counts(records):
    """"3" or "2, 3": the member counts of the ensembles measured (None when unknown)."""
    counts = sorted({r["members"] for r in records if r.get("members")})
    return ", ".join(str(c) for c in counts) or None


def summarise(records, datasets, methods):
    """Accuracy rows (one per dataset × ID/OOD × method with data) for the table and Figure 7."""
    rows = []
    for dataset in datasets:
        for split in ("ID", "OOD"):
            for method in methods:
                chosen = [r for r in records if r["dataset"] == dataset and r["method"] == method]
                prefix = split.lower()
                ens = mean_std([r[f"{prefix}_ensemble_acc"] for r in chosen])
                ind = mean_std([r[f"{prefix}_individual_acc"] for r in chosen])
                gain = mean_std([r[f"{prefix}_ensemble_acc"] - r[f"{prefix}_individual_acc"] for r in chosen])
                if ens[2] == 0 and ind[2] == 0:
                    continue
                paper = PAPER.get((dataset, split), {}).get(method, (NAN, NAN))
                rows.append(dict(
                    dataset=dataset, split=split, test_set=dataset_label(dataset, split), method=method,
                    method_label=method_label(method), n_ensembles=ens[2],
                    members=member_counts(chosen), ensemble_acc_mean=ens[0], ensemble_acc_std=ens[1],
                    ensemble_acc_ci95=ci95(ens[1], ens[2]), individual_acc_mean=ind[0],
                    individual_acc_std=ind[1], individual_acc_ci95=ci95(ind[1], ind[2]), ensemble_gain_mean=gain[0],
                    paper_ensemble_acc=paper[0], ensemble_acc_diff=ens[0] - paper[0],
                    paper_individual_acc=paper[1], individual_acc_diff=ind[0] - paper[1]))
    return rows


def summarise_diversity(records, datasets, methods):
    """Sharpness and diversity rows (one per dataset × method with data)."""
    rows = []
    for dataset in datasets:
        for method in methods:
            chosen = [r for r in records if r["dataset"] == dataset and r["method"] == method]
            if not chosen:
                continue
            row = dict(dataset=dataset, method=method, method_label=method_label(method), n_ensembles=len(chosen),
                       sharpness_setting=", ".join(sorted({r["sharpness_setting"] for r in chosen
                                                           if r["sharpness_setting"]})) or None)
            for field in ("sharpness", "fisher", "ood_variance", "id_disagreement", "ood_disagreement",
                          "ood_ensemble_acc"):
                row[f"{field}_mean"], row[f"{field}_std"], n = mean_std([r[field] for r in chosen])
                row[f"{field}_ci95"] = ci95(row[f"{field}_std"], n)
            rows.append(row)
    return rows


def write_csv(path, rows, fields=None):
    """Rows (dicts) as CSV with the given columns (default: the first row's keys); NaN as an empty cell."""
    fields = fields or (list(rows[0]) if rows else ["note"])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def fmt(mean, std=NAN, digits=2):
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if math.isfinite(std) else text


def fmt_diff(value, digits=2):
    return f"{value:+.{digits}f}" if math.isfinite(value) else "—"


def tables_markdown(rows, diversity_rows, missing):
    """The Markdown report: accuracy table, sharpness/diversity table, missing inputs."""
    with_paper = any(math.isfinite(r["paper_ensemble_acc"]) for r in rows)
    lines = ["## Accuracy (%): ensemble and mean individual member, test set (ID) and corrupted test set (OOD)",
             "",
             "mean ± std over n ensembles of the method (no std with n = 1); ensemble gain = ensemble − mean "
             "individual. " + ("Paper = Figure 7 of Lu et al. (2024), Δ = this run − paper; — = not reported."
                               if with_paper else "The paper reports no numbers for these datasets, so there "
                               "are no paper columns (they appear for CIFAR-10/100 and Tiny-ImageNet)."), ""]
    if with_paper:
        lines += ["| Test set | Method | n | Ensemble acc. | Paper | Δ | Mean individual acc. | Paper | Δ | "
                  "Ensemble gain |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines += ["| Test set | Method | n | Ensemble acc. | Mean individual acc. | Ensemble gain |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ens = fmt(r["ensemble_acc_mean"], r["ensemble_acc_std"])
        ind = fmt(r["individual_acc_mean"], r["individual_acc_std"])
        if with_paper:
            lines.append(f"| {r['test_set']} | {r['method_label']} | {r['n_ensembles']} | {ens} | "
                         f"{fmt(r['paper_ensemble_acc'])} | {fmt_diff(r['ensemble_acc_diff'])} | {ind} | "
                         f"{fmt(r['paper_individual_acc'])} | {fmt_diff(r['individual_acc_diff'])} | "
                         f"{fmt_diff(r['ensemble_gain_mean'])} |")
        else:
            lines.append(f"| {r['test_set']} | {r['method_label']} | {r['n_ensembles']} | {ens} | {ind} | "
                         f"{fmt_diff(r['ensemble_gain_mean'])} |")
    if not rows:
        lines.append("| (no results) | | | | | |")
    settings = sorted({r["sharpness_setting"] for r in diversity_rows if r["sharpness_setting"]})
    lines += ["", "## Sharpness and diversity", "",
              "Sharpness: adaptive worst-case (APGD) loss increase, mean over members"
              + (f" (setting {', '.join(settings)})" if settings else "") + "; lower = flatter. "
              "Variance: logit variance across members on the corrupted test set; disagreement: fraction of "
              "inputs on which two members predict differently (mean over pairs); higher = more diverse.", "",
              "| Dataset | Method | n | Sharpness | Variance (OOD) | Disagreement (ID) | Disagreement (OOD) | "
              "Ensemble OOD acc. (%) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in diversity_rows:
        lines.append(f"| {dataset_label(r['dataset'])} | {r['method_label']} | {r['n_ensembles']} | "
                     f"{fmt(r['sharpness_mean'], r['sharpness_std'], 3)} | "
                     f"{fmt(r['ood_variance_mean'], r['ood_variance_std'], 3)} | "
                     f"{fmt(r['id_disagreement_mean'], r['id_disagreement_std'], 3)} | "
                     f"{fmt(r['ood_disagreement_mean'], r['ood_disagreement_std'], 3)} | "
                     f"{fmt(r['ood_ensemble_acc_mean'], r['ood_ensemble_acc_std'])} |")
    if not diversity_rows:
        lines.append("| (no results) | | | | | | | |")
    lines += ["", "## Missing inputs", ""]
    lines += [f"- {m}" for m in missing] if missing else ["none"]
    return "\n".join(lines) + "\n"
