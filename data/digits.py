"""The embedded offline dataset: scikit-learn's 8x8 handwritten digits, and its corrupted digits-C.

Images: ``sklearn.datasets.load_digits`` (1,797 images, 10 classes, bundled with scikit-learn, no
download). Pixels 0..16 become round(v * 255 / 16) and are replicated to three channels, so every
script sees an ordinary uint8 RGB image dataset (N, 8, 8, 3).

Split (``digits_split_indices``), fixed and documented:
    perm  = np.random.RandomState(0).permutation(1797)
    test  = perm[:360]            # 360 images, in permutation order
    rest  = perm[360:]            # the 1,437 others, in permutation order
    val   = rest[:1437 // 10]     # 143 images: the first N//10 of the permutation, as for CIFAR
    train = rest[1437 // 10:]     # 1,294 images
Order is kept (not sorted), like the CIFAR index files: per-sample scores are indexed by position.

digits-C (``build_digits_c``): every corruption of ``data.corruptions`` at severities 1..5 applied
to the 360 test images, stored exactly like CIFAR-10-C: ``<root>/digits-C/<corruption>.npy`` is
uint8 (5 * 360, 8, 8, 3), five consecutive blocks for severities 1..5, and ``labels.npy`` is int64
(5 * 360,), the test labels repeated five times. The seed of (corruption, severity) is
``1000 * (position of the corruption in CORRUPTIONS) + severity``.
"""
import os

import numpy as np

from data.corruptions import CORRUPTIONS, SEVERITIES, corrupt

N_DIGITS = 1797
N_TEST = 360

# Per-channel mean / std of the training split in [0, 1] units (population std over all training
# pixels); the three channels are equal because the images are gray. tests/test_digits.py recomputes
# them.
DIGITS_MEAN = (0.3055240817347032, 0.3055240817347032, 0.3055240817347032)
DIGITS_STD = (0.37634308572704345, 0.37634308572704345, 0.37634308572704345)

# Every corruption is implemented, so digits-C has all 15, in CIFAR-10-C's order (data.corruptions.CORRUPTIONS).
DIGITS_C_CORRUPTIONS = tuple(CORRUPTIONS)


def load_digits_images():
    """Return ``(images, labels)``: uint8 (1797, 8, 8, 3) and int64 (1797,).

    Intensities 0..16 map to round(v * 255 / 16) (0 -> 0, 8 -> 128, 16 -> 255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.rint(np.asarray(bunch.images, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=3))
    return images, np.asarray(bunch.target, dtype=np.int64)


def digits_split_indices():
    """The fixed split of the 1,797 images: ``dict(train=1294, val=143, test=360 indices)``.

    See the module docstring for the rule; all three are int64 arrays in permutation order."""
    perm = np.random.RandomState(0).permutation(N_DIGITS).astype(np.int64)
    test, rest = perm[:N_TEST], perm[N_TEST:]
    n_val = len(rest) // 10
    return {"train": rest[n_val:], "val": rest[:n_val], "test": test}


def digits_c_seed(corruption, severity):
    """Seed of one digits-C cell: 1000 * (index of ``corruption`` in CORRUPTIONS) + severity."""
    return 1000 * CORRUPTIONS.index(corruption) + int(severity)


def _is_valid(path, shape, dtype):
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == dtype


def build_digits_c(root):
    """Build (or find cached) ``<root>/digits-C`` and return its path.

    Files that already exist with the right shape and dtype are kept; only missing or malformed ones
    are (re)built. Prints nothing when everything is cached, one line when building.
    """
    directory = os.path.join(root, "digits-C")
    images, labels = load_digits_images()
    test = digits_split_indices()["test"]
    n_cells = len(SEVERITIES) * len(test)
    wanted = {"labels": ((n_cells,), np.dtype(np.int64))}
    for name in DIGITS_C_CORRUPTIONS:
        wanted[name] = ((n_cells,) + images.shape[1:], np.dtype(np.uint8))
    missing = [name for name, (shape, dtype) in wanted.items()
               if not _is_valid(os.path.join(directory, name + ".npy"), shape, dtype)]
    if not missing:
        return directory
    os.makedirs(directory, exist_ok=True)
    print(f"building digits-C ({len(missing)} files) in {directory}", flush=True)
    clean = images[test]
    for name in missing:
        if name == "labels":
            array = np.tile(labels[test], len(SEVERITIES))
        else:
            array = np.concatenate([corrupt(clean, name, s, digits_c_seed(name, s)) for s in SEVERITIES])
        # Atomic, so a reader never sees a half-written file (utils.checkpoint imports torch: only here).
        from utils.checkpoint import atomic_write
        atomic_write(os.path.join(directory, name + ".npy"), lambda f: np.save(f, array), mode="wb")
    return directory


if __name__ == "__main__":
    # python -m data.digits ROOT: build digits-C once (scripts/figure7.sh, before the measurements).
    import sys
    print("digits-C in", build_digits_c(sys.argv[1]))
