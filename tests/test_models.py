import numpy as np
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
    residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    expected = torch.relu(residual + x * torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1))
    assert torch.allclose(block(x), expected, atol=1e-6)
    # it learns like any weight: the loss has a gradient with respect to it
    loss = model(torch.randn(2, 3, 16, 16)).logsumexp(dim=1).sum()
    loss.backward()
    assert block.shortcut.weight.grad is not None and block.shortcut.weight.grad.abs().sum() > 0


def test_measure_scripts_rebuild_either_tiny_variant_from_its_weights(tmp_path):
    from measure.loading import build_model
    for scaled in (True, False):
        trained = create_model("resnet18", 200, width=4, dataset="tiny_imgnet", shortcut_scale=scaled)
        spec = {"model": "resnet18", "width": 4, "num_classes": 200}
        rebuilt = build_model("member.pth.tar", {"state_dict": trained.state_dict()}, spec, "tiny_imgnet")
        assert rebuilt.state_dict().keys() == trained.state_dict().keys()


def test_per_sample_scores_cover_the_shortcut_scales():
    # The hooks backend has no closed form for the scale layer: it hands those parameters to
    # torch.func, so every backend still matches one backward pass per sample.
    from tests.references import loop_squared_grad_norms
    from training.scores import squared_grad_norms
    torch.manual_seed(1)
    model = create_model("resnet18", 5, width=4, dataset="tiny_imgnet")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("shortcut.weight"):
                p.uniform_(0.5, 1.5)
    images, targets = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    loader = [(images, targets, torch.arange(6))]
    reference = loop_squared_grad_norms(model, loader, num_samples=6)
    for backend in ("hooks", "auto"):
        scores = squared_grad_norms(model, loader, torch.device("cpu"), chunk_size=4, num_samples=6,
                                    backend=backend)
        assert np.allclose(scores, reference, rtol=1e-4), backend


def test_wrn_40_2_parameter_count():
    # WRN-40-2 for CIFAR-10 has 2,243,546 parameters (Zagoruyko & Komodakis, 2.2M).
    assert count(create_model("wrn-40-2", 10)) == 2_243_546


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as err:
        create_model("resnet19", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)
