"""What several test files build: fabricated data sets, member checkpoints, main.py commands and
the processes that run them, tiny models and batches. (Reference computations the tests compare
against are in tests/references.py; pytest fixtures shared across files in tests/conftest.py.)

Fabricated datasets are in the exact on-disk formats the real ones use, with small random images, so
tests exercise the real loading code without the real (unreachable) data: torchvision's CIFAR python
pickles, CIFAR-C ``.npy`` blocks, and Tiny-ImageNet folders in both the official val layout and the
class-foldered one.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------------------------ member checkpoints (main.py's format)
def save_member(path, seed, width=2, num_classes=10, dataset="cifar10", model="resnet18", with_meta=True):
    """An untrained member checkpoint at ``path`` with spread BatchNorm statistics (so members
    really differ), and the metadata main.py records unless ``with_meta`` is False."""
    from models import create_model
    from utils.checkpoint import save_checkpoint
    torch.manual_seed(seed)
    net = create_model(model, num_classes, width=width, dataset=dataset)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    state = {"state_dict": net.state_dict()}
    if with_meta:
        state.update(epoch=1, best_acc=0.1, seed=seed, model=model, width=width, dataset=dataset,
                     num_classes=num_classes)
    save_checkpoint(state, path)
    return path


def make_run(directory, dataset="cifar10", num_classes=10, seeds=(13, 17), width=2):
    """A run folder of untrained members: ``seed_<s>/model_best.pth.tar`` and ``checkpoint.pth.tar``."""
    for seed in seeds:
        for name in ("model_best.pth.tar", "checkpoint.pth.tar"):
            save_member(os.path.join(directory, f"seed_{seed}", name), seed, width=width,
                        num_classes=num_classes, dataset=dataset)
    return str(directory)


# ------------------------------------------------------------------ main.py commands and processes
# The smallest training a test needs: ResNet18 of width 4 on the CPU, no progress bar, batches of 64.
TINY = ["--width", "4", "--device", "cpu", "--no_progress", "--batch_size", "64"]
# A finished SharpBalance run with a split file and SAM masks at the lowest cost: the split at epoch
# 0, random subsets (no scoring). conftest.finished_sb_run trains it once per test process.
SB = ["--data", "digits", "--seed", "13", "17", "--epochs", "1", "--sam", "True", "--flat_ratio", "0.5",
      "--initial_epochs", "-1", "--train_subset", "random"] + TINY
# A two-epoch deep ensemble of one member.
DE = ["--data", "digits", "--seed", "13", "--epochs", "2"] + TINY
# Processes whose numbers are compared run with one thread each: the same numbers whatever else runs
# on the machine, and none of the torch settings other tests changed in the test process.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)


def run_python(args, timeout=300):
    """``python ARGS`` in the repository root, as a user runs a script; the finished process."""
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start_python(args, **kwargs):
    """``python ARGS`` started in the background (``subprocess.Popen``), as ``run_python`` runs it."""
    return subprocess.Popen([sys.executable] + args, cwd=ROOT, env=ENV, **kwargs)


def error_line(result):
    """The one line a refused command prints: exit status 2, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def load_saved(path):
    """What torch.save wrote to ``path`` (memory-mapped: tensors are read when used)."""
    return torch.load(path, weights_only=True, mmap=True)


def checkpoint_weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same_weights(a, b):
    """Two state dicts hold the same tensors, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ tiny models and batches
# SGD's and SAM's hyperparameters in the optimizer tests (training/sam.py, training/steps.py).
LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.1, 0.9, 5e-4, 0.2


def mlp(hidden=8):
    """A two-layer perceptron on (3, 2, 2) inputs with 4 classes, the same weights on every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def batch(size=10, shape=(3, 2, 2), seed=1):
    """(images, targets) of ``size`` random samples over 4 classes, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def make_sam(model, rho=RHO, **kwargs):
    from training.sam import SAM
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM,
               weight_decay=WEIGHT_DECAY, **kwargs)


def fp16_sam_member(init_scale):
    """(model, SAM optimizer, FastPath) of an fp16 member on the CPU whose loss scale starts at
    ``init_scale``."""
    from training.accel import FastPath
    from training.sam import SAM
    model = mlp(hidden=16)
    fast = FastPath("fp16", device="cpu")
    fast.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    fast.prepare(model)
    return model, SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9), fast


def current(model):
    """A copy of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


def assert_params(model, expected):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)


def tiny_bn_net(seed=0):
    """A convolution, BatchNorm with non-trivial running statistics (so eval mode differs from
    train mode) and a linear head over 3 classes, in eval mode: the sharpness tests' model."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def random_batches(n_batches=3, size=5, seed=1, shape=(3, 6, 6), classes=3):
    """[(images, targets), ...] of random samples, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((size,) + shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n_batches)]


def random_image_dataset(n, size=12, classes=10, seed=0, augment=True):
    """An ImageArrayDataset of ``n`` random uint8 images (size x size, RGB) over ``classes`` labels."""
    from data.arrays import ImageArrayDataset
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (n, size, size, 3)).astype(np.uint8)
    labels = rng.randint(0, classes, len(images))
    return ImageArrayDataset(images, labels, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), augment=augment)


def resnet_sam_member():
    """(ResNet18 of width 4 over 10 classes, its SAM optimizer), the same weights on every call."""
    from models import create_model
    from training.sam import SAM
    torch.manual_seed(0)
    model = create_model("resnet18", 10, width=4)
    return model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4)
