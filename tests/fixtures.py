"""Fabricated datasets in the exact on-disk formats the real ones use.

Small random images, so tests exercise the real loading code without the real (unreachable) data:
torchvision's CIFAR python pickles, CIFAR-C ``.npy`` blocks, and Tiny-ImageNet folders in both the
official val layout and the class-foldered one.
"""
import os
import pickle

import numpy as np


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar(root, name="cifar10", n_train=500, n_test=100, seed=0):
    """Write ``<root>/cifar-10-batches-py`` (5 train batches) or ``<root>/cifar-100-python``.

    Returns (train_images, train_labels, test_images, test_labels) as written, images in HWC uint8.
    Each class gets its own mean colour so a tiny network can learn something.
    """
    rng = np.random.RandomState(seed)
    num_classes = 10 if name == "cifar10" else 100
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    def sample(n):
        labels = rng.randint(0, num_classes, size=n)
        base = (labels[:, None, None, None] * 37 % 256).astype(np.float64)
        images = np.clip(base + rng.normal(0, 40, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    train_images, train_labels = sample(n_train)
    test_images, test_labels = sample(n_test)
    to_rows = lambda images: images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # noqa: E731
    if name == "cifar10":
        directory = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(directory, exist_ok=True)
        for i, chunk in enumerate(np.array_split(np.arange(n_train), 5)):
            _write_pickle(os.path.join(directory, f"data_batch_{i + 1}"),
                          {b"data": to_rows(train_images[chunk]), label_key: train_labels[chunk].tolist()})
        _write_pickle(os.path.join(directory, "test_batch"),
                      {b"data": to_rows(test_images), label_key: test_labels.tolist()})
        _write_pickle(os.path.join(directory, "batches.meta"), {b"label_names": [b"c%d" % i for i in range(10)]})
    else:
        directory = os.path.join(root, "cifar-100-python")
        os.makedirs(directory, exist_ok=True)
        _write_pickle(os.path.join(directory, "train"), {b"data": to_rows(train_images), label_key: train_labels.tolist()})
        _write_pickle(os.path.join(directory, "test"), {b"data": to_rows(test_images), label_key: test_labels.tolist()})
    return train_images, train_labels, test_images, test_labels


def make_cifar_c(root, test_images, test_labels, name="cifar10", corruptions=None, seed=1):
    """Write ``<root>/CIFAR-10-C/<corruption>.npy`` (5 severity blocks) and ``labels.npy``.

    Severity s adds noise of standard deviation 10·s, so higher severities really are harder.
    """
    from data.corruptions import CORRUPTIONS
    rng = np.random.RandomState(seed)
    directory = os.path.join(root, "CIFAR-10-C" if name == "cifar10" else "CIFAR-100-C")
    os.makedirs(directory, exist_ok=True)
    for corruption in corruptions or CORRUPTIONS:
        blocks = [np.clip(test_images + rng.normal(0, 10 * s, size=test_images.shape), 0, 255).astype(np.uint8)
                  for s in range(1, 6)]
        np.save(os.path.join(directory, f"{corruption}.npy"), np.concatenate(blocks))
    np.save(os.path.join(directory, "labels.npy"), np.tile(np.asarray(test_labels, dtype=np.int64), 5))
    return directory


def make_tiny_imagenet(root, num_classes=3, train_per_class=4, val_per_class=2, official_val=True,
                       size=64, seed=0, with_c=False):
    """Write a miniature ``<root>/tiny-imagenet-200`` tree; returns (tiny_dir, wnids in file order).

    wnids.txt is written unsorted on purpose: class index must be the position in the *sorted* list.
    """
    from PIL import Image
    rng = np.random.RandomState(seed)
    tiny = os.path.join(root, "tiny-imagenet-200")
    # Distinct random ids; rng.choice(10**8, replace=False) would permute 10**8 numbers (seconds, 800 MB).
    draws = list(dict.fromkeys(rng.randint(0, 10 ** 8, size=4 * num_classes).tolist()))[:num_classes]
    wnids = [f"n{x:08d}" for x in draws]
    os.makedirs(tiny, exist_ok=True)
    with open(os.path.join(tiny, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids[::-1]) + "\n")

    def save(path, label):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        colour = np.array([label * 60 % 256, 255 - label * 60 % 256, 128], dtype=np.float64)
        image = np.clip(colour + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path, quality=95)

    sorted_wnids = sorted(wnids)
    for label, wnid in enumerate(sorted_wnids):
        for i in range(train_per_class):
            save(os.path.join(tiny, "train", wnid, "images", f"{wnid}_{i}.JPEG"), label)
    lines = []
    for label, wnid in enumerate(sorted_wnids):
        for i in range(val_per_class):
            name = f"val_{label * val_per_class + i}.JPEG"
            if official_val:
                save(os.path.join(tiny, "val", "images", name), label)
                lines.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
            else:
                save(os.path.join(tiny, "val", wnid, name), label)
    if official_val:
        with open(os.path.join(tiny, "val", "val_annotations.txt"), "w") as f:
            f.write("\n".join(lines[::-1]) + "\n")
    if with_c:
        from data.corruptions import CORRUPTIONS
        for corruption in CORRUPTIONS:
            for severity in range(1, 6):
                for label, wnid in enumerate(sorted_wnids):
                    save(os.path.join(root, "Tiny-ImageNet-C", corruption, str(severity), wnid, f"c_{label}.JPEG"), label)
    return tiny, sorted_wnids
