import pytest
import torch

from models import MODEL_NAMES, create_model
from utils.errors import UserError


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet18_parameter_counts_match_spec():
    # The CIFAR ResNet18 at width 64 (the released model).
    assert count(create_model("resnet18", 10)) == 11_173_962
    assert count(create_model("resnet18", 100)) == 11_220_132


def test_resnet18_hand_count_at_small_width():
    # Independent count from the architecture description, for any width k and C classes.
    def expected(k, classes):
        conv = lambda cin, cout, ks: cin * cout * ks * ks  # noqa: E731
        bn = lambda c: 2 * c  # noqa: E731
        total = conv(3, k, 3) + bn(k)
        cin = k
        for stage in range(4):
            c = k * 2 ** stage
            for block in range(2):
                total += conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
                if cin != c:
                    total += conv(cin, c, 1) + bn(c)
                cin = c
        return total + cin * classes + classes
    for k, classes in [(4, 10), (8, 100), (64, 10)]:
        assert count(create_model("resnet18", classes, width=k)) == expected(k, classes)


@pytest.mark.parametrize("size", [8, 32])
def test_resnet18_accepts_small_inputs(size):
    model = create_model("resnet18", 10, width=4).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_tiny_imagenet_variant_is_chosen_and_runs_at_64px():
    model = create_model("resnet18", 200, width=4, dataset="tiny_imgnet")
    assert type(model).__name__ == "TinyImageNetResNet"
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    # Same topology as the CIFAR one; only the initialisation differs.
    assert count(model) == count(create_model("resnet18", 200, width=4))


def test_wrn_40_2_parameter_count():
    # WRN-40-2 for CIFAR-10 has 2,243,546 parameters (Zagoruyko & Komodakis, 2.2M).
    assert count(create_model("wrn-40-2", 10)) == 2_243_546


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as err:
        create_model("resnet19", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)
