"""The progress bars of the training loops, updated every ``--print-freq`` steps."""
from tqdm import tqdm


def progress_bar(iterable, desc, every=1, enabled=True):
    """A tqdm bar over ``iterable`` that is redrawn after every ``every``-th item, and only then.

    tqdm's own rule redraws whenever 0.1 s have passed (and its monitor thread forces a redraw
    after 10 s), which on a slow step is every step whatever ``every`` says. Here the count alone
    decides: ``miniters`` is the period, the time limits are switched off. The caller sets its
    postfix with ``refresh=False`` on the same steps, so each update is one redraw.
    """
    return tqdm(iterable, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True,
                miniters=max(int(every), 1), mininterval=0, maxinterval=float("inf"))
