"""Model zoo: one entry point, ``create_model``."""
from models.resnet import resnet18_cifar
from models.resnet_tiny import resnet18_tiny
from models.wide_resnet import WideResNet
from utils.errors import UserError

MODEL_NAMES = ("resnet18", "wrn-40-2")


def create_model(name, num_classes, width=64, dataset=None, shortcut_scale=True):
    """Build ``name`` for ``num_classes`` classes.

    ``resnet18`` picks the Tiny-ImageNet variant when ``dataset == 'tiny_imgnet'`` and the CIFAR
    variant otherwise; ``width`` is the first stage's channel count (64 in the paper).
    ``shortcut_scale`` (Tiny-ImageNet only) keeps the released per-channel scales on the identity
    shortcuts; the other models have none and ignore it.
    """
    if name == "resnet18":
        if width < 1:
            raise UserError(f"--width must be a positive integer, got {width}")
        if dataset == "tiny_imgnet":
            return resnet18_tiny(num_classes=num_classes, width=width, shortcut_scale=shortcut_scale)
        return resnet18_cifar(num_classes=num_classes, width=width)
    if name == "wrn-40-2":
        return WideResNet(depth=40, widen_factor=2, num_classes=num_classes)
    raise UserError(f"unknown model '{name}'; valid names: {', '.join(MODEL_NAMES)}")
