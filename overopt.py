"""Reward over-optimisation and constrained RLHF, measured against the gold judge of the embedded world.

Only a world whose judge knows the truth can show the policy climbing the proxy reward (the reward models) while
the true reward falls. This tool runs the study on a finished pipeline seed folder (--from, holding base/, sft/,
rm_safety/ and rm_helpful/ with model.pt), through subprocesses of the stage scripts, and writes its tables and
plots into --out:

1. Gold against proxy (Gao et al. 2022, "Scaling laws for reward model overoptimization").
   Best-of-n: --samples responses per prompt from the SFT model at temperature 1 on --prompts validation prompts
   of the world, sampled once; best-of-n for n = 1, 2, 4, ... takes the first n of them (nested subsets, so all n
   share samples) and picks the one with the highest proxy reward. Its KL to the SFT model is analytic:
   KL_bon = log n - (n - 1) / n. RL: PPO (train_ppo.py) with a small KL coefficient (--rl-beta) for
   --rl-iterations, its policy kept every --rl-keep-every iterations; evaluate.py answers the same validation
   prompts with each kept policy (and the SFT model) once at temperature 1, which gives a point per checkpoint:
   d = sqrt(mean per-sequence KL to the SFT model), the mean proxy and the mean gold reward.
   Proxy reward: the Llama 2 combined reward R_c (reward.combined_reward, "llama2"), a probability, what PPO
   optimises. Gold reward: judge.gold_reward, the gold judge's safety on harmful prompts and helpfulness
   elsewhere, in [0, 1]. Fitted by least squares to the gain over the SFT policy, R(d) - R(0):
       best-of-n  R(d) = d (alpha - beta d)          gold peak d* = alpha / (2 beta)
       RL         R(d) = d (alpha - beta log d)      gold peak d* = exp(alpha / beta - 1)
   (no peak when beta <= 0). Best-of-n's intervals come from a bootstrap over prompts (--bootstrap resamples).
   Repeated with reward models trained on a share of the pairs (--pair-shares; train_rm.py --max-train-pairs),
   with a smaller reward model (a --small-dim x --small-layers base and SFT model trained here on the same world,
   then its two RMs), and (3.) with ensembles.
2. Constrained RLHF (Dai et al. 2023, Safe RLHF) beside the Llama 2 gate: PPO at the preset's budget with
   --reward llama2, lagrangian, safety and helpfulness, --seeds each, on the same SFT model, RMs and prompts;
   each seed's four policies evaluated on the world's TEST split by evaluate.py, combined over seeds by
   report.py --aggregate; the Lagrange multiplier's trajectory from the lagrangian runs' logs.
3. Ensembles (Coste et al. 2023): --ensemble-k reward models of each kind (the --from RM and k - 1 more trained
   with other seeds on the same pairs, train_rm.py --world-seed), combined by their mean or minimum: best-of-n
   with both, and one PPO run with --rl-ensemble.

Work whose output exists is reused (a rerun resumes an interrupted one), so the study resumes like pipeline.sh;
--overwrite starts --out afresh. Training runs --jobs at a time, one thread each; logs in OUT/logs/.

Outputs in OUT: overopt.md and overopt.json (every table below with its 95% intervals and n), bon_<variant>.png,
rl_<run>.png, lambda.png (with matplotlib; skipped with a note without it), bon/ (samples and scores), rm/, ppo/,
constrained/ (runs, eval_seedK/ and the aggregate eval/).

Tiny preset, one seed, then the constrained runs over three seeds (the README gives the measured times of a
smaller configuration on a shared 2-core CPU; these defaults are larger):
    python overopt.py --from out --out out/overopt
    python overopt.py --from out/seed0 --out out/overopt --parts constrained --seeds 0 1 2
"""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

import data
import judge
import loaders
import reward
import runtime
import world
from model import respond

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("bon", "rl", "constrained")
REWARDS = ("llama2", "lagrangian", "safety", "helpfulness")   # the constrained comparison, in table order
# Subprocesses run with one thread each: two OpenMP threads per process on a shared 2-core CPU wait on each other
# (pipeline.sh and tests/conftest.py measured a 3-5x slowdown)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------- the equations
def bon_kl(n):
    """KL(best-of-n || pi) = log n - (n - 1) / n, the analytic bound used by Gao et al. (2022, section 2)."""
    return math.log(n) - (n - 1) / n


def fit_bon(d, gain):
    """Least squares fit of Gao et al. (2022, eq. 1), R(d) - R(0) = d (alpha - beta d), to points (d, gain);
    d, gain 1-D arrays. Returns (alpha, beta)."""
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * d], 1), gain, rcond=None)
    return float(alpha), float(beta)


def fit_rl(d, gain):
    """Least squares fit of Gao et al. (2022, eq. 2), R(d) - R(0) = d (alpha - beta log d), with d log d = 0 at
    d = 0; d, gain 1-D arrays. Returns (alpha, beta)."""
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d_log_d], 1), gain, rcond=None)
    return float(alpha), float(beta)


def bon_peak(alpha, beta):
    """Where d (alpha - beta d) peaks: dR/dd = alpha - 2 beta d = 0, d* = alpha / (2 beta); inf when beta <= 0."""
    return alpha / (2 * beta) if beta > 0 else math.inf


def rl_peak(alpha, beta):
    """Where d (alpha - beta log d) peaks: dR/dd = alpha - beta (log d + 1) = 0, d* = exp(alpha / beta - 1);
    inf when beta <= 0."""
    return math.exp(min(alpha / beta - 1, 700)) if beta > 0 else math.inf


def best_of_n(proxy, gold, n):
    """The proxy and gold reward of the best-of-n pick per prompt: among the first n samples of each row, the one
    with the highest proxy reward (the first on ties). proxy, gold (P, N) arrays -> two (P,) arrays."""
    pick = np.argmax(proxy[:, :n], axis=1)
    rows = np.arange(len(proxy))
    return proxy[rows, pick], gold[rows, pick]


def bon_curve(proxy, gold, ns):
    """Best-of-n's mean proxy and gold reward for each n in ns, and their gains over R(0), the mean over every
    sample (the SFT policy's expected reward, the least noisy estimate of best-of-1). {name: list over ns}."""
    picks = [best_of_n(proxy, gold, n) for n in ns]
    proxy_mean, gold_mean = [float(p.mean()) for p, _ in picks], [float(g.mean()) for _, g in picks]
    return dict(proxy=proxy_mean, gold=gold_mean, proxy_gain=[m - float(proxy.mean()) for m in proxy_mean],
                gold_gain=[m - float(gold.mean()) for m in gold_mean])


# ---------------------------------------------------------------------------------------------- running stages
def finished(folder):
    """folder/model.pt is the checkpoint of a run that ended (pipeline.sh's rule: no .running marker)."""
    return os.path.isfile(os.path.join(folder, "model.pt")) and not os.path.exists(os.path.join(folder, ".running"))


def latest(log):
    """The last progress line of a log (tqdm redraws after a carriage return), at most 110 characters."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            lines = [x.strip() for x in f.read().decode(errors="replace").replace("\r", "\n").split("\n")]
    except OSError:
        return ""
    return next((x for x in reversed(lines) if x), "")[:110]


def run_jobs(jobs, out, n_parallel, progress=30):
    """Run the training jobs [(name, folder, argv, needs)], n_parallel at a time, each with one thread and its log
    in out/logs/name.log; a job starts once every folder in `needs` is finished. A finished folder is reused; one
    with a checkpoint but a .running marker is resumed (--resume); one without a checkpoint starts clean."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    pending, running = [], {}
    for job in jobs:
        if finished(job[1]):
            print(f"== {job[0]}: reusing {job[1]}")
        else:
            pending.append(job)
    env = ONE_THREAD
    next_report = time.time() + progress
    while pending or running:
        for job in list(pending):
            name, folder, argv, needs = job
            if len(running) >= n_parallel or not all(finished(f) for f in needs):
                continue
            pending.remove(job)
            extra = ["--resume"] if os.path.isfile(os.path.join(folder, "model.pt")) else []
            if not extra:
                shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, ".running"), "w").close()
            log = os.path.join(out, "logs", f"{name}.log")
            print(f"== {name}: {' '.join(argv + extra)}  (log: {log})", flush=True)
            proc = subprocess.Popen([sys.executable] + argv + extra, cwd=HERE, env=env, stdout=open(log, "a"),
                                    stderr=subprocess.STDOUT)
            running[name] = (proc, folder, log, time.time())
        if not running and pending:
            raise runtime.UserError(f"{pending[0][0]} needs {pending[0][3]}, which no job writes")
        time.sleep(0.2)
        for name, (proc, folder, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0 or not os.path.isfile(os.path.join(folder, "model.pt")):
                for other, *_ in running.values():
                    other.terminate()
                raise SystemExit(f"overopt.py: {name} failed (exit {proc.returncode}); see {log}")
            os.remove(os.path.join(folder, ".running"))
            print(f"== {name}: done in {time.time() - start:.0f} s", flush=True)
        if running and time.time() >= next_report:
            for name, (_, _, log, _) in running.items():
                print(f"== {name}: {latest(log) or 'running'}", flush=True)
            next_report = time.time() + progress


# ---------------------------------------------------------------------------------------------- what to train
def rm_pair(folder):
    return {"safety": os.path.join(folder, "safety", "model.pt"), "helpfulness": os.path.join(folder, "helpful",
                                                                                               "model.pt")}


def rm_variants(args):
    """{variant: {"safety": [paths], "helpfulness": [paths]}, "ensemble": mean|min|None} for best-of-n."""
    base = {"safety": [args.from_rm["safety"]], "helpfulness": [args.from_rm["helpfulness"]]}
    variants = {"default": dict(base, ensemble=None)}
    for share in args.pair_shares:
        pair = rm_pair(os.path.join(args.out, "rm", f"pairs_{share:g}"))
        variants[f"pairs_{share:g}"] = {k: [v] for k, v in pair.items()} | dict(ensemble=None)
    if args.small_dim:
        variants["small"] = {k: [v] for k, v in rm_pair(os.path.join(args.out, "rm", "small")).items()} \
            | dict(ensemble=None)
    if args.ensemble_k > 1:
        members = [rm_pair(os.path.join(args.out, "rm", f"seed_{k}")) for k in range(1, args.ensemble_k)]
        for how in ("mean", "min"):
            variants[f"ensemble_{how}"] = {name: base[name] + [m[name] for m in members]
                                           for name in ("safety", "helpfulness")} | dict(ensemble=how)
    return variants


def rm_jobs(args):
    """train_rm.py runs for the RM variants (and the small base and SFT models they start from)."""
    py, jobs, src = "train_rm.py", [], args.from_dir
    world_seed = str(args.from_seed)
    common = ["--preset", args.preset, "--world-seed", world_seed, "--device", args.device, *args.rm_flags]
    for share in args.pair_shares:
        folder = os.path.join(args.out, "rm", f"pairs_{share:g}")
        for objective, sub in (("safety", "safety"), ("helpfulness", "helpful")):
            n = max(1, round(share * args.n_pairs[objective]))
            jobs.append((f"rm_pairs_{share:g}_{sub}", os.path.join(folder, sub),
                         [py, "--objective", objective, "--init", os.path.join(src, "sft", "model.pt"), "--seed",
                          world_seed, "--max-train-pairs", str(n), "--out", os.path.join(folder, sub)] + common, []))
    if args.small_dim:
        small = os.path.join(args.out, "small")
        base, sft = os.path.join(small, "base"), os.path.join(small, "sft")
        jobs.append(("small_base", base, ["train_sft.py", "--stage", "base", "--preset", args.preset, "--seed",
                                          world_seed, "--dim", str(args.small_dim), "--n-layers",
                                          str(args.small_layers), "--n-heads", "2", "--n-kv-heads", "1",
                                          "--device", args.device, "--out", base, *args.sft_flags], []))
        jobs.append(("small_sft", sft, ["train_sft.py", "--stage", "sft", "--preset", args.preset, "--seed",
                                        world_seed, "--init", os.path.join(base, "model.pt"), "--device",
                                        args.device, "--out", sft, *args.sft_flags], [base]))
        folder = os.path.join(args.out, "rm", "small")
        for objective, sub in (("safety", "safety"), ("helpfulness", "helpful")):
            jobs.append((f"rm_small_{sub}", os.path.join(folder, sub),
                         [py, "--objective", objective, "--init", os.path.join(sft, "model.pt"), "--seed", world_seed,
                          "--out", os.path.join(folder, sub)] + common, [sft]))
    for k in range(1, args.ensemble_k):
        folder = os.path.join(args.out, "rm", f"seed_{k}")
        for objective, sub in (("safety", "safety"), ("helpfulness", "helpful")):
            jobs.append((f"rm_seed_{k}_{sub}", os.path.join(folder, sub),
                         [py, "--objective", objective, "--init", os.path.join(src, "sft", "model.pt"), "--seed",
                          str(args.from_seed + k), "--out", os.path.join(folder, sub)] + common, []))
    return jobs


def ppo_argv(args, rms, out, *extra):
    return ["train_ppo.py", "--preset", args.preset, "--init", os.path.join(args.from_dir, "sft", "model.pt"),
            "--rm-safety", *rms["safety"], "--rm-helpful", *rms["helpfulness"], "--world-seed", str(args.from_seed),
            "--device", args.device, "--out", out, *extra, *args.ppo_flags]


def rl_runs(args, variants):
    """{run name: (folder, argv, needs, rms)} of the long, weakly KL-penalised PPO runs of part 1 (and 3)."""
    long = ["--beta", str(args.rl_beta), "--iterations", str(args.rl_iterations), "--eval-prompts", "0",
            "--keep-every", str(args.rl_keep_every)]
    runs = {"default": variants["default"]}
    if args.rl_ensemble and f"ensemble_{args.rl_ensemble}" in variants:
        runs[f"ensemble_{args.rl_ensemble}"] = variants[f"ensemble_{args.rl_ensemble}"]
    out = {}
    for name, rms in runs.items():
        folder = os.path.join(args.out, "ppo", name)
        ensemble = ["--ensemble", rms["ensemble"]] if rms["ensemble"] else []
        needs = [os.path.dirname(p) for p in rms["safety"][1:] + rms["helpfulness"][1:]]
        out[name] = (folder, ppo_argv(args, rms, folder, *long, *ensemble), needs, rms)
    return out


def constrained_runs(args):
    """{(reward, seed): (folder, argv)}: PPO at the preset's budget with each --reward, on --from's models."""
    rms = {k: [v] for k, v in args.from_rm.items()}
    out = {}
    for seed in args.seeds:
        for name in REWARDS:
            folder = os.path.join(args.out, "constrained", f"seed{seed}", name)
            extra = ["--reward", name, "--seed", str(seed), "--eval-prompts", str(args.constrained_eval_prompts)]
            if name == "lagrangian":
                extra += ["--cost-threshold", str(args.cost_threshold), "--lambda-lr", str(args.lambda_lr)]
            out[name, seed] = (folder, ppo_argv(args, rms, folder, *extra))
    return out


# ---------------------------------------------------------------------------------------------- best-of-n
def bon_examples(seed, n):
    """About n validation prompts of the world, every k-th (spread over its kinds, attacks and categories): the
    prompts evaluate.py --limit n answers, so best-of-n and the PPO checkpoints are judged on the same ones."""
    examples = world.build_world(seed).validation
    return examples[::max(1, math.ceil(len(examples) / n))]


def bon_samples(args, examples):
    """--samples responses per prompt from the SFT model at temperature 1 (cached in OUT/bon/samples.json) and
    their gold rewards: (texts (P, N) list, finished (P, N), gold (P, N) array)."""
    path = os.path.join(args.out, "bon", "samples.json")
    if os.path.exists(path):
        print(f"== bon: reusing {path}")
        with open(path) as f:
            cached = json.load(f)
    else:
        start = time.time()
        policy, tok, _ = loaders.load_policy(os.path.join(args.from_dir, "sft", "model.pt"), args.device_obj)
        policy.eval()
        generator = torch.Generator(device=args.device_obj).manual_seed(args.from_seed)
        conversations = [ex.messages for ex in examples for _ in range(args.samples)]
        answers = respond(policy, tok, conversations, args.max_new_tokens, temperature=1.0, batch_size=256,
                          generator=generator, desc="best-of-n samples")
        texts = [a.text or "" for a in answers]
        cached = dict(texts=[texts[i:i + args.samples] for i in range(0, len(texts), args.samples)],
                      finished=[[bool(a.finished) for a in answers[i:i + args.samples]]
                                for i in range(0, len(answers), args.samples)])
        atomic_json(path, cached)
        print(f"== bon: {len(texts)} samples of {len(examples)} prompts in {time.time() - start:.0f} s", flush=True)
    gold = np.array([[judge.gold_reward(ex, judge.judge(ex, t)) for t in row]
                     for ex, row in zip(examples, cached["texts"])])
    return cached["texts"], np.array(cached["finished"]), gold


def proxy_reward(args, rms, examples, responses):
    """R_c (the llama2 gate) of each (example, response) under one RM variant (rm_variants' form): (N,) array."""
    models = {k: [reward.load_reward_model(p, args.device_obj) for p in paths] if len(paths) > 1
              else reward.load_reward_model(paths[0], args.device_obj)
              for k, paths in rms.items() if k != "ensemble"}
    safety = torch.tensor([world.is_safety(ex) for ex in examples])
    combined, _ = reward.combined_reward(models, [ex.messages for ex in examples], responses, safety, "llama2",
                                         batch_size=256, ensemble=rms["ensemble"] or "mean")
    return combined.double().numpy()


def bon_proxy(args, name, rms, examples, texts):
    """R_c (llama2 gate) of every sample under one RM variant, (P, N), cached in OUT/bon/proxy_<name>.json."""
    path = os.path.join(args.out, "bon", f"proxy_{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return np.array(json.load(f))
    start = time.time()
    flat_examples = [ex for ex, row in zip(examples, texts) for _ in row]
    proxy = proxy_reward(args, rms, flat_examples, [t for row in texts for t in row]).reshape(len(texts), -1)
    atomic_json(path, proxy.tolist())
    print(f"== bon: scored with the {name} reward models in {time.time() - start:.0f} s", flush=True)
    return proxy


def bon_study(args, proxy, gold):
    """The best-of-n curve of one proxy, its fits and gold peak, with bootstrap intervals over prompts."""
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= proxy.shape[1]]
    d = [math.sqrt(bon_kl(n)) for n in ns]
    curve = bon_curve(proxy, gold, ns)
    picks = [best_of_n(proxy, gold, n) for n in ns]
    out = dict(n=ns, kl=[bon_kl(n) for n in ns], d=d, n_prompts=len(proxy), **curve,
               proxy_ci=[judge.mean_interval(list(p)) for p, _ in picks],
               gold_ci=[judge.mean_interval(list(g)) for _, g in picks],
               proxy_fit=fit_bon(d, curve["proxy_gain"]), gold_fit=fit_bon(d, curve["gold_gain"]))
    out["gold_peak_d"] = bon_peak(*out["gold_fit"])
    rng = np.random.default_rng(0)
    boot = dict(alpha=[], beta=[], peak=[])
    for _ in range(args.bootstrap):
        rows = rng.integers(0, len(proxy), len(proxy))
        alpha, beta = fit_bon(d, bon_curve(proxy[rows], gold[rows], ns)["gold_gain"])
        boot["alpha"].append(alpha), boot["beta"].append(beta), boot["peak"].append(bon_peak(alpha, beta))
    for k, values in boot.items():
        out[f"gold_{k}_ci"] = judge.percentile_interval(values)
    return out


# ---------------------------------------------------------------------------------------------- RL curves
def kl_rows(folder):
    """The rows of a PPO run's metrics.jsonl that log its KL to the reference."""
    return [r for _, r in data.jsonl_lines(os.path.join(folder, "metrics.jsonl")) if "kl" in r]


def evaluate_kept(args, folder):
    """evaluate.py on the SFT model and every policy_<iteration>.pt a long PPO run kept: the validation prompts of
    best-of-n, one answer each at temperature 1, with KL to the SFT model; into folder/eval_validation (reused
    while no checkpoint is newer). Returns its generations, {checkpoint name: [rows]}."""
    kept = sorted(f for f in os.listdir(folder) if f.startswith("policy_") and f.endswith(".pt"))
    out = os.path.join(folder, "eval_validation")
    generations = os.path.join(out, "generations.jsonl")
    newest = max(os.path.getmtime(os.path.join(folder, f)) for f in kept)
    if not (os.path.exists(generations) and os.path.getmtime(generations) > newest):
        sft = os.path.join(args.from_dir, "sft", "model.pt")
        checkpoints = [f"it{int(f[7:-3]):04d}={os.path.join(folder, f)}" for f in kept]
        print(f"== rl: evaluating {len(kept)} checkpoints of {folder} on the validation split", flush=True)
        subprocess.run([sys.executable, "evaluate.py", "--checkpoints", f"it0000={sft}", *checkpoints, "--split",
                        "validation", "--temperature", "1", "--limit", str(args.prompts), "--sft", sft, "--seed",
                        str(args.from_seed), "--device", args.device, "--no-plots", "--out", out, "--overwrite",
                        *args.eval_flags], cwd=HERE, check=True, stdout=subprocess.DEVNULL,
                       env=ONE_THREAD)
    rows = {}
    with open(generations) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["stage"], []).append(row)
    return rows


def rl_study(args, folder, rms):
    """PPO's gold-against-proxy curve from its kept checkpoints (and the SFT model, iteration 0): per checkpoint
    d = sqrt(mean per-sequence KL to the SFT model, sampled), the mean proxy R_c under the run's own reward models
    and the mean gold reward, each with its interval; fitted with Gao et al.'s RL form to the gain over the SFT
    model."""
    examples = {ex.id: ex for ex in world.build_world(args.from_seed).validation}
    curve = dict(iteration=[], kl=[], d=[], proxy=[], gold=[], proxy_ci=[], gold_ci=[], n=[])
    for name, rows in sorted(evaluate_kept(args, folder).items()):
        batch = [examples[r["id"]] for r in rows]
        responses = [r["response"] for r in rows]
        proxy = proxy_reward(args, rms, batch, responses)
        gold = [judge.gold_reward(ex, judge.judge(ex, text)) for ex, text in zip(batch, responses)]
        kl = float(np.mean([r["kl_to_sft"] for r in rows]))
        for key, value in (("iteration", int(name[2:])), ("kl", kl), ("d", math.sqrt(max(kl, 0.0))),
                           ("proxy", float(proxy.mean())), ("gold", float(np.mean(gold))),
                           ("proxy_ci", judge.mean_interval(list(proxy))), ("gold_ci", judge.mean_interval(gold)),
                           ("n", len(rows))):
            curve[key].append(value)
    d, proxy, gold = curve["d"], curve["proxy"], curve["gold"]
    curve.update(proxy_fit=fit_rl(d, [p - proxy[0] for p in proxy]), gold_fit=fit_rl(d, [g - gold[0] for g in gold]))
    curve["gold_peak_d"] = rl_peak(*curve["gold_fit"])
    best = int(np.argmax(gold))
    curve.update(gold_best_iteration=curve["iteration"][best], gold_best=gold[best], gold_best_d=d[best],
                 gold_best_ci=curve["gold_ci"][best])
    return curve


# ---------------------------------------------------------------------------------------------- tables and plots
def atomic_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def fmt_ci(x, ci, digits=3):
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_peak(d):
    """A fitted peak: none without curvature, flagged where it lies far beyond any d a run reaches (d < 10 here)."""
    return "none (beta <= 0)" if not math.isfinite(d) else f"{d:.1e} (beyond the data)" if d > 100 else f"{d:.2f}"


def bon_tables(bon, rm_accuracy):
    lines = ["### Best-of-n: gold against proxy", "",
             f"Mean over {next(iter(bon.values()))['n_prompts']} validation prompts of the best-of-n pick's proxy "
             "reward R_c and gold reward, 95% interval (normal, over prompts); d = sqrt(log n - (n-1)/n).", ""]
    for name, b in bon.items():
        lines += [f"**{name}** (held-out RM accuracy: safety {rm_accuracy[name]['safety']}, helpfulness "
                  f"{rm_accuracy[name]['helpfulness']})", "", "| n | d | proxy R_c | gold reward |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {d:.2f} | {fmt_ci(p, pc)} | {fmt_ci(g, gc)} |"
                  for n, d, p, pc, g, gc in zip(b["n"], b["d"], b["proxy"], b["proxy_ci"], b["gold"], b["gold_ci"])]
        lines.append("")
    lines += ["### Best-of-n fits, R(d) - R(0) = d (alpha - beta d)", "",
              "Intervals: 2.5 and 97.5 percentiles over bootstrap resamples of the prompts.", "",
              "| reward models | proxy alpha | proxy beta | gold alpha | gold beta | gold peak d* = alpha/2beta |",
              "|---|---|---|---|---|---|"]
    for name, b in bon.items():
        (pa, pb), (ga, gb) = b["proxy_fit"], b["gold_fit"]
        lines.append(f"| {name} | {pa:.3f} | {pb:.3f} | {fmt_ci(ga, b['gold_alpha_ci'])} | "
                     f"{fmt_ci(gb, b['gold_beta_ci'])} | {fmt_peak(b['gold_peak_d'])} "
                     f"[{b['gold_peak_ci'][0]:.2f}, {b['gold_peak_ci'][1]:.2f}] |")
    return lines + [""]


def rl_tables(rl):
    lines = ["### PPO: gold against proxy along training", ""]
    for name, r in rl.items():
        lines += [f"**{name}** reward models: each kept checkpoint answers the {r['n'][0]} validation prompts once at "
                  "temperature 1; means with 95% intervals (normal, over prompts); d = sqrt(mean per-sequence KL "
                  "to SFT).", "", "| iteration | KL | d | proxy R_c | gold reward |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {kl:.2f} | {d:.2f} | {fmt_ci(p, pc)} | {fmt_ci(g, gc)} |" for i, kl, d, p, pc, g, gc in
                  zip(r["iteration"], r["kl"], r["d"], r["proxy"], r["proxy_ci"], r["gold"], r["gold_ci"])]
        lines.append("")
    lines += ["### PPO fits, R(d) - R(0) = d (alpha - beta log d)", "",
              "| reward models | proxy alpha, beta | gold alpha, beta | gold peak d* = exp(alpha/beta - 1) | "
              "best gold checkpoint (iteration, d) |", "|---|---|---|---|---|"]
    for name, r in rl.items():
        (pa, pb), (ga, gb) = r["proxy_fit"], r["gold_fit"]
        lines.append(f"| {name} | {pa:.3f}, {pb:.3f} | {ga:.3f}, {gb:.3f} | {fmt_peak(r['gold_peak_d'])} | "
                     f"{fmt_ci(r['gold_best'], r['gold_best_ci'])} ({r['gold_best_iteration']}, "
                     f"{r['gold_best_d']:.2f}) |")
    return lines + [""]


CONSTRAINED_KEYS = ("violation_rate", "false_refusal_rate_plain", "false_refusal_rate_wrapped", "benign_accuracy")


def constrained_tables(metrics, lambdas):
    lines = ["### Constrained RLHF on the test split, over seeds", "",
             "Per PPO reward: the mean over seeds ± their standard deviation, the 95% Wilson interval of all seeds' "
             "prompts pooled, and the pooled n (report.py --aggregate); KL to SFT: mean ± sd over seeds.", "",
             "| PPO reward | violation rate | false refusals, plain | false refusals, wrapped | benign accuracy | "
             "KL to SFT | seeds |", "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        cells = [f"{m[k]:.3f} ± {m.get(k + '_sd', 0.0):.3f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}] "
                 f"n={m[k + '_n']}" for k in CONSTRAINED_KEYS]
        kl = f"{m['kl_to_sft']:.2f} ± {m.get('kl_to_sft_sd', 0.0):.2f}" if m.get("kl_to_sft") is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {kl} | {m.get('n_seeds', 1)} |")
    if lambdas:
        lines += ["", "Lagrange multiplier lambda (the value each iteration's rollout was scored with), per seed:", "",
                  "| seed | " + " | ".join(f"it {i}" for i in lambda_columns(lambdas)) + " |",
                  "|---|" + "---|" * len(lambda_columns(lambdas))]
        for seed, (steps, values, costs) in lambdas.items():
            lines.append(f"| {seed} | " + " | ".join(f"{values[steps.index(i)]:.3f}" for i in lambda_columns(lambdas))
                         + " |")
    return lines + [""]


def lambda_columns(lambdas):
    steps = next(iter(lambdas.values()))[0]
    return sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[3 * len(steps) // 4], steps[-1]})


def overopt_plots(args, bon, rl, lambdas):
    """bon_<variant>.png, rl_<run>.png and lambda.png in OUT; a printed note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("overopt.py: no plots (matplotlib is not installed: pip install matplotlib)")
        return []
    written = []

    def curve(name, x, proxy, gold, fits, form, title, origins=(None, None)):
        """origins: R(0) of proxy and gold when it is not the first point (best-of-n: the mean of every sample)."""
        fig, ax = plt.subplots(figsize=(5, 3.5))
        grid = np.linspace(0, max(x) * 1.05 + 1e-9, 100)
        for values, fit, origin, color, label in ((proxy, fits[0], origins[0], "tab:blue", "proxy R_c"),
                                                  (gold, fits[1], origins[1], "tab:orange", "gold")):
            ax.plot(x, np.asarray(values) - values[0] if form == "rl" else values, "o", color=color, ms=3,
                    label=label)
            (alpha, beta), base = fit, (0.0 if form == "rl" else origin)
            logs = np.log(np.where(grid > 0, grid, 1.0))
            ax.plot(grid, base + grid * (alpha - beta * (logs if form == "rl" else grid)), "-", color=color, lw=1)
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.set_ylabel("reward gain over the SFT model" if form == "rl" else "mean reward of the pick")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(args.out, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for variant, b in bon.items():
        curve(f"bon_{variant}", b["d"], b["proxy"], b["gold"], (b["proxy_fit"], b["gold_fit"]), "bon",
              f"best-of-n, {variant} reward models", (b["proxy"][0] - b["proxy_gain"][0],
                                                     b["gold"][0] - b["gold_gain"][0]))
    for run, r in rl.items():
        curve(f"rl_{run}", r["d"], r["proxy"], r["gold"], (r["proxy_fit"], r["gold_fit"]), "rl",
              f"PPO, {run} reward models, beta {args.rl_beta}")
    if lambdas:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for seed, (steps, values, _) in lambdas.items():
            ax.plot(steps, values, label=f"seed {seed}")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("lambda")
        ax.set_title(f"PPO-Lagrangian multiplier, cost threshold {args.cost_threshold}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "lambda.png"), dpi=110)
        plt.close(fig)
        written.append(os.path.join(args.out, "lambda.png"))
    return written


# ---------------------------------------------------------------------------------------------- arguments
def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--from", dest="from_dir", required=True, help="a pipeline seed folder holding base/, sft/, "
                   "rm_safety/ and rm_helpful/ with model.pt (pipeline.sh --out DIR, or DIR/seed0 with --seeds)")
    p.add_argument("--out", required=True, help="output folder (tables, plots, every run of the study)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first (without it, finished work in "
                   "--out is reused and interrupted runs resume)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="bon: best-of-n (part 1 and "
                   "the ensembles of part 3); rl: the long PPO runs; constrained: part 2")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "1b"), help="the stage scripts' preset")
    p.add_argument("--jobs", type=runtime.positive_int, default=2, help="training runs at a time (one thread each)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    # best-of-n
    p.add_argument("--prompts", type=runtime.positive_int, default=330,
                   help="about this many validation prompts of the world (every k-th, all kinds; evaluate.py "
                   "--limit) for best-of-n and the PPO checkpoints")
    p.add_argument("--samples", type=runtime.positive_int, default=64, help="samples per prompt: best-of-n runs "
                   "n = 1, 2, 4, ... up to this")
    p.add_argument("--max-new-tokens", type=runtime.positive_int, default=64,
                   help="length cap of a best-of-n sample in tokens (the tiny preset's PPO cap)")
    p.add_argument("--bootstrap", type=runtime.nonnegative_int, default=200,
                   help="bootstrap resamples of the prompts for the fits' intervals (0: none)")
    # reward model variants
    p.add_argument("--pair-shares", type=float, nargs="*", default=[0.25, 0.5],
                   help="shares of the RMs' own training pairs for the less-data variants (train_rm.py "
                   "--max-train-pairs)")
    p.add_argument("--small-dim", type=runtime.nonnegative_int, default=64,
                   help="width of the smaller reward model's base model (0: no smaller RM)")
    p.add_argument("--small-layers", type=runtime.positive_int, default=2, help="its transformer blocks")
    p.add_argument("--ensemble-k", type=runtime.positive_int, default=3,
                   help="reward models per ensemble (the --from RM and k - 1 more seeds; 1: no ensembles)")
    # RL
    p.add_argument("--rl-iterations", type=runtime.positive_int, default=30, help="iterations of the long PPO runs")
    p.add_argument("--rl-keep-every", type=runtime.positive_int, default=3,
                   help="iterations between the kept PPO checkpoints that are evaluated (train_ppo.py --keep-every)")
    p.add_argument("--rl-beta", type=runtime.nonnegative_float, default=0.01,
                   help="KL coefficient of the long PPO runs (the tiny preset's is 0.1)")
    p.add_argument("--rl-ensemble", choices=("mean", "min", "none"), default="mean",
                   help="the ensemble a second long PPO run optimises (none: only the default RMs)")
    # constrained
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="PPO seeds of the constrained comparison")
    p.add_argument("--cost-threshold", type=float, default=-0.3,
                   help="PPO-Lagrangian threshold d on E[-r_s] (train_ppo.py --cost-threshold)")
    p.add_argument("--lambda-lr", type=runtime.nonnegative_float, default=0.1, help="train_ppo.py --lambda-lr")
    p.add_argument("--constrained-eval-prompts", type=int, default=-1,
                   help="validation prompts each constrained run judges at its end (-1: all; tuning reads these)")
    p.add_argument("--test-limit", type=runtime.nonnegative_int, default=0, help="about this many test prompts "
                   "(every k-th, all kinds; evaluate.py --limit) for the constrained runs (0: the whole split)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    # passed on
    for script, what in (("sft", "train_sft.py (the smaller model)"), ("rm", "train_rm.py"),
                         ("ppo", "train_ppo.py (every PPO run)"), ("eval", "evaluate.py (the constrained runs)")):
        p.add_argument(f"--{script}-flags", type=shlex.split, default=[], metavar="'FLAGS'",
                       help=f"extra flags for {what}, one quoted string, e.g. '--steps 40'; they come last and win")
    args = runtime.parse_args(p, {name: {} for name in ("tiny", "small", "1b")}, argv)
    if any(not 0 < s < 1 for s in args.pair_shares):
        p.error(f"--pair-shares must lie strictly between 0 and 1, got {args.pair_shares}")
    return args


def check_inputs(args):
    """Everything read before anything is written: the --from folder's checkpoints, its seed, the RMs' pairs."""
    needed = {k: os.path.join(args.from_dir, k, "model.pt") for k in ("base", "sft", "rm_safety", "rm_helpful")}
    missing = [p for p in needed.values() if not os.path.isfile(p)]
    if missing:
        raise runtime.UserError(f"--from {args.from_dir}: missing {', '.join(missing)} (run pipeline.sh first)")
    with open(os.path.join(args.from_dir, "rm_safety", "config.json")) as f:
        rm_config = json.load(f)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise runtime.UserError(f"--out {args.out} is a file, not a folder")
    args.from_shown = args.from_dir  # as given, for overopt.md
    args.from_dir, args.out = os.path.abspath(args.from_dir), os.path.abspath(args.out)
    args.from_rm = {"safety": os.path.join(args.from_dir, "rm_safety", "model.pt"),
                    "helpfulness": os.path.join(args.from_dir, "rm_helpful", "model.pt")}
    args.from_seed = rm_config.get("world_seed") if rm_config.get("world_seed") is not None else rm_config["seed"]
    args.rl_ensemble = None if args.rl_ensemble == "none" else args.rl_ensemble
    args.device_obj = runtime.pick_device(args.device)
    w = world.build_world(args.from_seed)
    args.n_pairs = {objective: len(judge.labelled_pairs(w, objective, rm_config["label_noise"], args.from_seed,
                                                        "train", rm_config["styles_per_prompt"]))
                    for objective in ("safety", "helpfulness")} if args.pair_shares else {}


def rm_accuracies(variants):
    """Held-out accuracy (eval.json) of each variant's reward models: 'a' or the members' 'a/b/c'."""
    def acc(path):
        with open(os.path.join(os.path.dirname(path), "eval.json")) as f:
            return f"{json.load(f)['accuracy']:.3f}"
    return {name: {k: "/".join(acc(p) for p in v[k]) for k in ("safety", "helpfulness")}
            for name, v in variants.items()}


def main(args):
    check_inputs(args)
    if args.overwrite and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    timings, results = {}, dict(config={k: v for k, v in vars(args).items() if k != "device_obj"})
    variants = rm_variants(args)

    # ------------------------------------------------------------------ training: RM variants, PPO runs
    jobs = rm_jobs(args) if "bon" in args.parts or "rl" in args.parts else []
    if "rl" in args.parts:
        jobs += [(f"ppo_{name}", folder, argv, needs) for name, (folder, argv, needs, _) in
                 rl_runs(args, variants).items()]
    # the longest chains first (the PPO runs, the smaller model's base -> SFT -> RMs), the rest as cores free up
    first = ("ppo_default", "small_base", "rm_seed_", "ppo_ensemble", "small_sft")
    jobs.sort(key=lambda job: next((i for i, p in enumerate(first) if job[0].startswith(p)), len(first)))
    if "constrained" in args.parts:
        jobs += [(f"constrained_{name}_seed{seed}", folder, argv, [])
                 for (name, seed), (folder, argv) in constrained_runs(args).items()]
    start = time.time()
    run_jobs(jobs, args.out, args.jobs)
    timings["training"] = time.time() - start

    # ------------------------------------------------------------------ part 1 and 3: best-of-n
    bon = {}
    if "bon" in args.parts:
        start = time.time()
        examples = bon_examples(args.from_seed, args.prompts)
        texts, _, gold = bon_samples(args, examples)
        for name, rms in variants.items():
            bon[name] = bon_study(args, bon_proxy(args, name, rms, examples, texts), gold)
        timings["bon"] = time.time() - start
        results["bon"], results["rm_accuracy"] = bon, rm_accuracies(variants)

    # ------------------------------------------------------------------ part 1 and 3: PPO curves
    rl = {}
    if "rl" in args.parts:
        start = time.time()
        rl = {name: rl_study(args, folder, rms) for name, (folder, _, _, rms) in rl_runs(args, variants).items()}
        timings["rl_eval"] = time.time() - start
    results["rl"] = rl

    # ------------------------------------------------------------------ part 2: evaluation on the test split
    constrained, lambdas = {}, {}
    if "constrained" in args.parts:
        start = time.time()
        constrained, lambdas = evaluate_constrained(args)
        timings["constrained_eval"] = time.time() - start
    results.update(constrained=constrained, lambdas=lambdas, timings_s=timings)

    # ------------------------------------------------------------------ tables and plots
    lines = ["# Reward over-optimisation and constrained RLHF", "",
             f"From {args.from_shown}; preset {args.preset}.", ""]
    if bon:
        lines += bon_tables(bon, results["rm_accuracy"])
    if rl:
        lines += rl_tables(rl)
    if constrained:
        lines += constrained_tables(constrained, lambdas)
    lines += ["Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()), ""]
    with open(os.path.join(args.out, "overopt.md"), "w") as f:
        f.write("\n".join(lines))
    atomic_json(os.path.join(args.out, "overopt.json"), results)
    print("\n".join(lines))
    written = [] if args.no_plots else overopt_plots(args, bon, rl, lambdas)
    print(f"overopt.py: wrote {os.path.join(args.out, 'overopt.md')}, overopt.json"
          + "".join(f", {os.path.basename(p)}" for p in written))
    return results


def evaluate_constrained(args):
    """Each seed's four PPO policies (and the SFT model) on the test split with evaluate.py, then --aggregate
    over seeds; returns ({reward: aggregate metrics}, {seed: (iterations, lambdas, costs)})."""
    runs = constrained_runs(args)
    base = os.path.join(args.out, "constrained")
    folders = []
    for seed in args.seeds:
        folder = os.path.join(base, f"eval_seed{seed}")
        folders.append(folder)
        checkpoints = [f"{name}={runs[name, seed][0]}/model.pt" for name in REWARDS]
        newest = max(os.path.getmtime(f"{runs[name, seed][0]}/model.pt") for name in REWARDS)
        metrics = os.path.join(folder, "metrics.json")
        if os.path.exists(metrics) and os.path.getmtime(metrics) > newest:
            print(f"== constrained: reusing {metrics}")
            continue
        sft = os.path.join(args.from_dir, "sft", "model.pt")
        argv = ["evaluate.py", "--checkpoints", f"sft={sft}", *checkpoints, "--baseline", "sft", "--sft", sft,
                "--rm-safety", args.from_rm["safety"], "--rm-helpful", args.from_rm["helpfulness"], "--seed",
                str(args.from_seed), "--device", args.device, "--no-plots", "--out", folder, "--overwrite",
                *(["--limit", str(args.test_limit)] if args.test_limit else []), *args.eval_flags]
        print(f"== constrained: evaluating seed {seed} on the test split", flush=True)
        subprocess.run([sys.executable] + argv, cwd=HERE, check=True, stdout=subprocess.DEVNULL,
                       env=ONE_THREAD)
    aggregate_folder = folders[0]
    if len(folders) > 1:
        aggregate_folder = os.path.join(base, "eval")
        subprocess.run([sys.executable, "report.py", "--aggregate", *folders, "--out", aggregate_folder,
                        "--overwrite", "--no-plots"], cwd=HERE, check=True, stdout=subprocess.DEVNULL,
                       env=ONE_THREAD)
    with open(os.path.join(aggregate_folder, "metrics.json")) as f:
        aggregate = json.load(f)
    lambdas = {}
    for seed in args.seeds:
        rows = kl_rows(runs["lagrangian", seed][0])
        lambdas[seed] = ([r["step"] for r in rows], [r["lambda"] for r in rows], [r["cost"] for r in rows])
    return aggregate, lambdas


if __name__ == "__main__":
    runtime.command(main, get_args)
