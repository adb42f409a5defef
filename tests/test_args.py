"""The command lines (utils/args.py): every flag of main.py and the measure scripts has help text, and
``--help`` shows each default (HelpFormatter)."""
import argparse

import main as main_script
import measure_diversity
import measure_diversity_variance
import measure_sharpness


def test_help_shows_every_default():
    for module in (main_script, measure_diversity, measure_diversity_variance, measure_sharpness):
        parser = module.get_parser()
        # ArgumentDefaultsHelpFormatter adds "(default: ...)" only to flags that have help text.
        missing = [a.option_strings for a in parser._actions if a.help in (None, argparse.SUPPRESS)]
        assert not missing, (module.__name__, missing)
    text = " ".join(main_script.get_parser().format_help().split())
    for default in ("--epochs EPOCHS training epochs per member (default: 200)", "(default: 0.1)",
                    "(default: 128)", "(default: 0.9)", "(default: 0.0005)", "(default: 500)"):
        assert default in text
