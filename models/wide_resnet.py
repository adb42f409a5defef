"""Wide ResNet (Zagoruyko & Komodakis) for 32x32 inputs, e.g. WRN-40-2.

Pre-activation blocks (BN-ReLU-conv), depth = 6n+4, widths 16, 16k, 32k, 64k. Offered as a second
architecture for the measurement scripts and for ablations; the paper's results use ResNet18.
"""
import torch.nn as nn
import torch.nn.functional as F


class WideBlock(nn.Module):
    def __init__(self, in_channels, channels, stride, dropout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.projection = None
        if in_channels != channels or stride != 1:
            self.projection = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        # The projection reads the pre-activated input, so both branches see the same normalisation.
        shortcut = x if self.projection is None else self.projection(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth=40, widen_factor=2, num_classes=10, dropout=0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("Wide ResNet depth must be 6n+4")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        layers = []
        in_channels = widths[0]
        for stage, channels in enumerate(widths[1:]):
            for block in range(blocks_per_stage):
                stride = 2 if (stage > 0 and block == 0) else 1
                layers.append(WideBlock(in_channels, channels, stride, dropout))
                in_channels = channels
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_channels)
        self.linear = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
