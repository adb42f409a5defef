"""Training an ensemble: deep ensemble, DE + SAM, SharpBalance (reference: training/README.md).

    sam.py      SAM (first_step / second_step around a base optimizer) and SharpBalance's mixed step
    scores.py   per-sample sharpness ‖∇θ CE(f(x), y)‖² of every training sample (torch.func or hooks)
    split.py    the split: per-member SAM masks from the (members × samples) score matrix (pure)
    engine.py   one training epoch and one evaluation pass
    accel.py    the opt-in fast path: --amp, --channels_last, --compile
    trainer.py  the run: members phase by phase, checkpoints, resume, the split, several processes
(The run folder it writes, its lock and its checks: utils/run_folder.py.)
"""
