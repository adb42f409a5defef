"""ResNet18 for Tiny-ImageNet (64x64 inputs, 200 classes).

Same stem as the CIFAR variant (3x3 stride 1, no max-pool: at 64x64 the network keeps enough
resolution for the four stages), stages of k, 2k, 4k, 8k channels (64/128/256/512 at width 64),
adaptive average pooling and a linear head. Convolutions use Kaiming-normal (fan_out) init and
BatchNorm starts at weight 1, bias 0, as in the Tiny-ImageNet model the authors trained. The
release's learnable shortcut scales and sparse-training masks are not part of the method and are
left out.
"""
import torch.nn as nn

from models.resnet import ResNet


class TinyImageNetResNet(ResNet):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes=200, width=64):
        super().__init__(blocks_per_stage, num_classes=num_classes, width=width)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def resnet18_tiny(num_classes=200, width=64):
    return TinyImageNetResNet((2, 2, 2, 2), num_classes=num_classes, width=width)
