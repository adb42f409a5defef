"""In-memory image arrays and their batches (data/arrays.py): a loader's epoch is a pure function of
(seed, epoch), covers every sample once and keeps each image with its label."""
import torch

from data import BatchLoader, build_datasets
from tests.fixtures import make_cifar


def test_batch_loader_is_a_pure_function_of_seed_and_epoch(tmp_path):
    make_cifar(str(tmp_path), n_train=300, n_test=10)
    train = build_datasets("cifar10", str(tmp_path)).train
    loader = BatchLoader(train, batch_size=64, device="cpu", shuffle=True, seed=13)
    assert len(loader) == 5  # 270 samples: the last partial batch is kept

    def run(epoch):
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]
    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(first, again))
    assert not torch.equal(first[0][2], other[0][2])
    indices = torch.cat([i for _, _, i in first])
    assert sorted(indices.tolist()) == list(range(270))
    labels = torch.cat([y for _, y, _ in first])
    assert torch.equal(labels, torch.from_numpy(train.labels)[indices])
