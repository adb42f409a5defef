"""User-facing errors.

A mistake the user can fix (a wrong path, an unknown name, a bad flag value) raises ``UserError``;
the entry scripts catch it in ``run_main`` and print one line, ``error: <message>``, then exit with
status 2. Bugs still raise ordinary exceptions with a full traceback, so they stay debuggable.
"""
import errno
import sys

# What Ctrl-C means for each kind of script (run_main's ``interrupted``).
TRAINING_INTERRUPTED = "interrupted: the last completed checkpoint is kept; rerun the same command to resume"
MEASURE_INTERRUPTED = ("interrupted: result files already written are complete (written atomically); "
                       "rerun the same command to measure again")

# Operating-system errors that are the machine's state, not a bug: a full disk, a read-only or
# foreign folder. They get one line like a user error.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class UserError(Exception):
    """A problem in the user's input: printed as one line, never as a traceback."""


def run_main(main, argv=None, interrupted=TRAINING_INTERRUPTED):
    """Call ``main(argv)``; turn ``UserError`` into one line on stderr and exit status 2.

    Ctrl-C exits with status 130 and the line ``interrupted``: training scripts say the last
    checkpoint is kept and how to resume, measure scripts pass ``MEASURE_INTERRUPTED``.
    """
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        # A write that was not routed through utils.checkpoint.atomic_write (which says more).
        print(f"error: {err}; files written before are complete (atomic writes); fix this and rerun",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
