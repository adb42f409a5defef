"""Shared helpers: errors, devices, arguments, checkpoints, the run folder (its layout and checks, read by
training, the measure scripts and the benchmarks alike), distributed processes."""
