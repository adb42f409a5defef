"""ResNet18 for Tiny-ImageNet (64x64 inputs, 200 classes), as the authors trained it.

Same stem as the CIFAR variant (3x3 stride 1, no max-pool: at 64x64 the network keeps enough
resolution for the four stages), stages of k, 2k, 4k, 8k channels (64/128/256/512 at width 64),
adaptive average pooling and a linear head. Convolutions use Kaiming-normal (fan_out) init and
BatchNorm starts at weight 1, bias 0.

The released model multiplies every identity shortcut by a learnable per-channel scale (its
``Identity2d``: a weight of shape (C, 1, 1), initialised to 1, x * weight). Those are ordinary
parameters, so weight decay and SAM's perturbation reach them like any weight: 1,024 values at
width 64 (two blocks of 64 channels and one each of 128, 256 and 512; the three blocks with a 1x1
projection have none), 11,272,456 parameters for 200 classes. They are part of the default here,
named ``layer<i>.<j>.shortcut.weight`` (the release: ``conv<i+1>_x.<j>.shortcut.weight``);
``shortcut_scale=False`` drops them, which leaves the CIFAR ResNet18's topology. (The release's
masks for sparse training are buffers that are always 1 and are left out.)
"""
import torch
import torch.nn as nn

from models.resnet import ResNet


class ShortcutScale(nn.Module):
    """x * weight with one learnable weight per channel, initialised to 1."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.weight


class TinyImageNetResNet(ResNet):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes=200, width=64, shortcut_scale=True):
        super().__init__(blocks_per_stage, num_classes=num_classes, width=width)
        if shortcut_scale:
            for block in self.blocks():
                if len(block.shortcut) == 0:  # an identity shortcut (no 1x1 projection)
                    block.shortcut = ShortcutScale(block.bn2.num_features)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def blocks(self):
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]


def resnet18_tiny(num_classes=200, width=64, shortcut_scale=True):
    return TinyImageNetResNet((2, 2, 2, 2), num_classes=num_classes, width=width, shortcut_scale=shortcut_scale)


def has_shortcut_scales(state_dict):
    """Whether a Tiny-ImageNet ResNet18 state_dict holds the released shortcut scales."""
    return any(key.endswith("shortcut.weight") and value.dim() == 3 for key, value in state_dict.items())
