import os
import sys

# Tests import the top-level scripts (model, data, train_sft, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end runs (deselect with -m 'not slow')")
