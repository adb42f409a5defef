"""Run a script and SIGKILL it at an exact point: the Nth call of a function (tests only).

    python tests/kill_at.py MODULE.FUNCTION N [--after] SCRIPT [ARGS...]

imports MODULE, replaces FUNCTION there by a wrapper that kills this process (SIGKILL, as the OOM
killer or a lost node would) when it is called for the Nth time, before the call runs (``--after``:
once it has returned), then runs SCRIPT as ``__main__`` with ARGS. Patch the name where the code
under test looks it up, e.g. ``training.trainer.copy_checkpoint`` for the model_best copy after a
checkpoint. The product code holds no test hook.
"""
import importlib
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def patch(target, nth, after=False):
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == nth and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, wrapper)


def main(argv):
    after = "--after" in argv[:3]
    argv = [a for a in argv[:3] if a != "--after"] + argv[3:]
    target, nth, script, rest = argv[0], int(argv[1]), argv[2], argv[3:]
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    patch(target, nth, after)
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
