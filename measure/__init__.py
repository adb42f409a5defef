"""Measuring trained ensembles (the measure_*.py scripts; reference: measure/README.md).

    cli.py           flags, modes and the start every measure script shares
    loading.py       finding and loading the members of an ensemble from checkpoints or run folders
    inputs.py        the clean splits and the corrupted (-C) cells a measurement runs over
    forward.py       every member's logits on a split, in one pass, shared by every mode
    metrics.py       accuracy, NLL, ECE, Brier, disagreement, KL, logit variance (numpy, pure)
    sharpness.py     worst-case (APGD), average-case and fisher sharpness
    ellipsoid.py     the projections onto the perturbation sets (the certified ellipsoid projection)
    result_files.py  the JSON and tidy CSV files, their metadata, partial results
"""
