"""bench.py on micro configs: every rate is positive and agrees with the counts it is made of; the command line
checks its flags and never overwrites a result. No timing bars: the speed of a shared CPU says nothing about the
code."""
import json

import pytest
import torch

import bench
import runtime
from model import ModelConfig, flops_per_token, num_params

MICRO = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32)
CPU = torch.device("cpu")


@pytest.mark.parametrize("attention, loss", [("causal", "full"), ("masked", "full"), ("causal", "chunked")])
def test_bench_train_counts(attention, loss):
    r = bench.bench_train(MICRO, batch_size=2, seq_len=8, steps=2, device=CPU, attention=attention, warmup_steps=1,
                          peak=1e12, loss=loss)
    assert (r["batch_size"], r["seq_len"], r["steps"], r["attention"], r["loss"]) == (2, 8, 2, attention, loss)
    assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 8 / r["step_s"])
    assert r["flops_per_token"] == flops_per_token(MICRO, 8)
    assert r["achieved_tflops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"])   # a peak of 1 TFLOP/s: MFU equals TFLOP/s
    assert r["bf16"] is False and r["fused_adamw"] is False    # autocast and fused AdamW are CUDA only
    assert r["params"] == sum(p.numel() for p in bench.Transformer(MICRO).parameters())


def test_bench_train_on_the_cpu_in_bf16_when_asked():
    r = bench.bench_train(MICRO, batch_size=2, seq_len=8, steps=1, device=CPU, warmup_steps=0, cpu_bf16=True)
    assert r["bf16"] is True and r["step_s"] > 0


def test_model_loss_is_the_same_mean_either_way():
    model = bench.Transformer(MICRO)
    tokens = torch.randint(0, MICRO.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5, [1] * 6 + [0] * 2])
    full, chunked = (bench.model_loss(model, tokens, mask, loss) for loss in bench.LOSSES)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        bench.bench_train(MICRO, 1, 4, 1, CPU, loss="fused")


def test_bench_train_without_a_known_peak_has_no_mfu():
    assert bench.peak_flops(CPU) is None and bench.peak_flops(CPU, override_tflops=2.0) == 2e12
    assert bench.bench_train(MICRO, 1, 4, 1, CPU, warmup_steps=0)["mfu"] is None
    with pytest.raises(ValueError, match="max_seq_len"):
        bench.bench_train(MICRO, 1, 64, 1, CPU)


def test_bench_config_stretches_max_seq_len_for_a_longer_sequence():
    assert bench.bench_config("small").max_seq_len == 512
    assert bench.bench_config("small", seq_len=1024).max_seq_len == 1024
    assert bench.bench_config("small", seq_len=256).max_seq_len == 512
    assert num_params(bench.Transformer(bench.bench_config("tiny", seq_len=400))) == \
        num_params(bench.Transformer(bench.bench_config("tiny")))


@pytest.mark.parametrize("use_cache", [True, False])
def test_bench_generate_makes_every_token(use_cache):
    model = bench.Transformer(MICRO)
    r = bench.bench_generate(model, batch_size=3, prompt_len=5, new_tokens=6, use_cache=use_cache)
    assert (r["batch_size"], r["new_tokens"], r["use_cache"]) == (3, 6, use_cache)
    assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(3 * 6 / r["seconds"])
    with pytest.raises(ValueError, match="max_seq_len"):
        bench.bench_generate(model, 1, 30, 6, use_cache)


def test_bench_generation_speedup_is_the_ratio():
    rows = bench.bench_generation(MICRO, [1, 2], prompt_len=4, new_tokens=4, device=CPU)
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["kv_cache_tokens_per_s"] > 0 and r["recompute_tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["kv_cache_tokens_per_s"] / r["recompute_tokens_per_s"])


def test_bench_config_uses_the_train_sft_presets():
    from train_sft import MODEL_PRESETS
    small = bench.bench_config("small")
    assert (small.dim, small.n_layers, small.vocab_size) == (MODEL_PRESETS["small"]["dim"], 12, 32000)
    # the 124M class: 768 wide, 12 layers, Llama 2's vocabulary, untied embeddings
    with torch.device("meta"):                                 # shapes only, no memory or init time
        assert 120e6 < sum(p.numel() for p in bench.Transformer(small).parameters()) < 130e6


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_main_writes_json(tmp_path, restore_threads):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--threads", "1", "--presets", "tiny", "--train-batch", "2", "--seq-len", "16",
            "--steps", "1", "--warmup-steps", "0", "--gen-presets", "tiny", "--gen-batch-sizes", "1,2",
            "--prompt-len", "4", "--new-tokens", "4", "--ppo-presets", "", "--out", str(out)]
    report = bench.main(bench.get_args(argv))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    before = out.read_text()
    with pytest.raises(runtime.UserError, match="already exists; pass --overwrite"):  # before any timing
        bench.main(bench.get_args(argv))
    assert out.read_text() == before
    with pytest.raises(runtime.UserError, match="is a folder"):
        bench.main(bench.get_args(argv[:-1] + [str(tmp_path)]))
    assert [(r["attention"], r["loss"]) for r in report["train"]["tiny"]] == \
        [("causal", "full"), ("causal", "chunked"), ("masked", "full"), ("masked", "chunked")]
    assert all(r["tokens_per_s"] > 0 for r in report["train"]["tiny"])
    assert [r["batch_size"] for r in report["generate"]["tiny"]] == [1, 2]
    assert report["machine"]["device"] == "cpu" and report["peak_flops"] is None
    assert report["machine"]["torch_threads"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--presets", "tiny,huge"], "--presets: unknown preset 'huge'"),
    (["--ppo-presets", "nano"], "--ppo-presets: unknown preset 'nano'"),
    (["--attention", "sparse"], "--attention: unknown path 'sparse'"),
    (["--losses", "full,fused"], "--losses: unknown loss 'fused'"),
    (["--gen-batch-sizes", "1,0"], "must be > 0"),
    (["--steps", "-5"], "--steps: must be > 0"),
    (["--threads", "two"], "expected a whole number"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.get_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_bad_ppo_args_stop_the_run_before_any_timing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench.get_args(["--device", "cpu", "--presets", "small", "--steps", "1000", "--ppo-presets", "tiny",
                           "--ppo-args=--bogus 1", "--out", str(out)])
    with pytest.raises(SystemExit) as e:  # a thousand small-preset steps would take minutes: none is run
        bench.main(args)
    assert e.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    assert not out.exists()


def test_phase_timers_attribute_calls_and_restore_the_module():
    import types
    module = types.SimpleNamespace(forward=lambda x: x + 1, other=lambda: 0)
    original = module.forward
    phases = dict(forward=lambda grad, x: "update" if grad else f"scoring {x}", absent="skipped")
    with bench.phase_timers(module, phases, CPU) as records:
        assert module.forward(1) == 2
        with torch.no_grad():
            module.forward(2)
    assert [r[0] for r in records] == ["update", "scoring 2"] and all(end >= start for _, start, end in records)
    assert module.forward is original and not hasattr(module, "absent")


def test_ppo_phase_tells_the_reference_from_the_policy():
    policy, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    assert bench.ppo_phase(True, policy) == "update"
    assert bench.ppo_phase(False, frozen, "tokens") == "reference" and bench.ppo_phase(False, policy) == "policy_value"


def test_bench_ppo_splits_the_iteration(restore_threads):
    torch.set_num_threads(1)
    r = bench.bench_ppo("tiny", CPU, iterations=2, extra_args=["--batch-size", "4", "--minibatch-size", "2",
                                                               "--ppo-epochs", "1", "--max-new-tokens", "4"])
    assert (r["batch_size"], r["max_new_tokens"], r["ppo_epochs"]) == (4, 4, 1)
    phases = [f"{p}_s" for p in bench.PPO_PHASES + ("update",)]
    assert all(r[p] > 0 for p in phases)
    assert sum(r[p] for p in phases) == pytest.approx(r["iteration_s"])
    assert r["rollout_tokens_per_s"] == pytest.approx(4 * 4 / r["rollout_s"])
    import train_ppo
    assert train_ppo.generate is bench.generate                 # the timers are gone after the run
    assert runtime.save_on_rank0.__name__ == "save_on_rank0" and runtime.save_on_rank0.__module__ == "runtime"


# ---------------------------------------------------------------------------------------------- against transformers
def test_compare_hf_without_transformers_is_skipped_with_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "hf_twin", lambda config, seed=0: None)   # as when transformers is not installed
    out = tmp_path / "vs_hf.json"
    report = bench.main(bench.get_args(["--compare-hf", "--device", "cpu", "--out", str(out)]))
    assert report["compare_hf"] is None and "transformers is not installed" in capsys.readouterr().out
    assert json.loads(out.read_text())["compare_hf"] is None


def test_compare_hf_times_both_sides_on_the_same_work(restore_threads):
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    rows = bench.compare_hf(rounds=2, configs=("tiny",))
    assert [(r["kind"], r["batch"], r.get("loss")) for r in rows] == \
        [("train", 32, "full"), ("train", 32, "chunked"), ("generate", 1, None), ("generate", 16, None)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
        assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]


def test_the_hf_twin_has_the_same_shapes():
    pytest.importorskip("transformers")
    config = bench.bench_config("tiny")
    twin = bench.hf_twin(config)
    assert twin.config._attn_implementation == "sdpa"
    assert sum(p.numel() for p in twin.parameters()) == num_params(bench.Transformer(config))


def test_smollm2_shapes_run_ppo_with_a_synthetic_tokenizer():
    tok = bench.synthetic_tokenizer(bench.SMOLLM2_135M["vocab_size"])
    assert tok.vocab_size == 49152 and tok.decode([300, 49151 - 7]) == "<44><48888>"
    config, tok = bench.ppo_model("smollm2-135m")
    assert (config.dim, config.n_layers, config.vocab_size) == (576, 30, tok.vocab_size)
    assert num_params(bench.Transformer(config)) == 134_515_008          # SmolLM2-135M's count, tied embeddings
    assert bench.ppo_schedule("smollm2-135m") == "tiny" and bench.ppo_schedule("small") == "small"
    assert bench.get_args(["--ppo-presets", "smollm2-135m"]).ppo_presets == ["smollm2-135m"]
