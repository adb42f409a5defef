"""User-facing errors.

A mistake the user can fix (a wrong path, an unknown name, a bad flag value) raises ``UserError``;
the entry scripts catch it in ``run_main`` and print one line, ``error: <message>``, then exit with
status 2. Bugs still raise ordinary exceptions with a full traceback, so they stay debuggable.
"""
import sys


class UserError(Exception):
    """A problem in the user's input: printed as one line, never as a traceback."""


def run_main(main, argv=None):
    """Call ``main(argv)``; turn ``UserError`` into one line on stderr and exit status 2.

    Ctrl-C exits with status 130 and a short note (checkpoints are written atomically, so the last
    good one is still on disk and rerunning the same command resumes).
    """
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last completed checkpoint is kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
