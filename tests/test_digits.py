"""The embedded digits dataset (data/digits.py): its images, split and statistics, the names of the
corruptions digits-C uses, and the generated digits-C (pinned sha256, blocks = severities, distortion
growing with severity, rebuilt only where a file is missing). The corruption functions themselves are
in tests/test_corruptions.py."""
import hashlib
import os

import numpy as np
import pytest

from data.corruptions import CORRUPTIONS, corrupt
from data.digits import (DIGITS_C_CORRUPTIONS, DIGITS_MEAN, DIGITS_STD, build_digits_c, digits_c_seed,
                         digits_split_indices, load_digits_images)

SPEC_ORDER = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")

# sha256 over (name, dtype, shape, raw bytes) of every digits-C array in DIGITS_C_CORRUPTIONS order,
# then labels; computed once when the corruptions were tuned. A change means digits-C drifted (code,
# numpy/scipy version or platform): rebuild numbers are then not comparable with earlier runs.
DIGITS_C_SHA256 = "3ef84cd73d712a663da4ef23648eb649af50688b7f593de04cae3de0335fd9a1"


def digits_c_digest(directory):
    digest = hashlib.sha256()
    for name in DIGITS_C_CORRUPTIONS + ("labels",):
        array = np.load(os.path.join(directory, name + ".npy"))
        digest.update(name.encode())
        digest.update(str(array.dtype).encode())
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def digits_c(tmp_path_factory):
    return build_digits_c(str(tmp_path_factory.mktemp("digits_root")))


# ------------------------------------------------------------------------------------- dataset
def test_images_and_labels_are_sklearns_digits_scaled_to_uint8():
    from sklearn.datasets import load_digits

    images, labels = load_digits_images()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    raw = load_digits()
    np.testing.assert_array_equal(labels, raw.target)
    expected = np.floor(raw.images * 255.0 / 16.0 + 0.5).astype(np.uint8)  # 0..16 -> 0..255
    for channel in range(3):
        np.testing.assert_array_equal(images[..., channel], expected)
    assert images.max() == 255 and images.min() == 0


def test_the_split_has_its_sizes_and_order_and_no_overlap():
    split = digits_split_indices()
    assert {k: len(v) for k, v in split.items()} == {"train": 1294, "val": 143, "test": 360}
    perm = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(split["test"], perm[:360])
    np.testing.assert_array_equal(split["val"], perm[360:503])
    np.testing.assert_array_equal(split["train"], perm[503:])
    everything = np.concatenate([split["train"], split["val"], split["test"]])
    assert len(set(everything.tolist())) == 1797 and sorted(everything.tolist()) == list(range(1797))
    again = digits_split_indices()
    for key in split:
        np.testing.assert_array_equal(split[key], again[key])


def test_mean_std_constants_match_training_split():
    images, _ = load_digits_images()
    train = images[digits_split_indices()["train"]].astype(np.float64) / 255.0
    np.testing.assert_allclose(DIGITS_MEAN, train.mean(axis=(0, 1, 2)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(DIGITS_STD, train.std(axis=(0, 1, 2)), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------- corruptions
def test_corruption_names_follow_the_spec_order_and_digits_c_takes_a_subset():
    assert CORRUPTIONS == SPEC_ORDER
    assert len(DIGITS_C_CORRUPTIONS) >= 12
    positions = [CORRUPTIONS.index(name) for name in DIGITS_C_CORRUPTIONS]
    assert positions == sorted(positions)
    assert digits_c_seed("gaussian_noise", 1) == 1 and digits_c_seed("jpeg_compression", 5) == 14005


# ----------------------------------------------------------------------------------- digits-C
def test_digits_c_has_its_shapes_labels_and_pinned_content(digits_c, digits_clean_test):
    _, test_labels = digits_clean_test
    names = sorted(os.listdir(digits_c))
    assert names == sorted([f"{name}.npy" for name in DIGITS_C_CORRUPTIONS] + ["labels.npy"])
    labels = np.load(os.path.join(digits_c, "labels.npy"))
    assert labels.dtype == np.int64 and labels.shape == (1800,)
    np.testing.assert_array_equal(labels, np.tile(test_labels, 5))
    for name in DIGITS_C_CORRUPTIONS:
        array = np.load(os.path.join(digits_c, name + ".npy"))
        assert array.dtype == np.uint8 and array.shape == (1800, 8, 8, 3), name
    assert digits_c_digest(digits_c) == DIGITS_C_SHA256


def test_digits_c_blocks_are_the_severities(digits_c, digits_clean_test):
    clean = digits_clean_test[0]
    array = np.load(os.path.join(digits_c, "contrast.npy"))
    for severity in (1, 5):
        block = array[(severity - 1) * 360:severity * 360]
        np.testing.assert_array_equal(block, corrupt(clean, "contrast", severity, digits_c_seed("contrast", severity)))


def test_digits_c_severity_is_monotone(digits_c, digits_clean_test):
    clean = digits_clean_test[0].astype(np.float64)
    for name in DIGITS_C_CORRUPTIONS:
        array = np.load(os.path.join(digits_c, name + ".npy")).astype(np.float64)
        distances = [np.abs(array[s * 360:(s + 1) * 360] - clean).mean() for s in range(5)]
        assert distances[0] > 0.5, (name, distances)  # severity 1 still changes the images
        assert all(b > a for a, b in zip(distances, distances[1:])), (name, distances)
        changed = np.any(array[:360] != clean, axis=(1, 2, 3)).mean()
        assert changed > 0.5, (name, changed)


def test_digits_c_build_is_reproducible_and_cached(digits_c, tmp_path, capsys):
    capsys.readouterr()
    other = build_digits_c(str(tmp_path))
    assert "digits-C" in capsys.readouterr().out
    for name in os.listdir(digits_c):
        with open(os.path.join(digits_c, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not [n for n in os.listdir(other) if n.startswith(".tmp")]
    # cached: nothing printed, nothing rewritten
    stamps = {n: os.stat(os.path.join(other, n)).st_mtime_ns for n in os.listdir(other)}
    assert build_digits_c(str(tmp_path)) == other
    assert capsys.readouterr().out == ""
    assert stamps == {n: os.stat(os.path.join(other, n)).st_mtime_ns for n in os.listdir(other)}
    # a missing or truncated file is rebuilt, and only that one
    os.remove(os.path.join(other, "fog.npy"))
    np.save(os.path.join(other, "labels.npy"), np.zeros(3, dtype=np.int64))
    build_digits_c(str(tmp_path))
    assert "2 files" in capsys.readouterr().out
    assert digits_c_digest(other) == DIGITS_C_SHA256
    for name, stamp in stamps.items():
        if name not in ("fog.npy", "labels.npy"):
            assert os.stat(os.path.join(other, name)).st_mtime_ns == stamp, name
