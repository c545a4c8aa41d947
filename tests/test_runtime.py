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


def test_optimizer_step_steps_several_models_or_none():
    models = [torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    before = [p.detach().clone() for m in models for p in m.parameters()]
    models[0](torch.tensor([[1.0, 1.0]])).sum().backward()
    models[1](torch.tensor([[float("nan"), 1.0]])).sum().backward()   # the second model's gradient is NaN
    with pytest.raises(SystemExit, match="gradient norm became .*nan at iteration 3"):
        runtime.optimizer_step(models, optimizers, 1.0, 1.0, "iteration 3", "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, [p for m in models for p in m.parameters()]))
    for m in models:
        m.zero_grad()
        m(torch.tensor([[1.0, 0.0]])).sum().backward()
    norms = runtime.optimizer_step(models, optimizers, 1.0, 10.0, "iteration 4", "ckpt")
    assert [n.item() for n in norms] == pytest.approx([2 ** 0.5, 2 ** 0.5])   # gradient (1, 0, 1) for each
    assert all(p.grad is None for m in models for p in m.parameters())


def test_set_lr_writes_every_group():
    opt = runtime.make_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.1)
    args = argparse.Namespace(lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert runtime.set_lr(opt, 4, 110, args) == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("kind, text, ok", [(runtime.positive_int, "3", 3), (runtime.positive_int, "0", None),
                                            (runtime.positive_int, "-5", None), (runtime.positive_int, "2.5", None),
                                            (runtime.nonnegative_int, "0", 0), (runtime.positive_float, "1e-3", 1e-3),
                                            (runtime.positive_float, "nan", None),
                                            (runtime.nonnegative_float, "-0.1", None)])
def test_number_types(kind, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    else:
        assert kind(text) == ok


def test_help_shows_every_default_and_errors_are_one_line(capsys):
    p = runtime.parser("Title line.\n\nMore words.")
    p.add_argument("--steps", type=runtime.positive_int, help="optimizer steps")
    p.add_argument("--name", default="x", help="a name")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--nothing", default=None, help="unset")
    with pytest.raises(SystemExit):
        runtime.parse_args(p, {"tiny": dict(steps=5), "small": dict(steps=50)}, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (default by --preset: tiny 5, small 50)" in text
    assert "a name (default: x)" in text and "a switch (default: off)" in text and "unset (default: none)" in text
    with pytest.raises(SystemExit) as stop:
        runtime.parse_args(p, {"tiny": dict(steps=5)}, ["--steps", "-5"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--steps: must be > 0, got -5" in err


def run_args(out, **kw):
    defaults = dict(out=str(out), resume=False, overwrite=False, seed=0, device="cpu", cpu_bf16=False)
    return argparse.Namespace(**{**defaults, **kw})


def test_cpu_bf16_autocasts_the_cpu_only_when_asked(tmp_path):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    rt, _, _ = runtime.start(run_args(tmp_path / "run"))
    with runtime.autocast(rt):
        assert (a @ b).dtype == torch.float32                          # float32 by default
    rt, _, _ = runtime.start(run_args(tmp_path / "run", cpu_bf16=True))
    with runtime.autocast(rt):
        product = a @ b
    assert rt.cpu_bf16 and product.dtype == torch.bfloat16
    torch.testing.assert_close(product.float(), a @ b, rtol=0.02, atol=0.05)


def test_start_enforces_the_run_folder_rules(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(runtime.UserError, match="nothing to resume"):
        runtime.start(run_args(out, resume=True))
    assert not out.exists()                                          # nothing written before the inputs are read
    rt, ckpt_path, resume = runtime.start(run_args(out))
    assert resume is None and ckpt_path == str(out / "model.pt") and not out.exists()
    log = runtime.begin(run_args(out), rt, 0)
    log.log(1, loss=1.0)
    with pytest.raises(runtime.UserError, match="already holds a run .*--resume .*--overwrite"):
        runtime.start(run_args(out))
    runtime.start(run_args(out, overwrite=True))
    runtime.begin(run_args(out, overwrite=True), rt, 0)
    assert sorted(os.listdir(out)) == ["config.json"]                # the old run's log is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(runtime.UserError, match="is a file"):
        runtime.start(run_args(tmp_path / "file"))


def test_start_refuses_a_checkpoint_of_another_stage(tmp_path):
    import model
    cfg = ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1)
    model.save_checkpoint(str(tmp_path / "model.pt"), dict(model=Transformer(cfg).state_dict(),
                                                           model_config=vars(cfg), stage="rm"))
    with pytest.raises(runtime.UserError, match="holds a 'rm' checkpoint, not a 'dpo' one"):
        runtime.start(run_args(tmp_path, resume=True), stage="dpo")


def test_out_under_a_file_is_a_user_error_and_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runtime.UserError, match="cannot write"):
        runtime.start(run_args(tmp_path / "file" / "run"))
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_unwritable_out_is_a_user_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(runtime.UserError, match="cannot write"):
            runtime.start(run_args(locked / "run"))
    finally:
        locked.chmod(0o700)


def test_resumed_log_drops_the_rows_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = runtime.MetricsLog(path)
    for step in (1, 2, 3, 4, 5):
        log.log(step, loss=float(step))
    runtime.MetricsLog(path, resume_step=3).log(4, loss=0.5)          # killed after step 5, checkpoint at 3
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]


def test_stop_on_signal_turns_sigint_into_a_flag_and_a_clean_exit(capsys):
    import signal
    rt = runtime.Runtime(torch.device("cpu"))
    previous = signal.getsignal(signal.SIGINT)
    with runtime.StopOnSignal() as stop:
        assert not stop.requested(rt)
        signal.raise_signal(signal.SIGINT)                             # no KeyboardInterrupt: a flag
        assert stop.requested(rt)
        with pytest.raises(SystemExit) as end:
            stop.exit(rt, "out/model.pt", "step 7")
        assert end.value.code == 130
        with pytest.raises(KeyboardInterrupt):                         # a second Ctrl-C stops at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
    assert "SIGINT at step 7: saved out/model.pt; continue with --resume" in capsys.readouterr().out


def test_command_turns_input_errors_into_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("TRACEBACK", raising=False)

    def main(args):
        raise ValueError(f"{args}: line 3: missing field 'x'\n  detail")

    with pytest.raises(SystemExit) as stop:
        runtime.command(main, lambda argv: "data.jsonl")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "error: data.jsonl: line 3: missing field 'x'; detail" in err
    with pytest.raises(runtime.UserError):                             # TRACEBACK=1: the real exception
        monkeypatch.setenv("TRACEBACK", "1")
        runtime.command(lambda a: (_ for _ in ()).throw(runtime.UserError("x")), lambda argv: None)


def test_pick_device_names_what_is_missing():
    if not torch.cuda.is_available():
        with pytest.raises(runtime.UserError, match="no CUDA device"):
            runtime.pick_device("cuda")
    with pytest.raises(runtime.UserError, match="not a device name"):
        runtime.pick_device("gpu0")
    assert runtime.pick_device("cpu").type == "cpu"
