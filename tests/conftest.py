"""Test configuration: make the repository root importable and keep torch to one thread.

One thread keeps timings stable on the 2-core CI machine and avoids oversubscription when
tests start subprocesses.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)
