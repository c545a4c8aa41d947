import json
import os
import signal
import sys

import pytest
import torch

# Tests import the top-level scripts (model, data, train_sft, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer  # noqa: E402
import world  # noqa: E402
from model import ModelConfig, Transformer, load_model, save_checkpoint  # noqa: E402

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


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Two micro language models and a micro reward model sharing a small BPE tokenizer trained here (the
    checkpoints that evaluate.py, report.py and chat.py are tested on)."""
    w = world.build_world(0)
    folder = tmp_path_factory.mktemp("ckpts")
    tok = tokenizer.Tokenizer(tokenizer.train_bpe(w.texts()[:400], 256 + 120), name="micro")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                        max_seq_len=160))
        paths[name] = str(folder / name / "model.pt")
        save_checkpoint(paths[name], dict(model=model.state_dict(), model_config=vars(model.config),
                                          tokenizer=tok.to_dict(), step=0))
    torch.manual_seed(2)
    rm, _ = load_model(paths["a"], head="scalar")
    paths["rm"] = str(folder / "rm" / "model.pt")
    save_checkpoint(paths["rm"], dict(model=rm.state_dict(), model_config=vars(rm.config), tokenizer=tok.to_dict(),
                                      step=0))
    torch.manual_seed(3)  # a reward model with a shorter context than the policies'
    short = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    max_seq_len=48, head="scalar"))
    paths["rm_short"] = str(folder / "rm_short" / "model.pt")
    save_checkpoint(paths["rm_short"], dict(model=short.state_dict(), model_config=vars(short.config),
                                            tokenizer=tok.to_dict(), step=0))
    with open(folder / "b" / "metrics.jsonl", "w") as f:  # a PPO-style training log for the reward-vs-KL plot
        for step, (kl, r) in enumerate([(0.0, 0.1), (0.5, 0.4), (1.0, 0.6)]):
            f.write(json.dumps(dict(step=step, rm_score=r, kl=kl)) + "\n")
    return paths, tok
