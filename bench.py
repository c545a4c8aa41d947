"""Speed benchmark: training tokens/s and model FLOPs utilisation, generation tokens/s with and without the KV cache.

Training: full optimizer steps (forward, masked next-token loss, backward, gradient clipping, AdamW) on random
tokens, for the tiny preset and the 124M-class "small" preset of train_sft.MODEL_PRESETS. Two attention paths are
timed: "causal" (no attention mask, so SDPA may pick its flash kernel on CUDA) and "masked" (the explicit padding
mask that train_sft.py passes, which rules the flash kernel out). On CUDA the step runs under bf16 autocast
(runtime.autocast) with fused AdamW (runtime.make_optimizer), and model FLOPs utilisation is
    MFU = tokens/s * model.flops_per_token(config, seq_len) / peak bf16 FLOP/s of the GPU
(PaLM, appendix B; recomputation and padding are not counted as useful work).

Generation: model.generate with the KV cache (one new token per forward) against recomputing the whole sequence
every step (use_cache=False), at batch 1 and 32, 128 new tokens; EOS is disabled so every row makes all of them.

PPO: one iteration of train_ppo.main (its tiny or small preset) split into rollout (generation), scoring (the two
reward models, and the no-grad passes of policy, reference and value model) and update (the PPO epochs) time.
Timers wrap train_ppo's own calls (and runtime.save_checkpoint, which ends an iteration) for the length of the
run, so the loop measured is the script's real one.

Weights are random: speed does not depend on what the model has learnt. Every figure is a wall-clock rate on this
machine at this moment; the JSON records the load average before and after, so runs on a shared CPU can be told.

    python bench.py --out out/bench_cpu.json                       # CPU, a few minutes
    python bench.py --device cuda --out out/bench_gpu.json         # GPU: bf16, fused AdamW, flash attention
    python bench.py --device cuda --compile --out out/bench_gpu_compiled.json
An --out file that already exists is an error unless --overwrite.
"""
import json
import os
import platform
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


def bench_config(preset, vocab_size=None):
    """The ModelConfig of a train_sft.MODEL_PRESETS entry at the benchmark's vocabulary."""
    return ModelConfig(vocab_size=vocab_size or VOCAB_SIZE.get(preset, 32000), **MODEL_PRESETS[preset])


# ---------------------------------------------------------------------------------------------- training
def bench_train(config, batch_size, seq_len, steps, device, attention="causal", bf16=True, compile=False,
                warmup_steps=2, peak=None, seed=0):
    """Training throughput of full optimizer steps on random tokens (B = batch_size, T = seq_len).

    attention="causal" passes no mask (SDPA's is_causal path); "masked" passes an all-ones attention mask, which
    the model turns into the explicit (B, 1, T, T) mask that padded batches need. Returns tokens/s, seconds per
    step, FLOPs per token, achieved FLOP/s, and MFU when the peak is known.
    """
    if attention not in ("causal", "masked"):
        raise ValueError(f"attention must be 'causal' or 'masked', got {attention!r}")
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
    amp = runtime.autocast(runtime.Runtime(device)) if bf16 else nullcontext()

    def step():
        with amp:
            logits = train_model(tokens[:, :-1], attention_mask=attention_mask)   # (B, T, V)
        loss = masked_nll(logits, tokens[:, 1:], loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup_steps):  # allocator, kernel selection and, with --compile, compilation
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"benchmark loss is {loss.item()}: the timed steps computed garbage")
    tokens_per_s = batch_size * seq_len * steps / seconds
    fpt = flops_per_token(config, seq_len)
    result = dict(params=num_params(model), batch_size=batch_size, seq_len=seq_len, steps=steps,
                  attention=attention, bf16=bool(bf16 and device.type == "cuda"), compile=compile,
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

    phases maps a function name to a phase name, or to a function of torch.is_grad_enabled() giving it (the
    same log-prob pass is scoring under no_grad and update with gradients). Yields the list of
    (phase, start, end) records, CUDA work included (synchronised at both ends).
    """
    records, originals = [], {name: getattr(module, name) for name in phases}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            phase = phases[name](torch.is_grad_enabled()) if callable(phases[name]) else phases[name]
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


def bench_ppo(preset, device, iterations=2, seed=0, extra_args=()):
    """Seconds of the last of `iterations` train_ppo.py iterations, split into rollout, scoring and update.

    The policy and both reward models are random-weight models of the preset with the world tokenizer, so each
    response runs to --max-new-tokens (a random policy seldom samples </s>): the longest, steadiest rollout.
    The earlier iterations are warm-up. update = the iteration's time minus rollout and scoring.
    """
    import train_ppo

    tok = tokenizer.world_tokenizer(2048)
    config = ModelConfig(vocab_size=tok.vocab_size, **MODEL_PRESETS[preset])
    with tempfile.TemporaryDirectory() as workdir:
        paths = {}
        for i, head in enumerate(("lm", "scalar")):
            torch.manual_seed(seed + i)
            head_config = ModelConfig(**{**vars(config), "head": head})
            paths[head] = os.path.join(workdir, f"{head}.pt")
            save_checkpoint(paths[head], dict(model=Transformer(head_config).state_dict(), tokenizer=tok.to_dict(),
                                              model_config=vars(head_config), step=0))
        args = ppo_args(preset, paths["lm"], paths["scalar"], os.path.join(workdir, "ppo"), iterations, device, seed,
                        extra_args)
        scoring_or_update = lambda grad: "update" if grad else "scoring"
        phases = dict(generate="rollout", combined_reward="scoring", response_logprobs=scoring_or_update,
                      response_values=scoring_or_update, response_entropy="scoring")
        with phase_timers(train_ppo, phases, device) as records, \
                phase_timers(runtime, dict(save_checkpoint="end"), device) as saves:
            train_ppo.main(args)
    if not saves or not any(r[0] == "rollout" for r in records):
        raise RuntimeError("train_ppo.main made no timed rollout or save: it no longer calls generate and "
                           "runtime.save_checkpoint, which bench_ppo times")
    # the last iteration runs from the start of the last rollout to the final checkpoint's save
    start = [r[1] for r in records if r[0] == "rollout"][-1]
    end = saves[-1][1]
    spent = {phase: sum(e - s for p, s, e in records if p == phase and s >= start) for phase in ("rollout", "scoring")}
    total = end - start
    return dict(preset=preset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs, iteration_s=total,
                rollout_s=spent["rollout"], scoring_s=spent["scoring"],
                update_s=total - spent["rollout"] - spent["scoring"],
                rollout_tokens_per_s=args.batch_size * args.max_new_tokens / spent["rollout"])


# ---------------------------------------------------------------------------------------------- report
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
                   "iteration of (default: tiny on CPU, tiny,small on CUDA); empty to skip")
    p.add_argument("--ppo-iterations", type=runtime.positive_int, default=2, help="PPO iterations run; the last one "
                   "is timed")
    p.add_argument("--ppo-args", default="", help="extra train_ppo.py flags, e.g. '--batch-size 16 --minibatch-size "
                   "8'")
    p.add_argument("--threads", type=runtime.positive_int, default=None, help="CPU threads for torch (default: torch's "
                   "choice); on a CPU shared with other jobs, 1 avoids threads waiting on each other")
    p.add_argument("--seed", type=int, default=0, help="random seed of weights and tokens")
    args = runtime.parse_args(p, {}, argv)
    for flag, names in (("--presets", args.presets), ("--gen-presets", args.gen_presets),
                        ("--ppo-presets", args.ppo_presets)):
        unknown = [n for n in names or [] if n not in MODEL_PRESETS]
        if unknown:
            p.error(f"{flag}: unknown preset {unknown[0]!r}; choose from {sorted(MODEL_PRESETS)}")
    unknown = [a for a in args.attention if a not in ("causal", "masked")]
    if unknown:
        p.error(f"--attention: unknown path {unknown[0]!r}; choose from causal, masked")
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
    device = runtime.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SIZES["cuda" if device.type == "cuda" else "cpu"]
    bf16 = not args.no_bf16
    peak = peak_flops(device, args.peak_tflops)
    report = dict(machine=machine_info(device), peak_flops=peak, train={}, generate={}, ppo={})
    gen_presets = sizes["gen_presets"].split(",") if args.gen_presets is None else args.gen_presets
    ppo_presets = sizes["ppo_presets"].split(",") if args.ppo_presets is None else args.ppo_presets
    for name in ppo_presets:  # a bad --ppo-args is an error now, not after the training and generation timings
        ppo_args(name, "init.pt", "rm.pt", "ppo", args.ppo_iterations, device, args.seed, args.ppo_args.split())

    for name in args.presets:
        config = bench_config(name, args.vocab_size)
        report["train"][name] = []
        for attention in args.attention:
            r = bench_train(config, args.train_batch or sizes["train_batch"].get(name, 1),
                            args.seq_len or sizes["seq_len"].get(name, 256), args.steps or sizes["steps"].get(name, 1),
                            device, attention, bf16, args.compile, args.warmup_steps, peak, args.seed)
            report["train"][name].append(r)
            print(f"train {name:6s} {r['params'] / 1e6:7.1f}M  {attention:6s}  batch {r['batch_size']:3d} x "
                  f"{r['seq_len']:4d}  {fmt(r['tokens_per_s'])} tokens/s  {r['step_s'] * 1e3:,.0f} ms/step  "
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
              f"{r['iteration_s']:.2f} s per iteration = rollout {r['rollout_s']:.2f} + scoring {r['scoring_s']:.2f} "
              f"+ update {r['update_s']:.2f}", flush=True)

    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_after"] = os.getloadavg()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    runtime.command(main, get_args)
