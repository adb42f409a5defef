"""Several processes (utils/distributed.py): ranks sharing a GPU use gloo (NCCL refuses two ranks on
one GPU), and torchrun with 3 gloo ranks on the CPU trains exactly what one process trains."""
import subprocess

import torch

from tests.fixtures import TINY, checkpoint_weights, run_python, same_weights, start_python
from utils.distributed import collective_backend, gpus_in_use


def test_ranks_sharing_a_gpu_use_gloo():
    # 3 ranks, 1 GPU: NCCL refuses two ranks on one GPU.
    assert collective_backend("cuda", 3, gpus_in_use("auto", 3, 1)) == "gloo"
    assert collective_backend("cuda", 3, gpus_in_use("cuda", 3, 2)) == "gloo"
    # One GPU per rank: NCCL.
    assert collective_backend("cuda", 3, gpus_in_use("cuda", 3, 4)) == "nccl"
    assert collective_backend("cuda", 1, gpus_in_use("auto", 1, 1)) == "nccl"
    # An explicit cuda:N puts every rank on that GPU.
    assert gpus_in_use("cuda:1", 3, 4) == 1 and collective_backend("cuda", 3, 1) == "gloo"
    assert collective_backend("cpu", 3, 0) == "gloo" and collective_backend("mps", 2, 0) == "gloo"


def test_torchrun_three_gloo_ranks_match_single_process(tmp_path):
    args = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--epochs", "2", "--seed", "13", "17", "27",
            "--sam", "True", "--flat_ratio", "0.5", "--initial_epochs", "0"] + TINY
    # both at once (one thread per process: the same numbers whatever else runs)
    single = start_python(["main.py"] + args + ["--save_path", str(tmp_path / "single")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    multi = run_python(["-m", "torch.distributed.run", "--nproc_per_node=3", "--master_port=29533", "main.py"]
                       + args + ["--save_path", str(tmp_path / "multi")])
    _, single_errors = single.communicate(timeout=300)
    assert single.returncode == 0, single_errors
    assert multi.returncode == 0, multi.stderr[-2000:]
    a = torch.load(tmp_path / "single" / "sharpbalance_split.pt", weights_only=True)
    b = torch.load(tmp_path / "multi" / "sharpbalance_split.pt", weights_only=True)
    assert torch.equal(a["sam_masks"], b["sam_masks"]) and torch.allclose(a["scores"], b["scores"])
    for seed in (13, 17, 27):
        assert same_weights(checkpoint_weights(tmp_path / "single" / f"seed_{seed}" / "checkpoint.pth.tar"),
                            checkpoint_weights(tmp_path / "multi" / f"seed_{seed}" / "checkpoint.pth.tar"))
