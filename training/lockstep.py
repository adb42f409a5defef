"""Members in lockstep (``--lockstep``): step i of every member of this process before step i+1.

Why: one member's eager step at batch 128 leaves a large GPU mostly idle between kernel launches
(the host queues kernels more slowly than the GPU runs them). Queuing the members' steps one after
the other, each member on a CUDA stream of its own, lets the GPU run one member's kernels while
the host queues the next member's, in one process with one copy of the data and no barrier
between processes. torchrun still spreads the members over ranks (round-robin); each rank runs
its own members in lockstep.

How: each member's training is a generator that yields after every step (``Member.training``,
built on ``engine.train_epoch_steps``); ``run_in_lockstep`` advances each generator by one step in
turn until all are done. Everything else of a member stays its own and happens as before: its
loader order and augmentation (a function of its seed and epoch), model, optimizer, scheduler,
evaluation, log rows and checkpoints (written by its generator after its epoch's last step). On a
CPU the same loop runs without streams; nothing is shared between members (training draws no
random number from torch's global generator), so each member's numbers are bit for bit those of
the member trained alone or sequentially (tests/test_lockstep.py), and a resume is exact whatever
order the members were interrupted in: each continues from its own checkpoint, also from
different epochs.

Streams (CUDA only). The trainer gives each member a stream with ``--lockstep``, and also with
``--cuda_graphs`` alone (members one after the other are then each run here alone), so that a
member's graphs are captured on the stream its warm-up steps ran on. Before the first step every
member stream waits for the current stream, where the models, their resumed state and everything
the members share were put on the device (the trainer makes the loaders' shared device data there
first: made on one member's stream, another's could read it before it is written). Each member's
steps and end-of-epoch work are then queued on its own stream: what they allocate belongs to that
stream, and the host reads at the end of an epoch wait for that stream only. At the end the
current stream waits for every member stream, so what follows on it (scoring at the SharpBalance
partition, the next phase) sees finished models.
"""
import contextlib

import torch


def member_streams(device, count):
    """One new CUDA stream per member on a CUDA ``device``; ``None`` for each elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return [None] * count
    return [torch.cuda.Stream(device) for _ in range(count)]


def _on(stream):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def run_in_lockstep(runs, streams=None, catch=()):
    """Advance every generator in ``runs`` one step in turn (``next``) until each is exhausted.

    ``streams``: one CUDA stream (or None) per run; each run's steps are queued on its own.
    Returns one ``(value, error)`` per run: the generator's return value, or the exception of a
    type in ``catch`` that ended it (the others carry on; anything else propagates).
    """
    streams = list(streams) if streams is not None else [None] * len(runs)
    if len(streams) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(streams)} streams")
    used = [stream for stream in streams if stream is not None]
    current = torch.cuda.current_stream(used[0].device) if used else None
    for stream in used:
        stream.wait_stream(current)
    results = [(None, None)] * len(runs)
    pending = list(range(len(runs)))
    try:
        while pending:
            still = []
            for i in pending:
                try:
                    with _on(streams[i]):
                        next(runs[i])
                    still.append(i)
                except StopIteration as done:
                    results[i] = (done.value, None)
                except catch as error:
                    results[i] = (None, error)
            pending = still
    finally:
        for stream in used:
            current.wait_stream(stream)
    return results
