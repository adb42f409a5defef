"""Argument groups shared by the entry scripts, so every script spells a flag the same way."""
import argparse

from utils.device import CUDNN_SETTINGS, DEFAULT_CUDNN, cudnn_help

DATASET_CHOICES = ("cifar10", "cifar100", "tiny_imgnet", "digits")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""

    def _get_help_string(self, action):
        # A required flag, or one whose help already says what its None default means, needs no
        # "(default: None)".
        if action.default is None and (action.required or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def str2bool(value):
    """Parse the release's string booleans (``--sam True``) and the usual spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1"):
        return True
    if text in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")


def make_parser(description):
    # argparse reports a bad flag as usage + one "error:" line and exits with status 2, which is
    # already the project's convention for user mistakes.
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_data_args(parser, flag="--data"):
    """``flag`` is ``--data`` for main.py and ``--dataset`` for the measure scripts (released names)."""
    group = parser.add_argument_group("data")
    group.add_argument(flag, dest=flag.lstrip("-"), default="digits", choices=DATASET_CHOICES,
                       help="dataset; digits is embedded (scikit-learn 8x8 digits, no download)")
    group.add_argument("--data_path", default="./datasets",
                       help="dataset root (CIFAR: torchvision layout; Tiny-ImageNet: the "
                            "tiny-imagenet-200 folder or its parent; -C sets in <data_path>/CIFAR-10-C etc.)")
    group.add_argument("--corrupt_path", default=None,
                       help="root holding CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C / digits-C "
                            "(default: --data_path)")
    group.add_argument("--tiny_val", default="holdout", choices=("holdout", "official"),
                       help="Tiny-ImageNet validation: holdout = 10%% of train (paper); "
                            "official = the official val folder, also the test set (release)")
    group.add_argument("--num-workers", dest="num_workers", type=int, default=0,
                       help="accepted for compatibility with the released commands; has no effect "
                            "(images are served from memory, no loader processes)")
    return group


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="resnet18",
                       help="architecture: resnet18 or wrn-40-2 (measure scripts default to the checkpoint's)")
    group.add_argument("--width", type=int, default=64,
                       help="ResNet18 base width, 64 = the paper's (measure scripts default to the checkpoint's)")
    group.add_argument("--shortcut_scale", type=str2bool, default=True, metavar="{True,False}",
                       help="Tiny-ImageNet ResNet18: a learnable per-channel scale on each identity shortcut, "
                            "as in the released model (measure scripts read it from the checkpoint)")
    return group


def add_device_args(parser):
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    group.add_argument("--cudnn", default=DEFAULT_CUDNN, choices=tuple(CUDNN_SETTINGS),
                       help="how cuDNN picks convolution algorithms (GPU): " + cudnn_help().replace("%", "%%"))
    return group


def parse_seeds(values):
    """``--seed 13 17 27`` and ``--seed "13 17 27"`` (the release's quoted form) give [13, 17, 27]."""
    seeds = []
    for value in values:
        for token in str(value).replace(",", " ").split():
            try:
                seeds.append(int(token))
            except ValueError:
                raise argparse.ArgumentTypeError(f"--seed expects integers, got '{token}'") from None
    return seeds
