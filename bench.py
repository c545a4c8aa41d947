"""Speed benchmark: training tokens/s and model FLOPs utilisation, generation tokens/s with and without the KV cache.

Training: full optimizer steps (forward, masked next-token loss, backward, gradient clipping, AdamW) on random
tokens, for the tiny preset and the 124M-class "small" preset of train_sft.MODEL_PRESETS. Two attention paths are
timed: "causal" (no attention mask, so SDPA may pick its flash kernel on CUDA: what packed pre-training rows get)
and "masked" (the explicit padding mask that padded SFT batches need, which rules the flash kernel out), each with
the "full" loss (masked_nll on the logits) and the "chunked" one (model.chunked_nll, --chunked-loss). On CUDA
the step runs under bf16 autocast (runtime.autocast) with fused AdamW (runtime.make_optimizer), and model FLOPs
utilisation is
    MFU = tokens/s * model.flops_per_token(config, seq_len) / peak bf16 FLOP/s of the GPU
(PaLM, appendix B; recomputation and padding are not counted as useful work).

Generation: model.generate with the KV cache (one new token per forward) against recomputing the whole sequence
every step (use_cache=False), at batch 1 and 32, 128 new tokens; EOS is disabled so every row makes all of them.

PPO: one iteration of train_ppo.main (its tiny or small preset, or SmolLM2-135M's shapes) split into rollout
(generation), reward (the two reward models), reference (the frozen SFT model's log-probs), policy/value passes
(the rollout's no-grad log-probs, entropy and values) and update (the PPO epochs) time. Timers wrap train_ppo's
own calls (and runtime.save_on_rank0, which ends an iteration) for the length of the run, so the loop measured
is the script's real one.

Against transformers (--compare-hf, CPU): the same shapes through this project's transformer and transformers'
LlamaForCausalLM (SDPA attention, its generate with its own KV cache), float32, same threads, in one run of
interleaved rounds; each ratio is this project's tokens/s over transformers' in one round, reported as min /
median / max. transformers is optional; without it the comparison is skipped with a message.

Weights are random: speed does not depend on what the model has learnt. Every figure is a wall-clock rate on this
machine at this moment; the JSON records the load average before and after, so runs on a shared CPU can be told.

    python bench.py --out out/bench_cpu.json                       # CPU, a few minutes
    python bench.py --device cuda --out out/bench_gpu.json         # GPU: bf16, fused AdamW, flash attention
    python bench.py --device cuda --compile --out out/bench_gpu_compiled.json
    python bench.py --compare-hf --out out/bench_vs_hf.json        # CPU, needs pip install transformers

Memory (--memory-plan): no timing, arithmetic. Bytes per parameter (float32 weights, gradients, AdamW moments,
autocast's bf16 copies) and per token (the tensors each block saves for its backward pass), for the 124M, 1B, 7B
and 13B shapes, on one 80 GB GPU and per GPU under --fsdp over 8, with and without --activation-checkpointing,
and what PPO's five models add; written as Markdown:
    python bench.py --memory-plan --out docs/memory.md
An --out file that already exists is an error unless --overwrite.
"""
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch

import runtime
import tokenizer
from model import ModelConfig, Transformer, flops_per_token, generate, masked_nll, num_params, save_checkpoint
from train_sft import MODEL_PRESETS

# Dense bf16 tensor-core peak FLOP/s by GPU name (vendor data sheets, without sparsity), first match wins; more
# specific names come first. --peak-tflops overrides, for GPUs not listed or clocks that differ.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
)
# Vocabulary per preset: tiny uses the world BPE (train_sft's --vocab-size default); the larger presets are
# benchmarked at Llama 2's 32000-token vocabulary, which puts "small" at 124M parameters (GPT-2 small's size).
VOCAB_SIZE = {"tiny": 2048, "small": 32000, "1b": 32000}
# SmolLM2-135M's shapes (its config.json): the size of the real model the README runs, at random weights
SMOLLM2_135M = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                    norm_eps=1e-5, rope_theta=100000.0, max_seq_len=2048, tie_embeddings=True)
# Sizes per device: on CPU small enough to finish in minutes on two cores; on CUDA large enough to fill the GPU.
SIZES = {
    "cpu": dict(train_batch={"tiny": 32, "small": 4, "1b": 1}, seq_len={"tiny": 192, "small": 256, "1b": 256},
                steps={"tiny": 5, "small": 2, "1b": 1}, gen_presets="tiny", ppo_presets="tiny"),
    "cuda": dict(train_batch={"tiny": 64, "small": 32, "1b": 8}, seq_len={"tiny": 192, "small": 512, "1b": 1024},
                 steps={"tiny": 20, "small": 10, "1b": 5}, gen_presets="tiny,small", ppo_presets="tiny,small"),
}


def peak_flops(device, override_tflops=None):
    """The device's peak bf16 FLOP/s, or None where unknown (CPU, unlisted GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(preset, vocab_size=None, seq_len=None):
    """The ModelConfig of a train_sft.MODEL_PRESETS entry at the benchmark's vocabulary; a seq_len beyond the
    preset's max_seq_len extends it (only the RoPE table grows: the weights are the same)."""
    shape = dict(MODEL_PRESETS[preset])
    shape["max_seq_len"] = max(shape["max_seq_len"], seq_len or 0)
    return ModelConfig(vocab_size=vocab_size or VOCAB_SIZE.get(preset, 32000), **shape)


# ---------------------------------------------------------------------------------------------- training
LOSSES = ("full", "chunked")


def model_loss(model, tokens, loss_mask, loss="full", attention_mask=None):
    """Mean next-token loss of this project's model on tokens (B, T + 1): masked_nll on the (B, T, V) logits
    ("full") or the same mean through chunked_nll without them ("chunked")."""
    if loss == "chunked":
        return model(tokens[:, :-1], attention_mask=attention_mask, targets=tokens[:, 1:],
                     loss_weights=loss_mask / loss_mask.sum())
    return masked_nll(model(tokens[:, :-1], attention_mask=attention_mask), tokens[:, 1:], loss_mask)


def train_step(loss_fn, model, optimizer):
    """One full optimizer step: loss_fn() -> the next-token loss (forward), backward, gradient clipping at 1, the
    optimizer's step; returns the loss."""
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def bench_train(config, batch_size, seq_len, steps, device, attention="causal", bf16=True, compile=False,
                warmup_steps=2, peak=None, seed=0, loss="full", cpu_bf16=False):
    """Training throughput of full optimizer steps on random tokens (B = batch_size, T = seq_len).

    attention="causal" passes no mask (SDPA's is_causal path); "masked" passes an all-ones attention mask, which
    the model turns into the explicit (B, 1, T, T) mask that padded batches need. loss="full" is masked_nll on the
    logits, "chunked" the model's chunked_nll (--chunked-loss). bf16 autocast on CUDA, on the CPU with cpu_bf16
    (the training scripts' --cpu-bf16). Returns tokens/s, seconds per step, FLOPs per
    token, achieved FLOP/s, and MFU when the peak is known.
    """
    if attention not in ("causal", "masked"):
        raise ValueError(f"attention must be 'causal' or 'masked', got {attention!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    torch.manual_seed(seed)
    model = Transformer(config).to(device)
    optimizer = runtime.make_optimizer(model, lr=1e-4, weight_decay=0.1)
    train_model = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    loss_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    attention_mask = loss_mask if attention == "masked" else None
    amp = runtime.autocast(runtime.Runtime(device, cpu_bf16=cpu_bf16)) if bf16 else nullcontext()

    def next_token_loss():
        with amp:
            return model_loss(train_model, tokens, loss_mask, loss, attention_mask)

    step = lambda: train_step(next_token_loss, model, optimizer)

    for _ in range(warmup_steps):  # allocator, kernel selection and, with --compile, compilation
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(last):
        raise RuntimeError(f"benchmark loss is {last.item()}: the timed steps computed garbage")
    tokens_per_s = batch_size * seq_len * steps / seconds
    fpt = flops_per_token(config, seq_len)
    result = dict(params=num_params(model), batch_size=batch_size, seq_len=seq_len, steps=steps,
                  attention=attention, loss=loss, bf16=bf16 and (device.type == "cuda" or cpu_bf16), compile=compile,
                  fused_adamw=bool(optimizer.defaults.get("fused")),
                  step_s=seconds / steps, tokens_per_s=tokens_per_s, flops_per_token=fpt,
                  achieved_tflops=tokens_per_s * fpt / 1e12, mfu=tokens_per_s * fpt / peak if peak else None)
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# ---------------------------------------------------------------------------------------------- generation
def bench_generate(model, batch_size, prompt_len, new_tokens, use_cache, bf16=True, seed=0):
    """Generation throughput of model.generate on random prompts: new tokens/s over the whole batch.

    EOS is an id no sampler can produce (-1), so every row generates exactly new_tokens tokens; sampling at
    temperature 1 keeps the work the same as a rollout's.
    """
    device = next(model.parameters()).device
    if prompt_len + new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds max_seq_len "
                         f"{model.config.max_seq_len}")
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator).tolist()
    sampler = torch.Generator(device=device).manual_seed(seed)
    amp = runtime.autocast(runtime.Runtime(device)) if bf16 else nullcontext()
    model.eval()

    def run(n):
        with amp:
            return generate(model, prompts, n, eos_id=-1, pad_id=0, temperature=1.0, generator=sampler,
                            use_cache=use_cache)

    run(2)  # warm-up: allocator and kernel selection
    synchronize(device)
    start = time.perf_counter()
    out = run(new_tokens)
    synchronize(device)
    seconds = time.perf_counter() - start
    if any(len(row) != new_tokens for row in out):
        raise RuntimeError("a row stopped early: the benchmark expects every row to make all new tokens")
    return dict(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, use_cache=use_cache,
                seconds=seconds, tokens_per_s=batch_size * new_tokens / seconds)


def bench_generation(config, batch_sizes, prompt_len, new_tokens, device, bf16=True, seed=0):
    """KV cache against recomputation at each batch size; speedup = cached tokens/s / recomputed tokens/s."""
    torch.manual_seed(seed)
    model = Transformer(config).to(device)
    rows = []
    for batch_size in batch_sizes:
        cached = bench_generate(model, batch_size, prompt_len, new_tokens, True, bf16, seed)
        recomputed = bench_generate(model, batch_size, prompt_len, new_tokens, False, bf16, seed)
        rows.append(dict(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                         kv_cache_tokens_per_s=cached["tokens_per_s"],
                         recompute_tokens_per_s=recomputed["tokens_per_s"],
                         speedup=cached["tokens_per_s"] / recomputed["tokens_per_s"]))
    return rows


# ---------------------------------------------------------------------------------------------- PPO
@contextmanager
def phase_timers(module, phases, device):
    """Wrap module-level functions of `module` so each call adds its wall time to a phase; restored on exit.

    phases maps a function name to a phase name, or to a function of (torch.is_grad_enabled(), the call's
    arguments) giving it (the same log-prob pass is the reference's, or the update's with gradients); names the
    module lacks are skipped. Yields the list of (phase, start, end) records, CUDA work included (synchronised at
    both ends).
    """
    records, originals = [], {name: getattr(module, name) for name in phases if hasattr(module, name)}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            phase = phases[name](torch.is_grad_enabled(), *args) if callable(phases[name]) else phases[name]
            synchronize(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(device)
            records.append((phase, start, time.perf_counter()))
            return out
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(module, name, timed(name, fn))
        yield records
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def ppo_args(preset, init, reward_model, out, iterations, device, seed, extra_args):
    """train_ppo.py's arguments for the benchmark run: `iterations` iterations, no intermediate checkpoint, sample
    or evaluation, both reward models `reward_model`; extra_args (flags) last, so they win."""
    import train_ppo  # here, not at the top: the training and generation benchmarks need no PPO code
    return train_ppo.get_args(["--preset", preset, "--init", init, "--rm-safety", reward_model, "--rm-helpful",
                               reward_model, "--out", out, "--iterations", str(iterations), "--save-every",
                               str(10 * iterations), "--sample-every", str(10 * iterations), "--eval-prompts", "0",
                               "--device", str(device), "--seed", str(seed), *extra_args])


def synthetic_tokenizer(vocab_size):
    """Bytes plus made-up tokens "<0>", "<1>", ... up to vocab_size ids (specials included): it decodes any id, so a
    random model with a real model's vocabulary can run the PPO loop without that model's tokenizer files."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({f"<{i}>".encode(): 256 + i for i in range(vocab_size - 256 - len(tokenizer.SPECIAL_TOKENS))})
    return tokenizer.Tokenizer(ranks, name=f"synthetic{vocab_size}")


def ppo_model(preset):
    """(ModelConfig, tokenizer) of a PPO benchmark model: a train_sft.MODEL_PRESETS entry with the world tokenizer,
    or "smollm2-135m": SmolLM2-135M's shapes with a synthetic tokenizer of its 49152 ids."""
    if preset == "smollm2-135m":
        return ModelConfig(**SMOLLM2_135M), synthetic_tokenizer(SMOLLM2_135M["vocab_size"])
    tok = tokenizer.world_tokenizer(2048)
    return ModelConfig(vocab_size=tok.vocab_size, **MODEL_PRESETS[preset]), tok


def ppo_schedule(preset):
    """The train_ppo.py preset whose schedule a PPO benchmark model runs: its own, or tiny for smollm2-135m."""
    return preset if preset in MODEL_PRESETS else "tiny"


def ppo_phase(grad, model, *rest):
    """The phase of a log-prob or value pass: the update's when it takes gradients, else the frozen reference
    model's, else the rollout's own no-grad pass of the policy or value model ("old" log-probs and values)."""
    if grad:
        return "update"
    return "reference" if not any(p.requires_grad for p in model.parameters()) else "policy_value"


PPO_PHASES = ("rollout", "reward", "reference", "policy_value")


def bench_ppo(preset, device, iterations=2, seed=0, extra_args=()):
    """Seconds of the last of `iterations` train_ppo.py iterations, split into rollout (generation), reward (the
    reward models), reference (the frozen SFT model's log-probs), policy_value (the no-grad passes of policy and
    value model: old log-probs, entropy, old values) and update (the PPO epochs: the rest of the iteration).

    The policy and both reward models are random-weight models of the preset, so each response runs to
    --max-new-tokens (a random policy seldom samples </s>): the longest, steadiest rollout. The earlier iterations
    are warm-up. train_ppo.py runs its "tiny" schedule for "smollm2-135m" (shrink it with extra_args).
    """
    import train_ppo

    config, tok = ppo_model(preset)
    with tempfile.TemporaryDirectory() as workdir:
        paths = {}
        for i, head in enumerate(("lm", "scalar")):
            torch.manual_seed(seed + i)
            head_config = ModelConfig(**{**vars(config), "head": head})
            paths[head] = os.path.join(workdir, f"{head}.pt")
            save_checkpoint(paths[head], dict(model=Transformer(head_config).state_dict(), tokenizer=tok.to_dict(),
                                              model_config=vars(head_config), step=0))
        args = ppo_args(ppo_schedule(preset), paths["lm"], paths["scalar"], os.path.join(workdir, "ppo"), iterations,
                        device, seed, extra_args)
        phases = dict(generate="rollout", combined_reward="reward", response_logprobs=ppo_phase,
                      response_values=ppo_phase, response_logprobs_and_entropy=ppo_phase,
                      response_entropy="policy_value")  # response_entropy: before the one-pass version
        with phase_timers(train_ppo, phases, device) as records, \
                phase_timers(runtime, dict(save_on_rank0="end"), device) as saves:
            train_ppo.main(args)
    if not saves or not any(r[0] == "rollout" for r in records):
        raise RuntimeError("train_ppo.main made no timed rollout or save: it no longer calls generate and "
                           "runtime.save_on_rank0, which bench_ppo times")
    # the last iteration runs from the start of the last rollout to the final checkpoint's save
    start = [r[1] for r in records if r[0] == "rollout"][-1]
    end = saves[-1][1]
    spent = {phase: sum(e - s for p, s, e in records if p == phase and s >= start) for phase in PPO_PHASES}
    total = end - start
    return dict(preset=preset, params=num_params(Transformer(config)), batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs,
                iteration_s=total, **{f"{phase}_s": spent[phase] for phase in PPO_PHASES},
                update_s=total - sum(spent.values()),
                rollout_tokens_per_s=args.batch_size * args.max_new_tokens / spent["rollout"])


# ---------------------------------------------------------------------------------------------- against transformers


def hf_twin(config, seed=0):
    """transformers' LlamaForCausalLM with the shapes of config (random weights, float32, SDPA attention), or None
    when transformers is not installed (it is optional)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
                            rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
                            rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta),
                            pad_token_id=0, bos_token_id=None, eos_token_id=None)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config).eval()


def timed_train_step(model, tokens, optimizer, hf, loss="full"):
    """Seconds of one optimizer step (forward, masked next-token loss, backward, clipping, AdamW) on tokens;
    transformers' model always takes its logits through masked_nll, this project's model as `loss` says."""
    mask = torch.ones_like(tokens[:, 1:])
    if hf:
        loss_fn = lambda: masked_nll(model(tokens[:, :-1]).logits, tokens[:, 1:], mask)
    else:
        loss_fn = lambda: model_loss(model, tokens, mask, loss)
    start = time.perf_counter()
    train_step(loss_fn, model, optimizer)
    return time.perf_counter() - start


@torch.no_grad()
def timed_generate(model, prompts, new_tokens, hf, seed=0):
    """Seconds to sample new_tokens tokens (temperature 1, no top-k/top-p, no EOS) after each prompt row."""
    sampler = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if hf:
        torch.manual_seed(seed)
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        made = out.shape[1] - prompts.shape[1]
    else:
        out = generate(model, prompts.tolist(), new_tokens, eos_id=-1, pad_id=0, temperature=1.0, generator=sampler)
        made = min(len(row) for row in out)
    seconds = time.perf_counter() - start
    if made != new_tokens:
        raise RuntimeError(f"{'transformers' if hf else 'model.generate'} made {made} of {new_tokens} new tokens")
    return seconds


def compare_hf(rounds=5, seed=0, configs=("tiny", "smollm2-135m")):
    """This project's transformer against transformers' LlamaForCausalLM, same shapes, same threads, float32, in
    one interleaved run: each round times both on the same work, alternating which goes first, and the ratio
    (this project's tokens/s over transformers') is taken per round. Returns rows with min/median/max ratios, or
    None without transformers."""
    tiny = bench_config("tiny")
    smol = ModelConfig(**SMOLLM2_135M)
    cases = [("train", "tiny", tiny, dict(batch=32, seq_len=192, loss="full")),
             ("train", "tiny", tiny, dict(batch=32, seq_len=192, loss="chunked")),
             ("generate", "tiny", tiny, dict(batch=1, prompt_len=32, new_tokens=128)),
             ("generate", "tiny", tiny, dict(batch=16, prompt_len=32, new_tokens=128)),
             ("train", "smollm2-135m", smol, dict(batch=4, seq_len=256, loss="full")),
             ("train", "smollm2-135m", smol, dict(batch=4, seq_len=256, loss="chunked")),
             ("generate", "smollm2-135m", smol, dict(batch=4, prompt_len=32, new_tokens=64))]
    if hf_twin(tiny) is None:
        return None
    rows = []
    for kind, name, config, shape in [case for case in cases if case[1] in configs]:
        torch.manual_seed(seed)
        models = {False: Transformer(config), True: hf_twin(config, seed)}
        generator = torch.Generator().manual_seed(seed)
        if kind == "train":
            tokens = torch.randint(0, config.vocab_size, (shape["batch"], shape["seq_len"] + 1), generator=generator)
            optimizers = {hf: runtime.make_optimizer(m.train(), lr=1e-4, weight_decay=0.1) for hf, m in models.items()}
            work = lambda hf: timed_train_step(models[hf], tokens, optimizers[hf], hf, shape["loss"])
            n_tokens = shape["batch"] * shape["seq_len"]
        else:
            prompts = torch.randint(1, config.vocab_size, (shape["batch"], shape["prompt_len"]), generator=generator)
            work = lambda hf: timed_generate(models[hf].eval(), prompts, shape["new_tokens"], hf, seed)
            n_tokens = shape["batch"] * shape["new_tokens"]
        for hf in (False, True):  # warm-up: allocator, kernel choice, lazy initialisation
            work(hf)
        seconds = {False: [], True: []}
        for r in range(rounds):
            for hf in ((False, True) if r % 2 == 0 else (True, False)):
                seconds[hf].append(work(hf))
        ratios = sorted(t_hf / t_ours for t_ours, t_hf in zip(seconds[False], seconds[True]))
        row = dict(kind=kind, config=name, **shape, rounds=rounds,
                   tokens_per_s=n_tokens / statistics.median(seconds[False]),
                   hf_tokens_per_s=n_tokens / statistics.median(seconds[True]),
                   ratio_min=ratios[0], ratio_median=statistics.median(ratios), ratio_max=ratios[-1])
        rows.append(row)
        print(f"vs transformers: {kind:8s} {name:12s} {json.dumps(shape)}: {fmt(row['tokens_per_s'])} vs "
              f"{fmt(row['hf_tokens_per_s'])} tokens/s, ratio {row['ratio_min']:.2f} / {row['ratio_median']:.2f} / "
              f"{row['ratio_max']:.2f} (min / median / max of {rounds})", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
# ---------------------------------------------------------------------------------------------- memory plan
GiB = 2 ** 30
# An 80 GB H100, less room for the CUDA context, communication buffers and the caching allocator's fragmentation
# (an assumption, not a measurement)
GPU_BUDGET = 76 * GiB
# The shapes planned for: the 124M ("small") and 1B presets of train_sft at Llama 2's 32000-token vocabulary, and
# Llama 2's published 7B and 13B shapes (multi-head attention, SwiGLU width 11008 and 13824, 4096-token context)
MEMORY_SHAPES = {
    "124M": ModelConfig(vocab_size=32000, **MODEL_PRESETS["small"]),
    "1B": ModelConfig(vocab_size=32000, **MODEL_PRESETS["1b"]),
    "7B": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                      max_seq_len=4096),
    "13B": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824,
                       max_seq_len=4096),
}


def parameter_counts(config):
    """(all parameters, one block's, the root's: embeddings, final norm and head), from the shapes alone."""
    kv_dim = config.n_kv_heads * config.head_dim
    block = 2 * config.dim * config.dim + 2 * config.dim * kv_dim + 3 * config.dim * config.hidden_dim + 2 * config.dim
    root = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) + config.dim
    return config.n_layers * block + root, block, root


def block_activation_bytes(config):
    """Bytes one block keeps for its backward pass, per token, under bf16 autocast with SDPA's fused kernel (no
    padding mask): 32 dim + 4 kv_dim + 8 hidden + 4 n_heads + 8. The coefficients are those of the tensors autograd
    saves in model.py's TransformerBlock, measured on micro models under the CPU's bf16 autocast
    (tests/test_distributed.py): float32 residual and normalisation tensors, bf16 projections, SDPA's float32
    log-sum-exp per head. A padding mask adds 4 * sequence length (SDPA's float mask); autocast's bf16 copies of the
    weights are counted apart."""
    kv_dim = config.n_kv_heads * config.head_dim
    return 32 * config.dim + 4 * kv_dim + 8 * config.hidden_dim + 4 * config.n_heads + 8


def memory_plan(config, seq_len, n_gpus=8, budget=GPU_BUDGET):
    """Bytes per GPU of one SFT-style training run of `config` (AdamW, float32 weights, bf16 autocast), one GPU
    alone and --fsdp over n_gpus, each without and with --activation-checkpointing; and how many sequences of
    seq_len tokens fit in a micro-batch within `budget` bytes."""
    P, block, root = parameter_counts(config)
    # per token: every block's saved tensors, or with checkpointing only each block's float32 input plus one
    # block's recomputed tensors; the head keeps the float32 logits and their log-softmax (8 bytes per entry)
    head = 8 * config.vocab_size
    per_token = {False: config.n_layers * block_activation_bytes(config) + head,
                 True: config.n_layers * 4 * config.dim + block_activation_bytes(config) + head}
    states = 16 * P                                    # float32 weights 4 + gradients 4 + AdamW's two moments 8
    plan = dict(params=P, block_params=block, root_params=root, seq_len=seq_len, states=states,
                activations_per_sequence={k: v * seq_len for k, v in per_token.items()}, setups={})
    for fsdp in (False, True):
        for checkpointing in (False, True):
            if fsdp:
                # the shards, plus the units gathered in bf16 (the root, the block computing and the one prefetched)
                # and their unsharded gradients (bf16, then float32 for the reduce-scatter)
                fixed = states / n_gpus + 2 * (root + 2 * block) + 6 * (root + block)
            else:
                # autocast's bf16 copies of the weights, kept for the backward pass (of one block at a time when
                # the blocks are recomputed)
                fixed = states + 2 * ((root + block) if checkpointing else P)
            per_sequence = per_token[checkpointing] * seq_len
            plan["setups"][(fsdp, checkpointing)] = dict(
                fixed=fixed, per_sequence=per_sequence, sequences=max(0, int((budget - fixed) // per_sequence)))
    return plan


def ppo_memory(config, seq_len, budget=GPU_BUDGET):
    """Bytes of train_ppo.py's five models of `config`'s shape on one GPU: the policy and the value model trained
    (float32 weights, gradients, AdamW moments and autocast's bf16 copies: 18 bytes a parameter), the reference and
    the two reward models frozen (float32 weights: 4 bytes); and the KV cache of one rollout sequence."""
    P = parameter_counts(config)[0]
    models = dict(policy=18 * P, value_model=18 * P, ref_model=4 * P, reward_safety=4 * P, reward_helpful=4 * P)
    kv_cache = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4 * seq_len   # keys and values, float32
    total = sum(models.values())
    return dict(models=models, total=total, kv_cache_per_sequence=kv_cache, fits=total < budget)


def gib(n):
    return f"{n / GiB:,.1f}"


def memory_page(n_gpus=8, budget=GPU_BUDGET):
    """docs/memory.md: the memory plan of every shape in MEMORY_SHAPES, with its arithmetic, as Markdown."""
    plans = {name: memory_plan(c, c.max_seq_len, n_gpus, budget) for name, c in MEMORY_SHAPES.items()}
    c7, p7 = MEMORY_SHAPES["7B"], plans["7B"]
    lines = [
        "# Memory plan: what fits on an 80 GB H100", "",
        "Written by `python bench.py --memory-plan --out docs/memory.md` from the shapes below (arithmetic: any "
        "machine writes the same page). **Every number here is computed, none was measured on a GPU** (none was "
        "available); the activation count per block was checked against the tensors autograd saves in micro models "
        "under the CPU's bf16 autocast (tests/test_distributed.py), and CUDA's kernels may keep somewhat more or "
        "less. "
        f"The budget per GPU is {gib(budget)} GiB of the 80 GB, the rest left to the CUDA context, communication "
        "buffers and the allocator's fragmentation (an assumption). GiB = 2^30 bytes.", "",
        "## Shapes", "",
        "| shape | dim | layers | heads (KV) | SwiGLU width | vocabulary | context | parameters |",
        "|---|---|---|---|---|---|---|---|"]
    for name, c in MEMORY_SHAPES.items():
        lines.append(f"| {name} | {c.dim} | {c.n_layers} | {c.n_heads} ({c.n_kv_heads}) | {c.hidden_dim} | "
                     f"{c.vocab_size} | {c.max_seq_len} | {plans[name]['params']:,} |")
    kv7 = c7.n_kv_heads * c7.head_dim
    lines += [
        "", "124M and 1B are train_sft.py's `small` and `1b` presets at Llama 2's vocabulary; 7B and 13B are Llama 2's "
        "published shapes. Parameters per block: 2 dim² (wq, wo) + 2 dim kv_dim (wk, wv) + 3 dim hidden (SwiGLU) + "
        "2 dim (norms); the root: 2 vocabulary dim (embedding and untied head) + dim. For 7B: "
        f"32 × (2·4096² + 2·4096·{kv7} + 3·4096·11008 + 2·4096) + 2·32000·4096 + 4096 = {p7['params']:,}.",
        "",
        "## Bytes per parameter and per token", "",
        "Training keeps float32 weights and runs the matrix products in bf16 under autocast (runtime.autocast); "
        "AdamW keeps two float32 moments:", "",
        "| what | bytes | one GPU | FSDP over N GPUs |", "|---|---|---|---|",
        "| weights (float32) | 4 per parameter | 4 P | 4 P / N |",
        "| gradients (float32) | 4 per parameter | 4 P | 4 P / N |",
        "| AdamW moments (float32) | 8 per parameter | 8 P | 8 P / N |",
        "| bf16 copies of the weights | 2 per parameter | 2 P kept by autocast for the backward pass (2 (root + "
        "block) with checkpointing) | 2 (root + 2 blocks): the units gathered at a time |",
        "| unsharded gradients in flight | | | 6 (root + block): bf16, then float32 for the reduce-scatter |",
        "| activations, per token | 32 dim + 4 kv_dim + 8 hidden + 4 heads + 8 per block, + 8 vocabulary for the "
        "head (float32 logits and log-softmax) | layers × block + head | the same, for the GPU's own sequences |",
        "| with activation checkpointing | each block's float32 input (4 dim) + one block's tensors while it is "
        "recomputed | layers × 4 dim + block + head | the same |", "",
        f"7B, one block per token: 32·4096 + 4·{kv7} + 8·11008 + 4·32 + 8 = {block_activation_bytes(c7):,} bytes; "
        f"a 4096-token sequence keeps {gib(p7['activations_per_sequence'][False])} GiB without checkpointing "
        f"(32 blocks + the head's 8·32000 bytes a token) and {gib(p7['activations_per_sequence'][True])} GiB with "
        "it. Data-parallel DDP on several GPUs holds what one GPU holds, plus its gradient buckets (4 P). "
        "--chunked-loss removes most of the head's share.", "",
        f"## What fits on one GPU, and per GPU with --fsdp over {n_gpus}", "",
        "Each cell gives what the run holds whatever its batch (model state, gathered units) and the largest "
        "micro-batch of full-length sequences that fits beside it (0: not even one; a batch larger than that takes "
        "more --grad-accum steps). A cell within a few GiB of the budget is a guess: optimizer temporaries, the "
        "allocator and kernels' workspaces are not counted. A micro-batch of padded SFT rows also passes a padding "
        "mask, 4 × sequence length more bytes a token per block (7% more for 7B at 4096 tokens).", "",
        "| shape | tokens a sequence | activations a sequence (GiB), plain / checkpointed | one GPU | one GPU, "
        f"checkpointing | FSDP ×{n_gpus} | FSDP ×{n_gpus}, checkpointing |",
        "|---|---|---|---|---|---|---|"]
    for name, plan in plans.items():
        cells = []
        for key in ((False, False), (False, True), (True, False), (True, True)):
            s = plan["setups"][key]
            fits = f"{s['sequences']} a micro-batch" if s["fixed"] < budget else "the state alone is too large"
            cells.append(f"{gib(s['fixed'])} GiB; {fits}")
        acts = plan["activations_per_sequence"]
        lines.append(f"| {name} | {plan['seq_len']} | {gib(acts[False])} / {gib(acts[True])} | " + " | ".join(cells)
                     + " |")
    s7 = p7["setups"]
    lines += [
        "", f"7B on one GPU: 16 bytes × {p7['params']:,} = {gib(p7['states'])} GiB of weights, gradients and moments "
        f"before a single activation: it cannot train there. With FSDP over {n_gpus}: {gib(p7['states'])} / "
        f"{n_gpus} = {gib(p7['states'] / n_gpus)} GiB of shards + "
        f"{gib(s7[(True, False)]['fixed'] - p7['states'] / n_gpus)} GiB of gathered units and gradients in flight "
        f"= {gib(s7[(True, False)]['fixed'])} GiB, which leaves room for {s7[(True, False)]['sequences']} sequences "
        f"of 4096 tokens without checkpointing and {s7[(True, True)]['sequences']} with it.", "",
        f"## The 7B SFT run on {n_gpus} GPUs", "",
        "```",
        f"torchrun --standalone --nproc_per_node={n_gpus} train_sft.py --stage sft --init MODEL_7B "
        "--data FILE.jsonl \\",
        "    --fsdp --max-seq-len 4096 --batch-size 64 --grad-accum 8 --lr 2e-5 --out out/sft_7b",
        "```", "",
        f"A global batch of 64 sequences is {64 // n_gpus} per GPU, in --grad-accum 8 micro-batches of one 4096-token "
        f"sequence: {gib(s7[(True, False)]['fixed'])} + {gib(p7['activations_per_sequence'][False])} = "
        f"{gib(s7[(True, False)]['fixed'] + p7['activations_per_sequence'][False])} GiB by this count. "
        "--activation-checkpointing --grad-accum 1 instead takes the 8 sequences in one micro-batch ("
        f"{gib(s7[(True, True)]['fixed'] + 8 * p7['activations_per_sequence'][True])} GiB) for about one more forward "
        "pass of compute. MODEL_7B is a HF or Meta folder of a 7B Llama-architecture model that loaders.py reads "
        "(a byte-level BPE tokenizer: Llama 2's own SentencePiece tokenizer is refused). FSDP reduce-scatters the "
        "gradients after every micro-batch, so nothing unsharded is held between them. The checkpoint is one file "
        "(model.pt: the weights and AdamW moments gathered to rank 0's CPU memory, 12 bytes × P = "
        f"{gib(12 * p7['params'])} GiB); every rank first reads the whole float32 model ({gib(4 * p7['params'])} "
        f"GiB, {n_gpus} times in the node's CPU memory), then shards it.", "",
        "## What PPO adds", "",
        "train_ppo.py holds five models of the policy's shape (the reward models here take the policy's shape too; a "
        "smaller reward model shrinks its rows). The policy and the value model are trained: weights, gradients, "
        "moments and autocast's bf16 copies, 18 bytes a parameter. The reference (the SFT model, anchor of the KL "
        "penalty) and the two reward models are frozen: float32 weights, 4 bytes a parameter, and no activations kept "
        "(they run under no_grad). Rollouts add the policy's KV cache: 2 × layers × kv_dim × 4 bytes a token.", "",
        "GiB per model:", "",
        "| shape | policy | value model | reference | safety RM | helpfulness RM | total | fits one GPU | KV cache "
        "a sequence |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in MEMORY_SHAPES.items():
        ppo = ppo_memory(c, c.max_seq_len, budget)
        m = ppo["models"]
        lines.append(f"| {name} | {gib(m['policy'])} | {gib(m['value_model'])} | {gib(m['ref_model'])} | "
                     f"{gib(m['reward_safety'])} | {gib(m['reward_helpful'])} | {gib(ppo['total'])} | "
                     f"{'yes' if ppo['fits'] else 'no'} | {ppo['kv_cache_per_sequence'] / GiB:.2f} |")
    ppo7 = ppo_memory(c7, c7.max_seq_len, budget)
    lines += [
        "", f"PPO at 7B needs 48 bytes a parameter ({gib(ppo7['total'])} GiB) before activations and the KV cache, "
        f"{ppo7['total'] / budget:.1f} times what one GPU holds; "
        "train_ppo.py does not take --fsdp, since its rollouts end at different lengths on each rank, and sharded "
        "weights need every rank in every forward pass. Sharding the trained pair and keeping the three frozen "
        "models in bf16 (2 bytes a parameter) would be the next step, not taken here.", ""]
    return "\n".join(lines)


def machine_info(device):
    info = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
    if hasattr(os, "getloadavg"):
        info["loadavg_before"] = os.getloadavg()
    return info


def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def comma_list(kind):
    """argparse type of a comma-separated list of `kind` values (an empty string is an empty list)."""
    return lambda text: [kind(x) for x in text.split(",") if x]


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--out", default=None, help="write the results as JSON to this file (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace the file already at --out")
    # training
    p.add_argument("--presets", type=comma_list(str), default="tiny,small",
                   help="comma-separated train_sft.MODEL_PRESETS to time training on")
    p.add_argument("--attention", type=comma_list(str), default="causal,masked",
                   help="comma-separated attention paths to time: causal, masked")
    p.add_argument("--losses", type=comma_list(str), default="full,chunked",
                   help="comma-separated next-token losses to time: full (masked_nll on the logits), chunked "
                   "(chunked_nll, --chunked-loss of train_sft and distill)")
    p.add_argument("--train-batch", type=runtime.positive_int, default=None, help="sequences per step (default: per "
                   "preset and device)")
    p.add_argument("--seq-len", type=runtime.positive_int, default=None, help="tokens per sequence (default: per "
                   "preset and device)")
    p.add_argument("--steps", type=runtime.positive_int, default=None, help="timed optimizer steps (default: per "
                   "preset and device)")
    p.add_argument("--warmup-steps", type=runtime.nonnegative_int, default=2, help="untimed steps before timing")
    p.add_argument("--vocab-size", type=runtime.positive_int, default=None, help="vocabulary (default: 2048 tiny, "
                   "32000 larger)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training steps")
    p.add_argument("--no-bf16", action="store_true", help="on CUDA: float32 instead of bf16 autocast")
    p.add_argument("--cpu-bf16", action="store_true", help="on the CPU: the training steps under bf16 autocast, as the "
                   "training scripts' --cpu-bf16 (float32 without it)")
    p.add_argument("--peak-tflops", type=runtime.positive_float, default=None, help="peak bf16 TFLOP/s for MFU "
                   "(default: by GPU name)")
    # generation
    p.add_argument("--gen-presets", type=comma_list(str), default=None, help="presets to time generation on (default: "
                   "tiny on CPU, tiny,small on CUDA); empty to skip")
    p.add_argument("--gen-batch-sizes", type=comma_list(runtime.positive_int), default="1,32",
                   help="comma-separated generation batch sizes")
    p.add_argument("--prompt-len", type=runtime.positive_int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=runtime.positive_int, default=128, help="tokens generated per row")
    # PPO
    p.add_argument("--ppo-presets", type=comma_list(str), default=None, help="train_ppo.py presets to time one "
                   "iteration of, or smollm2-135m (its shapes, the tiny schedule) (default: tiny on CPU, tiny,small "
                   "on CUDA); empty to skip")
    p.add_argument("--ppo-iterations", type=runtime.positive_int, default=2, help="PPO iterations run; the last one "
                   "is timed")
    p.add_argument("--ppo-args", default="", help="extra train_ppo.py flags, e.g. '--batch-size 16 --minibatch-size "
                   "8'")
    p.add_argument("--threads", type=runtime.positive_int, default=None, help="CPU threads for torch (default: torch's "
                   "choice); on a CPU shared with other jobs, 1 avoids threads waiting on each other")
    p.add_argument("--seed", type=int, default=0, help="random seed of weights and tokens")
    # against transformers
    p.add_argument("--compare-hf", action="store_true", help="instead of the above: this project's transformer and "
                   "transformers' LlamaForCausalLM side by side, same shapes and threads, float32, interleaved rounds "
                   "(needs transformers, which is optional: without it the comparison is skipped with a message)")
    p.add_argument("--compare-configs", type=comma_list(str), default="tiny,smollm2-135m",
                   help="configs compared: tiny, smollm2-135m (its shapes at random weights)")
    p.add_argument("--rounds", type=runtime.positive_int, default=5, help="--compare-hf: timed rounds per case")
    # memory
    p.add_argument("--memory-plan", action="store_true", help="instead of timing: write the computed memory plan "
                   "(bytes per parameter and per token, what fits on an 80 GB H100 with and without --fsdp and "
                   "--activation-checkpointing, what PPO adds) as Markdown to --out (docs/memory.md) or stdout")
    args = runtime.parse_args(p, {}, argv)
    for flag, names, known in (("--presets", args.presets, MODEL_PRESETS),
                               ("--gen-presets", args.gen_presets, MODEL_PRESETS),
                               ("--ppo-presets", args.ppo_presets, [*MODEL_PRESETS, "smollm2-135m"]),
                               ("--compare-configs", args.compare_configs, ["tiny", "smollm2-135m"])):
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            p.error(f"{flag}: unknown preset {unknown[0]!r}; choose from {sorted(known)}")
    for flag, what, names, known in (("--attention", "path", args.attention, ("causal", "masked")),
                                     ("--losses", "loss", args.losses, LOSSES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"{flag}: unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return args


def check_out(path, overwrite):
    """--out before any timing: a writable file path, not a file already there unless overwrite."""
    if path is None:
        return
    if os.path.isdir(path):
        raise runtime.UserError(f"--out {path} is a folder; give a file name, e.g. {os.path.join(path, 'bench.json')}")
    if not runtime.writable(os.path.dirname(os.path.abspath(path))):
        raise runtime.UserError(f"--out {path}: cannot write there (permission denied)")
    if os.path.exists(path) and not overwrite:
        raise runtime.UserError(f"{path} already exists; pass --overwrite to replace it or choose another --out")


def main(args):
    check_out(args.out, args.overwrite)
    if args.memory_plan:
        page = memory_page()
        if args.out is None:
            print(page)
        else:
            with open(args.out, "w") as f:
                f.write(page)
            print(f"wrote {args.out}")
        return page
    device = runtime.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SIZES["cuda" if device.type == "cuda" else "cpu"]
    bf16 = not args.no_bf16
    peak = peak_flops(device, args.peak_tflops)
    report = dict(machine=machine_info(device), peak_flops=peak, train={}, generate={}, ppo={})
    if args.compare_hf:
        if device.type != "cpu":
            raise runtime.UserError("--compare-hf runs on the CPU only (float32 on both sides); pass --device cpu")
        report["compare_hf"] = compare_hf(args.rounds, args.seed, args.compare_configs)
        if report["compare_hf"] is None:
            print("--compare-hf: transformers is not installed (pip install transformers); comparison skipped")
        return finish(report, args.out)
    gen_presets = sizes["gen_presets"].split(",") if args.gen_presets is None else args.gen_presets
    ppo_presets = sizes["ppo_presets"].split(",") if args.ppo_presets is None else args.ppo_presets
    for name in ppo_presets:  # a bad --ppo-args is an error now, not after the training and generation timings
        ppo_args(ppo_schedule(name), "init.pt", "rm.pt", "ppo", args.ppo_iterations, device, args.seed,
                 args.ppo_args.split())

    for name in args.presets:
        config = bench_config(name, args.vocab_size, args.seq_len)
        report["train"][name] = []
        for attention, loss in [(a, l) for a in args.attention for l in args.losses]:
            r = bench_train(config, args.train_batch or sizes["train_batch"].get(name, 1),
                            args.seq_len or sizes["seq_len"].get(name, 256), args.steps or sizes["steps"].get(name, 1),
                            device, attention, bf16, args.compile, args.warmup_steps, peak, args.seed, loss,
                            args.cpu_bf16)
            report["train"][name].append(r)
            dtype = "bf16" if r["bf16"] else "fp32"
            print(f"train {name:6s} {r['params'] / 1e6:7.1f}M  {attention:6s} {loss:7s} {dtype} batch "
                  f"{r['batch_size']:3d} x {r['seq_len']:4d}  {fmt(r['tokens_per_s'])} tokens/s  "
                  f"{r['step_s'] * 1e3:,.0f} ms/step  "
                  f"{r['achieved_tflops']:.3f} TFLOP/s  MFU {fmt(r['mfu'] and 100 * r['mfu'], 1)}%", flush=True)

    for name in gen_presets:
        config = bench_config(name, args.vocab_size)
        rows = bench_generation(config, args.gen_batch_sizes, args.prompt_len, args.new_tokens, device, bf16, args.seed)
        report["generate"][name] = rows
        for r in rows:
            print(f"generate {name:6s} batch {r['batch_size']:3d}, {r['new_tokens']} new tokens: KV cache "
                  f"{fmt(r['kv_cache_tokens_per_s'])} tokens/s, recompute {fmt(r['recompute_tokens_per_s'])} "
                  f"tokens/s, speedup {r['speedup']:.1f}x", flush=True)

    for name in ppo_presets:
        r = bench_ppo(name, device, args.ppo_iterations, args.seed, args.ppo_args.split())
        report["ppo"][name] = r
        print(f"ppo {name:6s} batch {r['batch_size']} x {r['max_new_tokens']} new tokens, {r['ppo_epochs']} epochs: "
              f"{r['iteration_s']:.2f} s per iteration = rollout {r['rollout_s']:.2f} + reward models "
              f"{r['reward_s']:.2f} + reference {r['reference_s']:.2f} + policy/value passes {r['policy_value_s']:.2f} "
              f"+ update {r['update_s']:.2f}", flush=True)

    return finish(report, args.out)


def finish(report, out):
    """Record the load average after the run and write the report to out (if given)."""
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_after"] = os.getloadavg()
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    runtime.command(main, get_args)
