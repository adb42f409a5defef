"""The test tool tests/host_reads.py (no product module): the host-read counter the loops' tests
rely on must see every kind of op it claims to count, and nothing else."""
import torch

from tests.host_reads import count_host_reads


def test_counter_sees_each_kind_of_host_read():
    x = torch.randn(6)
    mask = x > 0
    with count_host_reads() as reads:
        float(x.sum())              # .item() -> _local_scalar_dense
        bool(x.sum() > 0)           # is_nonzero, which reaches _local_scalar_dense
        x[mask]                     # boolean-mask indexing
        x.masked_select(mask)
        torch.where(mask)           # single-argument where = nonzero
        x[mask] = 0.0               # boolean-mask assignment
    assert reads.counts == {"_local_scalar_dense": 2, "index[bool mask]": 1, "masked_select": 1,
                            "nonzero": 1, "index_put_[bool mask]": 1}
    assert reads.total == 6


def test_counter_ignores_device_side_work():
    x = torch.randn(6)
    index = torch.tensor([0, 2, 4])
    with count_host_reads() as reads:
        x.index_select(0, index)
        x[index]                    # integer indexing: sizes known without reading the data
        torch.where(x > 0, x, torch.zeros_like(x))
        (x * 2).sum().sqrt()
    assert reads.total == 0, reads.summary()
