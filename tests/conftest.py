import os
import sys

import torch

# Tests import the top-level scripts (model, data, train_sft, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The test models are micro-sized, so one thread loses little, and it avoids the large slowdown of two OpenMP
# threads waiting on each other when the CPU is shared (measured 3-5x in tests/test_reliability.py's runs).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end runs (deselect with -m 'not slow')")
