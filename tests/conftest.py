"""Test configuration: make the repository root importable, keep torch to one thread, and the
fixtures several test files share.

One thread keeps timings stable on the 2-core CI machine and avoids oversubscription when
tests start subprocesses.

The shared fixtures are session-scoped: each test process (each pytest-xdist worker) builds them
once, whichever files its tests come from. Tests that change a shared run folder copy it first.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def finished_sb_run(tmp_path_factory):
    """A finished 2-member SharpBalance run (``tests.fixtures.SB``: seeds 13 and 17, one epoch, the
    split file and SAM masks), written under umask 027 so that its files' modes show the umask."""
    import main as main_script
    from tests.fixtures import SB
    root = tmp_path_factory.mktemp("sb")
    old = os.umask(0o027)
    try:
        main_script.main(SB + ["--data_path", str(root / "ds"), "--save_path", str(root / "run")])
    finally:
        os.umask(old)
    return root / "run"


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A --data_path for digits (digits-C is built there by the first command that needs it)."""
    return str(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits(digits_root):
    """The digits splits (data.build_datasets)."""
    from data import build_datasets
    return build_datasets("digits", digits_root)


@pytest.fixture(scope="session")
def digits_clean_test():
    """(images, labels) of the digits test split at 8x8, before any corruption."""
    from data.digits import digits_split_indices, load_digits_images
    images, labels = load_digits_images()
    test = digits_split_indices()["test"]
    return images[test], labels[test]
