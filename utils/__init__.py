"""Shared helpers: errors, devices, arguments, checkpoints, the training and measurement engines."""
