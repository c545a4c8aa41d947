import argparse
import json
import math
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def test_cosine_lr_by_hand():
    lr, total, warmup = 1.0, 110, 10
    assert runtime.cosine_lr(0, total, lr, warmup) == pytest.approx(0.1)        # (0 + 1) / 10
    assert runtime.cosine_lr(4, total, lr, warmup) == pytest.approx(0.5)        # (4 + 1) / 10
    assert runtime.cosine_lr(10, total, lr, warmup) == pytest.approx(1.0)       # warm-up done: peak
    # halfway through the decay: cos(pi/2) = 0, so the midpoint of 1.0 and the floor 0.1
    assert runtime.cosine_lr(60, total, lr, warmup) == pytest.approx(0.55)
    assert runtime.cosine_lr(110, total, lr, warmup) == pytest.approx(0.1)      # floor = lr * min_lr_ratio
    assert runtime.cosine_lr(500, total, lr, warmup) == pytest.approx(0.1)      # stays there past the end
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert runtime.cosine_lr(35, total, lr, warmup) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)


PRESETS = {"tiny": dict(dim=32, lr=1e-3, steps_base=7), "small": dict(dim=768, lr=6e-4, steps_base=5000)}


def make_parser(with_preset=True):
    p = argparse.ArgumentParser()
    if with_preset:
        p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p


def test_parse_args_preset_sets_defaults_and_explicit_flags_win():
    args = runtime.parse_args(make_parser(), PRESETS, [])
    assert (args.preset, args.dim, args.lr, args.steps_base, args.seed) == ("tiny", 32, 1e-3, 7, 0)
    args = runtime.parse_args(make_parser(), PRESETS, ["--preset", "small", "--lr", "0.5"])
    assert (args.dim, args.lr, args.steps_base) == (768, 0.5, 5000)
    args = runtime.parse_args(make_parser(), PRESETS, ["--dim", "16", "--preset=small"])  # flag order is free
    assert (args.dim, args.lr) == (16, 6e-4)


def test_parse_args_adds_preset_flag_when_missing():
    args = runtime.parse_args(make_parser(with_preset=False), PRESETS, [])
    assert (args.preset, args.dim) == (None, 8)                                # no preset: parser defaults
    assert runtime.parse_args(make_parser(with_preset=False), PRESETS, ["--preset", "tiny"]).dim == 32
    with pytest.raises(SystemExit):
        runtime.parse_args(make_parser(), PRESETS, ["--preset", "huge"])


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head="scalar"))
    opt = runtime.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # norm gains (3) and the scalar head's bias are not decayed; every parameter is in exactly one group
    assert len(no_decay["params"]) == 4
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    runtime.setup(seed=3, device="cpu")
    state = runtime.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pt")
    runtime.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_setup_single_process_on_cpu():
    rt = runtime.setup(seed=0, device="cpu")
    assert (rt.device.type, rt.rank, rt.world_size, rt.is_main, rt.ddp) == ("cpu", 0, 1, True, False)
    assert runtime.wrap_ddp(torch.nn.Linear(2, 2), rt).__class__ is torch.nn.Linear
    x = torch.tensor(2.0)
    assert runtime.all_reduce_sum(x, rt) is x
    runtime.cleanup(rt)


def test_metrics_log_appends_json_lines_on_rank0_only(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = runtime.MetricsLog(str(path), enabled=True)
    log.log(1, loss=torch.tensor(2.5), lr=1e-3)
    log.log(2, loss=1.5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [dict(step=1, loss=2.5, lr=1e-3), dict(step=2, loss=1.5)]
    runtime.MetricsLog(str(tmp_path / "other.jsonl"), enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "other.jsonl").exists()


def test_save_config_writes_resolved_args(tmp_path):
    rt = runtime.Runtime(torch.device("cpu"))
    args = argparse.Namespace(out=str(tmp_path), dim=32, preset="tiny")
    runtime.save_config(args, rt)
    assert json.loads((tmp_path / "config.json").read_text()) == dict(out=str(tmp_path), dim=32, preset="tiny")


def test_optimizer_step_never_steps_into_nan_and_names_the_checkpoint():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SystemExit, match=r"loss became nan at step 7; the last good checkpoint is out/x.pt"):
        runtime.optimizer_step(model, optimizer, float("nan"), 1.0, "step 7", "out/x.pt")
    model(torch.tensor([[float("inf"), 1.0]])).sum().backward()   # a finite loss value, a non-finite gradient
    with pytest.raises(SystemExit, match=r"gradient norm became (nan|inf) at step 8"):
        runtime.optimizer_step(model, optimizer, 1.0, 1.0, "step 8", "out/x.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.zero_grad()
    model(torch.tensor([[3.0, 4.0]])).sum().backward()            # gradient (3, 4, 1): norm sqrt(26), clipped to 1
    norm = runtime.optimizer_step(model, optimizer, 1.0, 1.0, "step 9", "out/x.pt")
    assert norm.item() == pytest.approx(26 ** 0.5)
    assert model.weight.grad is None                               # zeroed after the step
    step = before[0] - model.weight.detach()
    assert step.norm().item() == pytest.approx(0.1 * 5 / 26 ** 0.5, rel=1e-5)
