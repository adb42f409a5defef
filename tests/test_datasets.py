"""The data sets (data/datasets.py): the released train/val split, CIFAR pickles, CIFAR-C blocks and
Tiny-ImageNet(-C) folders fabricated in their real formats (tests/fixtures.py) read into the right
images, labels and order; missing, partial or damaged files refused with one line naming the file."""
import os

import numpy as np
import pytest
import torch

from data import CORRUPTIONS, build_datasets, corrupted_test_sets, dataset_info, split_indices
from tests.fixtures import make_cifar, make_cifar_c, make_tiny_imagenet
from utils.errors import UserError


def test_split_matches_released_index_files():
    # The first entries of the released valid_idx.npy / train_idx.npy.
    train_idx, val_idx = split_indices(50000)
    assert len(train_idx) == 45000 and len(val_idx) == 5000
    assert val_idx[:5].tolist() == [11841, 19602, 45519, 25747, 42642]
    assert train_idx[:5].tolist() == [19977, 31768, 43126, 29441, 6245]
    assert len(np.union1d(train_idx, val_idx)) == 50000


def test_split_rule_for_other_sizes_keeps_permutation_order():
    perm = np.random.RandomState(0).permutation(730)
    train_idx, val_idx = split_indices(730)
    assert val_idx.tolist() == perm[:73].tolist() and train_idx.tolist() == perm[73:].tolist()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_load_into_the_split(tmp_path, name):
    train_images, train_labels, test_images, test_labels = make_cifar(str(tmp_path), name, n_train=300, n_test=50)
    splits = build_datasets(name, str(tmp_path))
    train_idx, val_idx = split_indices(300)
    assert np.array_equal(splits.train.images, train_images[train_idx])
    assert np.array_equal(splits.train.labels, train_labels[train_idx])
    assert np.array_equal(splits.val.images, train_images[val_idx])
    assert np.array_equal(splits.test.labels, test_labels)
    assert splits.info.num_classes == (10 if name == "cifar10" else 100)
    # Items: normalised with the dataset's statistics; training items carry their index.
    image, label, index = splits.train_eval[7]
    info = dataset_info(name)
    expected = (torch.from_numpy(train_images[train_idx[7]]).permute(2, 0, 1).float() / 255
                - torch.tensor(info.mean).view(3, 1, 1)) / torch.tensor(info.std).view(3, 1, 1)
    assert torch.allclose(image, expected, atol=1e-6) and label == train_labels[train_idx[7]] and index == 7


def test_missing_cifar_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        build_datasets("cifar10", str(tmp_path / "nowhere"))


def test_missing_cifar_batch_file_is_named_with_or_without_a_download(tmp_path, monkeypatch, capsys):
    """One batch file of an extracted copy is gone: the line names that file, also when main.py's
    download (rank 0) was tried and failed, as it does offline."""
    import main as train_main
    from data import datasets
    from utils.errors import run_main
    make_cifar(str(tmp_path), n_train=50, n_test=10)
    missing = os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_3")
    os.remove(missing)
    with pytest.raises(UserError, match=f"cifar10 file '{missing}' is missing; put the extracted python version"):
        build_datasets("cifar10", str(tmp_path))
    tried = []
    monkeypatch.setattr(datasets, "_download_cifar", lambda name, root: tried.append(root) or "URLError: offline")
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main.main, ["--data", "cifar10", "--data_path", str(tmp_path), "--epochs", "1",
                                   "--save_path", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and tried == [str(tmp_path)] and len(err) == 1, err
    assert err[0].startswith(f"error: cifar10 file '{missing}' is missing and the download failed (URLError: offline)")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="cifar10, cifar100, tiny_imgnet, digits"):
        build_datasets("mnist", ".")


def test_cifar_c_is_read_in_corruption_order_one_block_per_severity(tmp_path):
    _, _, test_images, test_labels = make_cifar(str(tmp_path), n_train=100, n_test=20)
    make_cifar_c(str(tmp_path), test_images, test_labels)
    cells = list(corrupted_test_sets("cifar10", str(tmp_path)))
    assert [(c, s) for c, s, _ in cells] == [(c, s) for c in CORRUPTIONS for s in range(1, 6)]
    blocks = np.load(os.path.join(tmp_path, "CIFAR-10-C", "fog.npy"))
    fog3 = [d for c, s, d in cells if (c, s) == ("fog", 3)][0]
    assert np.array_equal(fog3.images, blocks[40:60]) and np.array_equal(fog3.labels, test_labels)


def test_truncated_npy_names_the_file(tmp_path):
    _, _, test_images, test_labels = make_cifar(str(tmp_path), n_train=100, n_test=20)
    directory = make_cifar_c(str(tmp_path), test_images, test_labels)
    path = os.path.join(directory, "snow.npy")
    with open(path, "rb") as f:
        head = f.read(200)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(UserError, match="snow.npy"):
        list(corrupted_test_sets("cifar10", str(tmp_path)))


def test_missing_corruption_file_names_it(tmp_path):
    _, _, test_images, test_labels = make_cifar(str(tmp_path), n_train=100, n_test=20)
    directory = make_cifar_c(str(tmp_path), test_images, test_labels, corruptions=CORRUPTIONS[:3])
    with pytest.raises(UserError, match=os.path.join(directory, CORRUPTIONS[3] + ".npy")):
        list(corrupted_test_sets("cifar10", str(tmp_path)))


@pytest.mark.parametrize("official_val", [True, False])
def test_tiny_imagenet_class_index_is_sorted_wnid_position(tmp_path, official_val):
    tiny, sorted_wnids = make_tiny_imagenet(str(tmp_path), num_classes=3, train_per_class=10,
                                            val_per_class=2, official_val=official_val)
    splits = build_datasets("tiny_imgnet", str(tmp_path))  # the parent folder is accepted too
    assert len(splits.train) + len(splits.val) == 30 and len(splits.val) == 3
    assert sorted(splits.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # Fixture images carry their class in the red channel: label*60.
    for dataset in (splits.train_eval, splits.val, splits.test):
        red = dataset.images[..., 0].reshape(len(dataset), -1).mean(1)
        assert np.all(np.abs(red - dataset.labels * 60) < 12)
    official = build_datasets("tiny_imgnet", tiny, tiny_val="official")
    assert len(official.train) == 30 and np.array_equal(official.val.labels, official.test.labels)


def test_tiny_imagenet_c_uses_the_same_mapping(tmp_path):
    make_tiny_imagenet(str(tmp_path), num_classes=3, train_per_class=2, val_per_class=1, with_c=True)
    cells = list(corrupted_test_sets("tiny_imgnet", str(tmp_path)))
    assert len(cells) == 75 and cells[0][:2] == ("gaussian_noise", 1) and cells[-1][:2] == ("jpeg_compression", 5)
    for _, _, dataset in cells[:3]:
        red = dataset.images[..., 0].reshape(len(dataset), -1).mean(1)
        assert np.all(np.abs(red - dataset.labels * 60) < 12)


def test_tiny_imagenet_wrong_image_size_names_the_file(tmp_path):
    tiny, sorted_wnids = make_tiny_imagenet(str(tmp_path), num_classes=2, train_per_class=2, val_per_class=1)
    from PIL import Image
    bad = os.path.join(tiny, "train", sorted_wnids[1], "images", f"{sorted_wnids[1]}_0.JPEG")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"_0\.JPEG' is 32x32, expected 64x64"):
        build_datasets("tiny_imgnet", tiny)


def test_missing_tiny_imagenet_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="wnids.txt"):
        build_datasets("tiny_imgnet", str(tmp_path))


# ------------------------------------------------------------------ bad data: refuse or warn
def _rewrite_cifar_batch(root, name, change):
    import pickle
    path = os.path.join(root, "cifar-10-batches-py", name)
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return path


@pytest.mark.parametrize("case, change, expected", [
    # float data in [0, 1] would become 0/1 pixels
    ("float", lambda e: e.update({b"data": e[b"data"] / 255.0}), "float64 pixel data; expected uint8"),
    # int16 values above 255 would wrap modulo 256 (300 -> 44)
    ("int16", lambda e: e.update({b"data": e[b"data"].astype(np.int16) + 100}),
     r"int16 pixel values from \d+ to \d+; expected uint8"),
    # a label outside 0..9 used to stop training mid-epoch with an IndexError
    ("label", lambda e: e.update({b"labels": e[b"labels"][:-1] + [10]}), "labels from 0 to 10; expected classes 0..9"),
])
def test_bad_cifar_pickles_are_refused_naming_the_file(tmp_path, case, change, expected):
    make_cifar(str(tmp_path), n_train=50, n_test=10)
    path = _rewrite_cifar_batch(str(tmp_path), "data_batch_3", change)
    with pytest.raises(UserError, match=f"CIFAR file '{path}' holds {expected}"):
        build_datasets("cifar10", str(tmp_path))


def test_bad_cifar_pickle_is_one_error_line_from_main(tmp_path, capsys):
    import main as train_main
    from utils.errors import run_main
    make_cifar(str(tmp_path), n_train=50, n_test=10)
    path = _rewrite_cifar_batch(str(tmp_path), "test_batch", lambda e: e.update({b"data": e[b"data"] / 255.0}))
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main.main, ["--data", "cifar10", "--data_path", str(tmp_path), "--epochs", "1",
                                   "--save_path", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: CIFAR file '{path}'"), err


def test_tiny_imagenet_partial_extraction_is_refused(tmp_path):
    tiny, wnids = make_tiny_imagenet(str(tmp_path), num_classes=3, train_per_class=3, val_per_class=1,
                                     official_val=False)
    images = os.path.join(tiny, "train", wnids[1], "images")
    os.remove(os.path.join(images, f"{wnids[1]}_2.JPEG"))  # one class short: unequal counts
    with pytest.raises(UserError, match=f"class folder '{images}' holds 2 images but .* holds 3; the official "
                                        "Tiny-ImageNet train set has 500 in every class"):
        build_datasets("tiny_imgnet", tiny)
    for name in os.listdir(images):  # an empty class folder
        os.remove(os.path.join(images, name))
    with pytest.raises(UserError, match=f"class folder '{images}' holds no images"):
        build_datasets("tiny_imgnet", tiny)


def test_tiny_imagenet_small_equal_subset_warns_once(tmp_path, capsys):
    tiny, _ = make_tiny_imagenet(str(tmp_path), num_classes=2, train_per_class=20, val_per_class=2)
    from data import datasets
    datasets._warned.clear()
    splits = build_datasets("tiny_imgnet", tiny)
    build_datasets("tiny_imgnet", tiny)
    assert len(splits.train) + len(splits.val) == 40
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: Tiny-ImageNet train set has 20 images per class (the official set has 500); fine for "
                   "a deliberate subset, but numbers are not comparable with the paper's",
                   "warning: Tiny-ImageNet val set has 2 images per class (the official set has 50); fine for "
                   "a deliberate subset, but numbers are not comparable with the paper's"], err
