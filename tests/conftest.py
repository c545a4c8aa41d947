import os
import signal
import sys

import pytest
import torch

# Tests import the top-level scripts (model, data, train_sft, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The test models are micro-sized, so one thread loses little, and it avoids the large slowdown of two OpenMP
# threads waiting on each other when the CPU is shared (measured 3-5x in tests/test_reliability.py's runs).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end runs (deselect with -m 'not slow')")


@pytest.fixture
def signal_on_call(monkeypatch):
    """signal_on_call(module, name, n, sig): patch module.name so that its n-th call first sends `sig` to this
    process (a Ctrl-C or SIGTERM that arrives while a training step computes), then runs as before."""
    def patch(module, name, n, sig=signal.SIGINT):
        real, calls = getattr(module, name), []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                signal.raise_signal(sig)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
        return real
    return patch
