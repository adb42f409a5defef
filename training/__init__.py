"""Training an ensemble: deep ensemble, DE + SAM, SharpBalance (reference: training/README.md).

    method.py      the method of a command (deep_ensemble, sam, sharpbalance) from --sam, --flat_ratio
    sam.py         the SAM optimizer (first_step / second_step around a base optimizer)
    steps.py       one step on a batch: sgd_step, mixed_step (SharpBalance; plain SAM = all-True mask)
    scores.py      the per-sample squared gradient norm ‖∇θ CE(f(x), y)‖² (torch.func or hooks)
    partition.py   SharpBalance's partition: per-member SAM masks from the (members × samples) scores (pure)
    engine.py      one training epoch (also as a generator of steps) and one evaluation pass
    graphs.py      --cuda_graphs: the steps replayed from CUDA graphs (StepGraphs)
    lockstep.py    --lockstep: the members of a process step by step side by side, a CUDA stream each
    accel.py       the opt-in fast path: --amp, --channels_last, --compile (and the flags above)
    trainer.py     the run: members phase by phase, checkpoints, resume, the partition, several processes
(The run folder it writes, its lock and its checks: utils/run_folder.py.)
"""
