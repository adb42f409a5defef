"""Dataset registry: CIFAR-10/100, Tiny-ImageNet, the embedded digits, and their corrupted test sets.

Everything is read into memory as uint8 arrays once (CIFAR is 150 MB, Tiny-ImageNet 1.2 GB) and
handed to ``ImageArrayDataset``. Validation is always carved out of the training set by the same
rule, ``perm = RandomState(0).permutation(N)``, ``val = perm[:N//10]``, ``train = perm[N//10:]``, in
permutation order: this regenerates the released 45,000/5,000 CIFAR index files exactly, and the
SharpBalance scores are indexed by position in that training order.
"""
import os
import pickle
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from data.arrays import ImageArrayDataset
from data.corruptions import CORRUPTIONS
from utils.errors import UserError

DATASETS = ("cifar10", "cifar100", "tiny_imgnet", "digits")

DatasetInfo = namedtuple("DatasetInfo", "name num_classes image_size mean std crop_padding hflip corrupt_dirname")
Splits = namedtuple("Splits", "train train_eval val test info")


def dataset_info(name):
    """Static facts of a dataset: classes, image size, normalisation, augmentation, -C folder."""
    from data.digits import DIGITS_MEAN, DIGITS_STD
    table = {
        "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, "CIFAR-10-C"),
        "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True, "CIFAR-100-C"),
        "tiny_imgnet": DatasetInfo("tiny_imgnet", 200, 64, (0.480, 0.448, 0.397), (0.276, 0.269, 0.282), 4, True, "Tiny-ImageNet-C"),
        # Digits are 8x8, shown to the models at 16x16 (each pixel repeated 2x2, see
        # ``_digits_to_16px``); pad 2 px (1/8 of the side, as 4 px at 32x32) and never flip (a
        # mirrored 2 is not a 2).
        "digits": DatasetInfo("digits", 10, 16, tuple(DIGITS_MEAN), tuple(DIGITS_STD), 2, False, "digits-C"),
    }
    if name not in table:
        raise UserError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    return table[name]


def split_indices(num_train, seed=0):
    """(train_idx, val_idx) by the released rule; 50,000 -> 45,000 / 5,000."""
    perm = np.random.RandomState(seed).permutation(num_train)
    num_val = num_train // 10
    return perm[num_val:], perm[:num_val]


# ----------------------------------------------------------------------------------------- CIFAR
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _read_cifar_pickle(path, label_key, num_classes):
    """(images uint8 (n, 32, 32, 3), labels int64) of one torchvision CIFAR pickle, checked.

    Refused, naming the file: pixel data that is not integer (float data in [0, 1] would become
    0/1 pixels), values outside 0..255 (int16 data would wrap modulo 256), rows that are not
    3x32x32, labels outside the dataset's classes (they would stop training mid-epoch).
    """
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(entry[b"data"]), np.asarray(entry[label_key])
    except Exception as err:  # noqa: BLE001 - any failure here means a damaged file
        raise UserError(f"cannot read CIFAR file '{path}' ({type(err).__name__}: {str(err)[:120]}); "
                        "re-download and extract the python version of the dataset") from None
    expected = "expected uint8 pixel values 0..255 as in the python version of the dataset"
    if data.dtype.kind not in "ui":
        raise UserError(f"CIFAR file '{path}' holds {data.dtype} pixel data; {expected}")
    if data.dtype != np.uint8 and data.size and (int(data.min()) < 0 or int(data.max()) > 255):
        raise UserError(f"CIFAR file '{path}' holds {data.dtype} pixel values from {data.min()} to {data.max()}; "
                        f"{expected}")
    if data.size % (3 * 32 * 32):
        raise UserError(f"CIFAR file '{path}' holds {data.size} pixel values, not rows of 3x32x32 = 3072")
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise UserError(f"CIFAR file '{path}' holds {labels.dtype} labels of shape {labels.shape}; "
                        "expected a list of integer class indices")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"CIFAR file '{path}' holds labels from {labels.min()} to {labels.max()}; "
                        f"expected classes 0..{num_classes - 1}")
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if len(images) != len(labels):
        raise UserError(f"CIFAR file '{path}' has {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _download_cifar(name, root):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(root, train=True, download=True)
    except Exception as err:  # noqa: BLE001 - no network, proxy, disk full: all end the same way
        return f"{type(err).__name__}: {str(err)[:100]}"
    return None


def load_cifar(name, root, download=False):
    folder, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    directory = os.path.join(root, folder)
    expected = [os.path.join(directory, f) for f in train_files + test_files]
    missing = [p for p in expected if not os.path.isfile(p)]
    reason = _download_cifar(name, root) if missing and download else None
    missing = [p for p in expected if not os.path.isfile(p)]
    if missing:
        # Name the first missing file, not only the folder: a copy can lack a single batch.
        what = f"{name} file '{missing[0]}' is missing"
        if len(missing) == len(expected):
            what = f"{name} not found at '{directory}' ('{missing[0]}' is missing)"
        elif len(missing) > 1:
            what += f" (and {len(missing) - 1} more)"
        failed = f" and the download failed ({reason})" if reason else ""
        raise UserError(f"{what}{failed}; put the extracted python version ({folder}/ with "
                        f"{', '.join(train_files + test_files)}) under --data_path {root}")
    num_classes = dataset_info(name).num_classes
    train = [_read_cifar_pickle(os.path.join(directory, f), label_key, num_classes) for f in train_files]
    test = [_read_cifar_pickle(os.path.join(directory, f), label_key, num_classes) for f in test_files]
    stack = lambda parts: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))  # noqa: E731
    return stack(train), stack(test)


# ---------------------------------------------------------------------------------- Tiny-ImageNet
def tiny_root(data_path):
    """Accept the tiny-imagenet-200 folder itself or its parent."""
    for candidate in (data_path, os.path.join(data_path, "tiny-imagenet-200")):
        if os.path.isfile(os.path.join(candidate, "wnids.txt")):
            return candidate
    raise UserError(f"Tiny-ImageNet not found: no wnids.txt in '{data_path}' or '{data_path}/tiny-imagenet-200'; "
                    "download tiny-imagenet-200.zip, unzip it and pass its folder as --data_path")


def tiny_wnids(root):
    """Class index = position in the sorted wnids: the same for train, val and Tiny-ImageNet-C."""
    with open(os.path.join(root, "wnids.txt")) as f:
        return sorted(line.strip() for line in f if line.strip())


def _image_files(directory):
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith((".jpeg", ".jpg", ".png")))
    return [os.path.join(directory, n) for n in names]


# Images per class in the official sets; fewer (but equal) counts may be a deliberate subset.
TINY_PER_CLASS = {"train": 500, "val": 50, "Tiny-ImageNet-C": 50}
_warned = set()


def warn_once(message):
    """Print ``warning: <message>`` on stderr, once per process (the -C cells would repeat it 75 times)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def check_class_counts(counts, names, official, what):
    """Refuse an empty class or unequal counts (a partly extracted archive); warn when the equal
    count differs from the official one. ``names``: what to call each class in the message."""
    counts = np.asarray(counts)
    if counts.min() == 0:
        raise UserError(f"{names[int(counts.argmin())]} holds no images (expected {official}, as in the official "
                        f"{what}); a partly extracted archive? extract it again")
    if counts.min() != counts.max():
        low, high = int(counts.argmin()), int(counts.argmax())
        raise UserError(f"{names[low]} holds {counts[low]} images but {names[high]} holds {counts[high]}; "
                        f"the official {what} has {official} in every class: a partly extracted archive? "
                        "extract it again")
    if counts[0] != official:
        warn_once(f"{what} has {counts[0]} images per class (the official set has {official}); "
                  "fine for a deliberate subset, but numbers are not comparable with the paper's")


def class_folders(directory, wnids):
    """<directory>/<wnid>[/images] for every wnid; a missing one is a UserError."""
    folders = []
    for wnid in wnids:
        class_dir = os.path.join(directory, wnid)
        if os.path.isdir(os.path.join(class_dir, "images")):
            class_dir = os.path.join(class_dir, "images")
        if not os.path.isdir(class_dir):
            raise UserError(f"class folder '{class_dir}' is missing (wnid {wnid} is listed in wnids.txt)")
        folders.append(class_dir)
    return folders


def _class_folder_files(directory, wnids, official, what):
    """(path, label) for <directory>/<wnid>/[images/]*.JPEG, in sorted class then file order;
    the per-class counts are checked (``check_class_counts``) before anything is decoded."""
    folders = class_folders(directory, wnids)
    per_class = [_image_files(folder) for folder in folders]
    check_class_counts([len(p) for p in per_class], [f"class folder '{f}'" for f in folders], official, what)
    files = [path for paths in per_class for path in paths]
    labels = np.repeat(np.arange(len(wnids)), [len(p) for p in per_class])
    return files, labels.astype(np.int64)


def decode_images(paths, size, workers=8):
    """Decode image files to uint8 (N, size, size, 3); a wrong size names the file."""
    from PIL import Image

    def read(path):
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot read image '{path}' ({type(err).__name__})") from None
        if array.shape[:2] != (size, size):
            raise UserError(f"image '{path}' is {array.shape[1]}x{array.shape[0]}, expected {size}x{size}")
        return array

    if not paths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads give a real speed-up on 100,000 JPEGs.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(read, paths)))


def load_tiny_imagenet(data_path):
    root = tiny_root(data_path)
    wnids = tiny_wnids(root)
    train_files, train_labels = _class_folder_files(os.path.join(root, "train"), wnids, TINY_PER_CLASS["train"],
                                                    "Tiny-ImageNet train set")
    val_dir = os.path.join(root, "val")
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if os.path.isfile(annotations) and os.path.isdir(os.path.join(val_dir, "images")):
        # Official layout: one flat folder plus "<file>\t<wnid>\t..." lines.
        index_of = {wnid: i for i, wnid in enumerate(wnids)}
        val_files, val_labels = [], []
        with open(annotations) as f:
            for line in f:
                fields = line.strip().split("\t")
                if len(fields) < 2:
                    continue
                if fields[1] not in index_of:
                    raise UserError(f"'{annotations}' names wnid {fields[1]} that is not in wnids.txt")
                val_files.append(os.path.join(val_dir, "images", fields[0]))
                val_labels.append(index_of[fields[1]])
        order = np.argsort(val_files, kind="stable")
        val_files = [val_files[i] for i in order]
        val_labels = np.asarray(val_labels, dtype=np.int64)[order]
        check_class_counts(np.bincount(val_labels, minlength=len(wnids)),
                           [f"wnid {w} of '{annotations}'" for w in wnids], TINY_PER_CLASS["val"], "Tiny-ImageNet val set")
        missing = [path for path in val_files if not os.path.isfile(path)]
        if missing:
            raise UserError(f"'{missing[0]}' (listed in '{annotations}') is missing, and {len(missing) - 1} more; "
                            "a partly extracted archive? extract it again")
    else:
        val_files, val_labels = _class_folder_files(val_dir, wnids, TINY_PER_CLASS["val"], "Tiny-ImageNet val set")
    return (decode_images(train_files, 64), train_labels), (decode_images(val_files, 64), val_labels)


# ----------------------------------------------------------------------------------------- digits
def _digits_to_16px(images):
    """8x8 -> 16x16 by repeating every pixel 2x2 (lossless).

    Why: ResNet18 halves the resolution three times, so an 8x8 input reaches its last stage at 1x1
    and a train-mode BatchNorm fails on a sub-batch of one sample (which SharpBalance's mixed step
    can produce). At 16x16 the last stage is 2x2, as CIFAR's is 4x4. Repetition leaves the
    per-channel mean and std unchanged.
    """
    return np.ascontiguousarray(np.repeat(np.repeat(images, 2, axis=1), 2, axis=2))


# ------------------------------------------------------------------------------------------ build
def build_datasets(name, data_path="./datasets", tiny_val="holdout", download=False):
    """Train (augmented, with index), train_eval (no augmentation, with index), val and test."""
    info = dataset_info(name)
    if name in ("cifar10", "cifar100"):
        (train_images, train_labels), (test_images, test_labels) = load_cifar(name, data_path, download)
    elif name == "tiny_imgnet":
        (train_images, train_labels), (test_images, test_labels) = load_tiny_imagenet(data_path)
    else:
        from data.digits import digits_split_indices, load_digits_images
        images, labels = load_digits_images()
        images = _digits_to_16px(images)
        split = digits_split_indices()
        # Digits come with their own fixed three-way split; no second split is carved below.
        make = lambda idx, **kw: ImageArrayDataset(images[idx], labels[idx], info.mean, info.std,  # noqa: E731
                                                   crop_padding=info.crop_padding, hflip=info.hflip, **kw)
        train = make(split["train"], augment=True, return_index=True)
        return Splits(train, train.with_options(augment=False), make(split["val"]), make(split["test"]), info)

    if name == "tiny_imgnet" and tiny_val == "official":
        # The release's behaviour: all of train for training, the official val for both model
        # selection and testing.
        train_idx, val_images, val_labels = np.arange(len(train_labels)), test_images, test_labels
    else:
        train_idx, val_idx = split_indices(len(train_labels))
        val_images, val_labels = train_images[val_idx], train_labels[val_idx]
    common = dict(mean=info.mean, std=info.std, crop_padding=info.crop_padding, hflip=info.hflip)
    train = ImageArrayDataset(train_images[train_idx], train_labels[train_idx], augment=True, return_index=True, **common)
    val = ImageArrayDataset(val_images, val_labels, **common)
    test = ImageArrayDataset(test_images, test_labels, **common)
    return Splits(train, train.with_options(augment=False), val, test, info)


# -------------------------------------------------------------------------------- corrupted sets
def _load_npy(path, what):
    if not os.path.isfile(path):
        raise UserError(f"corruption file '{path}' is missing ({what})")
    try:
        return np.load(path, mmap_mode="r")
    except Exception as err:  # noqa: BLE001 - truncated or not an .npy file
        raise UserError(f"corruption file '{path}' is malformed ({type(err).__name__}: {str(err)[:100]})") from None


def _npy_labels(directory, num_classes):
    """labels.npy of a CIFAR-C style folder: integer class indices in [0, num_classes)."""
    path = os.path.join(directory, "labels.npy")
    labels = _load_npy(path, "labels for every corruption")
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise UserError(f"'{path}' holds {labels.dtype} of shape {labels.shape}; expected integer class indices (5*n,)")
    # np.array copies out of the memory map: a read-only view would make torch warn later.
    labels = np.array(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"'{path}' holds labels from {labels.min()} to {labels.max()}; "
                        f"expected classes 0..{num_classes - 1}")
    return labels


def _npy_blocks(directory, corruption, labels, image_size):
    """Memory-map <corruption>.npy (only its header is read) and check its dtype and shape against
    labels.npy; returns (blocks, images per severity)."""
    path = os.path.join(directory, f"{corruption}.npy")
    blocks = _load_npy(path, f"severities 1-5 of {corruption}")
    if blocks.dtype != np.uint8 or blocks.ndim != 4 or blocks.shape[1:] != (image_size, image_size, 3) \
            or blocks.shape[0] % 5 != 0:
        raise UserError(f"corruption file '{path}' has dtype {blocks.dtype} and shape {blocks.shape}; "
                        f"expected uint8 (5*n, {image_size}, {image_size}, 3): five severity blocks of n images")
    per_severity = blocks.shape[0] // 5
    if len(labels) not in (per_severity, 5 * per_severity):
        raise UserError(f"corruption file '{path}' has shape {blocks.shape} ({per_severity} images per severity), "
                        f"but '{os.path.join(directory, 'labels.npy')}' has {len(labels)} labels; expected "
                        f"{len(labels)} rows (a truncated or partly written file?)")
    return blocks, per_severity


def _npy_corrupted_sets(directory, corruptions, info, image_size):
    labels = _npy_labels(directory, info.num_classes)
    for corruption in corruptions:
        blocks, per_severity = _npy_blocks(directory, corruption, labels, image_size)
        for severity in range(1, 6):
            rows = slice((severity - 1) * per_severity, severity * per_severity)
            block_labels = labels[rows] if len(labels) == 5 * per_severity else labels
            images = np.array(blocks[rows])
            if info.name == "digits":
                images = _digits_to_16px(images)
            yield corruption, severity, ImageArrayDataset(images, block_labels, info.mean, info.std)


def _tiny_cell_files(directory, corruption, severity, wnids):
    folder = os.path.join(directory, corruption, str(severity))
    if not os.path.isdir(folder):
        raise UserError(f"Tiny-ImageNet-C folder '{folder}' is missing")
    return _class_folder_files(folder, wnids, TINY_PER_CLASS["Tiny-ImageNet-C"],
                              "Tiny-ImageNet-C (each corruption and severity)")


def _tiny_corrupted_sets(directory, corruptions, info, wnids):
    for corruption in corruptions:
        for severity in range(1, 6):
            files, labels = _tiny_cell_files(directory, corruption, severity, wnids)
            yield corruption, severity, ImageArrayDataset(decode_images(files, 64), labels, info.mean, info.std)


def _corrupt_directory(name, data_path, corrupt_path):
    info = dataset_info(name)
    root = corrupt_path or data_path
    if name == "digits":
        from data.digits import build_digits_c
        return build_digits_c(root)  # generated (or found cached and valid) here
    directory = os.path.join(root, info.corrupt_dirname)
    if not os.path.isdir(directory):
        raise UserError(f"{info.corrupt_dirname} not found at '{directory}'; put the extracted "
                        f"{info.corrupt_dirname} folder under --corrupt_path (default --data_path)")
    return directory


def check_corrupted_files(name, data_path="./datasets", corrupt_path=None, corruptions=None):
    """Check every selected -C input without reading pixels, so a damaged file stops a measurement
    before its first long pass: CIFAR-C .npy headers (uint8, (5*n, 32, 32, 3), rows matching
    labels.npy) and the labels' range; every Tiny-ImageNet-C (corruption, severity) class folder
    present, non-empty and equally filled (nothing decoded)."""
    corruptions = corruption_names(name) if corruptions is None else corruptions
    if not corruptions:
        return
    directory = _corrupt_directory(name, data_path, corrupt_path)
    if name == "tiny_imgnet":
        wnids = tiny_wnids(tiny_root(data_path))
        for corruption in corruptions:
            for severity in range(1, 6):
                _tiny_cell_files(directory, corruption, severity, wnids)
        return
    labels = _npy_labels(directory, dataset_info(name).num_classes)
    for corruption in corruptions:
        _npy_blocks(directory, corruption, labels, image_size=8 if name == "digits" else 32)


def corrupted_test_sets(name, data_path="./datasets", corrupt_path=None, corruptions=None):
    """Yield ``(corruption, severity, dataset)`` over the -C set in CORRUPTIONS order, one cell at a time.

    ``corruptions``: the ones to read (default all, in CORRUPTIONS order). Only one (corruption, severity)
    cell is in memory at once. CIFAR: ``<root>/CIFAR-10-C/*.npy``; Tiny:
    ``<root>/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/``; digits: generated and cached under
    ``<root>/digits-C`` on first use. ``root`` = ``corrupt_path`` or ``data_path``.
    """
    info = dataset_info(name)
    # Always in CORRUPTIONS order, whatever order the selection was given in.
    corruptions = [c for c in corruption_names(name) if corruptions is None or c in corruptions]
    directory = _corrupt_directory(name, data_path, corrupt_path)
    if name == "tiny_imgnet":
        yield from _tiny_corrupted_sets(directory, corruptions, info, tiny_wnids(tiny_root(data_path)))
    else:
        yield from _npy_corrupted_sets(directory, corruptions, info, image_size=8 if name == "digits" else 32)


def corrupted_sources(name, data_path, corrupt_path, corruption, severity):
    """The files (folders for Tiny-ImageNet-C) one -C cell is read from."""
    root = corrupt_path or data_path
    directory = os.path.join(root, dataset_info(name).corrupt_dirname)
    if name == "tiny_imgnet":
        folder = os.path.join(directory, corruption, str(severity))
        return [folder] + class_folders(folder, tiny_wnids(tiny_root(data_path)))
    return [os.path.join(directory, f"{corruption}.npy"), os.path.join(directory, "labels.npy")]


def clean_sources(name, data_path):
    """The files (folders for Tiny-ImageNet) the clean splits are read from; none for digits."""
    if name in _CIFAR_LAYOUT:
        folder, train_files, test_files, _ = _CIFAR_LAYOUT[name]
        return [os.path.join(data_path, folder, f) for f in train_files + test_files]
    if name == "tiny_imgnet":
        root = tiny_root(data_path)
        return [os.path.join(root, "wnids.txt"), os.path.join(root, "train"), os.path.join(root, "val")]
    return []


def corruption_names(name):
    """The corruptions ``corrupted_test_sets`` iterates for ``name``, in order."""
    if name == "digits":
        from data.digits import DIGITS_C_CORRUPTIONS
        return tuple(DIGITS_C_CORRUPTIONS)
    dataset_info(name)
    return tuple(CORRUPTIONS)
