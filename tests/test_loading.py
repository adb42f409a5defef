"""Loading an ensemble for the measure scripts (measure/loading.py): member checkpoints found in a run
folder in seed order, and a model rebuilt from its weights alone. (Refusals of incomplete, foreign or
stale members are tested through the scripts, in tests/test_measure_scripts.py and
tests/test_run_folder.py.)"""
import os

import pytest

from measure import loading
from measure.loading import build_model
from models import create_model
from tests.fixtures import make_run
from utils.errors import UserError


def test_member_checkpoints_are_found_in_seed_order_and_a_missing_best_is_named(tmp_path):
    run = make_run(tmp_path / "run", seeds=(27, 13, 113))
    found = loading.find_member_checkpoints([run], "best")
    assert [os.path.basename(os.path.dirname(p)) for p in found] == ["seed_13", "seed_27", "seed_113"]
    assert loading.find_member_checkpoints([os.path.join(run, "seed_27")], "last")[0].endswith(
        os.path.join("seed_27", "checkpoint.pth.tar"))
    os.remove(os.path.join(run, "seed_27", "model_best.pth.tar"))
    with pytest.raises(UserError, match="--checkpoint last"):
        loading.find_member_checkpoints([run], "best")


def test_either_tiny_imagenet_variant_is_rebuilt_from_its_weights():
    for scaled in (True, False):
        trained = create_model("resnet18", 200, width=4, dataset="tiny_imgnet", shortcut_scale=scaled)
        spec = {"model": "resnet18", "width": 4, "num_classes": 200}
        rebuilt = build_model("member.pth.tar", {"state_dict": trained.state_dict()}, spec, "tiny_imgnet")
        assert rebuilt.state_dict().keys() == trained.state_dict().keys()
