"""Devices (utils/device.py): --cudnn sets exactly the torch flags each setting names, main.py and the
measure scripts apply it, args.json records it and a resume with another setting is refused with one
line; torchrun's ranks map round robin onto the visible GPUs."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import main as main_script
import measure_diversity
import measure_diversity_variance
import measure_sharpness
from utils.device import CUBLAS_WORKSPACE_ENV, apply_cudnn, select_device
from utils.errors import UserError

# Written out here, apart from utils/device.py: (cudnn.benchmark, cudnn.deterministic,
# torch.use_deterministic_algorithms). "released" is what the authors' main.py set; "torch" is what a
# fresh process has (checked against one below).
EXPECTED = {
    "benchmark": (True, False, False),
    "deterministic": (False, True, True),
    "released": (True, True, False),
    "torch": (False, False, False),
}


def torch_flags():
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled())


@pytest.fixture
def restore_flags(monkeypatch):
    """The flags are process-wide: put back what the test process had."""
    saved = torch_flags(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    yield
    (benchmark, deterministic, algorithms), warn_only = saved
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


@pytest.mark.parametrize("before", list(EXPECTED))
def test_each_setting_sets_exactly_its_flags_whatever_came_before(before, restore_flags):
    for setting, flags in EXPECTED.items():
        apply_cudnn(before)
        assert apply_cudnn(setting) == flags
        assert torch_flags() == flags, setting
        # An operation without a deterministic implementation warns: it must not stop a long run.
        assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_torch_setting_is_a_fresh_process_and_deterministic_fixes_cublas(restore_flags):
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cudnn.benchmark, "
                           "torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(flag) for flag in EXPECTED["torch"]]
    apply_cudnn("benchmark")
    assert CUBLAS_WORKSPACE_ENV not in os.environ
    apply_cudnn("deterministic")
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:8"
    os.environ[CUBLAS_WORKSPACE_ENV] = ":16:8"  # the user's own deterministic choice is kept
    apply_cudnn("deterministic")
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16:8"


def test_a_non_deterministic_cublas_workspace_is_one_line(restore_flags, monkeypatch):
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":0:0")
    apply_cudnn("torch")
    with pytest.raises(UserError, match=r"CUBLAS_WORKSPACE_CONFIG=:0:0 makes cuBLAS non-deterministic"):
        apply_cudnn("deterministic")
    assert torch_flags() == EXPECTED["torch"]  # nothing was changed by the refused setting
    with pytest.raises(UserError, match="unknown --cudnn setting 'fast'"):
        apply_cudnn("fast")


@pytest.mark.parametrize("script", [main_script, measure_diversity, measure_diversity_variance, measure_sharpness])
def test_help_shows_every_setting_and_the_default(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = script.get_parser().format_help()
    entry = " ".join(re.search(r"\n  --cudnn .*?(?=\n  -|\n\n)", text, re.S).group(0).split())
    assert entry.endswith("(default: benchmark)"), entry
    for setting in EXPECTED:
        assert f"{setting} = " in entry


def test_main_and_measure_scripts_apply_it_and_a_resume_must_match(tmp_path, restore_flags):
    common = ["--data", "digits", "--data_path", str(tmp_path / "ds"), "--width", "2", "--epochs", "1",
              "--seed", "13", "--device", "cpu", "--no_progress", "--save_path", str(tmp_path / "run")]
    main_script.main(common + ["--cudnn", "released"])
    assert torch_flags() == EXPECTED["released"]
    checkpoint = tmp_path / "run" / "seed_13" / "checkpoint.pth.tar"
    assert torch.load(checkpoint, weights_only=True)["run_args"]["cudnn"] == "released"
    assert json.loads((tmp_path / "run" / "args.json").read_text())["cudnn"] == "released"
    before = checkpoint.read_bytes()

    with pytest.raises(UserError) as refused:
        main_script.main(common + ["--epochs", "1", "--cudnn", "benchmark"])
    assert "cudnn: 'released' -> 'benchmark'" in str(refused.value) and "\n" not in str(refused.value)
    assert checkpoint.read_bytes() == before

    measure_diversity.main(["--dataset", "digits", "--data_path", str(tmp_path / "ds"), "--resume",
                            str(tmp_path / "run"), "--device", "cpu", "--cudnn", "deterministic",
                            "--mode", "predict", "--save", str(tmp_path / "measure")])
    assert torch_flags() == EXPECTED["deterministic"]


def test_ranks_map_round_robin_onto_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [select_device("auto", local_rank=r).index for r in range(3)] == [0, 0, 0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [select_device("cuda", local_rank=r).index for r in range(3)] == [0, 1, 0]
    assert [select_device("cuda:1", local_rank=r).index for r in range(3)] == [1, 1, 1]


def test_cpu_name_reads_family_model_and_vector_width(tmp_path):
    """cpu_name from hand-written /proc/cpuinfo excerpts: the first processor's fields only, the widest
    vector extension named, the bare model name when the file has nothing else."""
    from utils.device import cpu_name
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n\n")
    cases = (("avx avx2 avx512f avx512bw", "AMD EPYC (family 25, model 17, AVX-512)"),
             ("avx avx2", "AMD EPYC (family 25, model 17, AVX2)"),
             ("avx", "AMD EPYC (family 25, model 17, no AVX2)"))
    for flags, expected in cases:
        path = tmp_path / "cpuinfo"
        path.write_text(block.format(n=0, model=17, flags=flags) + block.format(n=1, model=99, flags=""))
        assert cpu_name(str(path)) == expected
    path.write_text("model name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_name(str(path)) == "Intel(R) Xeon(R) Platinum 8480+"
