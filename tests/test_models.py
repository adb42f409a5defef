"""The models (models/: ResNet18 for CIFAR and for Tiny-ImageNet with its shortcut scales,
WRN-40-2): parameter counts against published numbers and hand counts, input sizes, the shortcut
scale's forward and its gradient in closed form, unknown names refused. (Per-sample scores of the
Tiny-ImageNet model are in tests/test_scores.py, rebuilding it from weights in tests/test_loading.py.)"""
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


def test_resnet18_parameter_count_equals_a_hand_count_at_any_width():
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
    # Without the released shortcut scales it has the CIFAR one's topology; only the init differs.
    plain = create_model("resnet18", 200, width=4, dataset="tiny_imgnet", shortcut_scale=False)
    assert count(plain) == count(create_model("resnet18", 200, width=4))


def test_tiny_imagenet_resnet18_with_shortcut_scales_has_the_released_parameter_count():
    # The released model: ResNet18 for 200 classes plus one scale per channel on each identity
    # shortcut. By hand:
    # stem 3·64·9 + 2·64 = 1,856; stage 1: 2 blocks of 2·(64·64·9 + 2·64) = 147,968; stages 2-4:
    # first block 2k·k·9 + 2k·2k·9 + 2k·k (1x1) + 3·2·2k (BN), second block 2·(2k·2k·9 + 2·2k):
    # 525,568 + 2,099,712 + 8,393,728; head 512·200 + 200 = 102,600; scales 64 + 64 + 128 + 256 + 512.
    hand = 1_856 + 147_968 + 525_568 + 2_099_712 + 8_393_728 + 102_600 + (64 + 64 + 128 + 256 + 512)
    assert hand == 11_272_456
    model = create_model("resnet18", 200, dataset="tiny_imgnet")
    assert count(model) == hand
    scales = {name: p for name, p in model.named_parameters() if name.endswith("shortcut.weight")}
    assert sorted(scales) == ["layer1.0.shortcut.weight", "layer1.1.shortcut.weight", "layer2.1.shortcut.weight",
                              "layer3.1.shortcut.weight", "layer4.1.shortcut.weight"]
    assert sum(p.numel() for p in scales.values()) == 1_024
    assert all(p.shape[1:] == (1, 1) and bool((p == 1).all()) and p.requires_grad for p in scales.values())


def test_shortcut_scale_multiplies_the_identity_branch_per_channel():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, width=4, dataset="tiny_imgnet").eval()
    block = model.layer1[1]
    with torch.no_grad():
        block.shortcut.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]).view(4, 1, 1))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    before_relu = residual + x * torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    assert torch.allclose(block(x), torch.relu(before_relu), atol=1e-6)
    # It learns like any weight. For out = relu(residual + s·x), the gradient of Σ g·out with
    # respect to s_c is Σ over samples and pixels of g·x where the ReLU is open, 0 where it is shut.
    g = torch.randn(2, 4, 6, 6)
    (block(x) * g).sum().backward()
    expected_grad = (g * x * (before_relu > 0)).sum(dim=(0, 2, 3)).view(4, 1, 1)
    torch.testing.assert_close(block.shortcut.weight.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_wrn_40_2_has_the_published_parameter_count():
    # WRN-40-2 for CIFAR-10 has 2,243,546 parameters (Zagoruyko & Komodakis, 2.2M).
    assert count(create_model("wrn-40-2", 10)) == 2_243_546


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as err:
        create_model("resnet19", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)
