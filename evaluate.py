"""Evaluation: answer a world split (by default the held-out test split) and grade every answer with the gold judge.

For each checkpoint (Llama 2, sections 4.4 and 3.4), every rate with its 95% Wilson interval and its count:
- safety-violation rate on harmful prompts, overall, per risk category and per red-team attack vector (the
  vector held out of all training is marked *);
- false-refusal rate on borderline prompts (benign requests that sound unsafe), asked plainly and inside an attack
  wrapper, and on benign prompts, plainly and wrapped;
- accuracy on benign prompts; the no-answer rate (empty or degenerate answers); confused refusals (refusals of
  harmful prompts that name another request, not this one);
- mean safety and helpfulness reward-model scores sigmoid(r) of the responses (--rm-safety, --rm-helpful);
- KL to the SFT model (--sft): the mean over prompts of sum_t [log pi(y_t | x, y_<t) - log pi_sft(y_t | x, y_<t)]
  on the checkpoint's own responses y. With sampling (--temperature 1) this is a Monte-Carlo estimate of
  KL(pi || pi_sft); with greedy decoding (the default) it is the log-ratio on the most likely answer;
- win rate against a baseline checkpoint (--baseline, default the first one) by the gold judge: per prompt, the
  response with the higher gold score wins (safety first on harmful prompts, helpfulness first elsewhere, as the
  synthetic annotator ranks), ties count half; its interval is Wilson's over the prompts, a tie half a win.

--split picks the world split: test (the default; only evaluate.py reads it) or validation (what every tuning
choice reads). Writes OUT/metrics.json (one object per checkpoint, keyed by its name: every key of
judge.gold_metrics, each rate x with x_ci = [low, high] and its count x_n, and rm_safety_mean,
rm_helpfulness_mean, kl_to_sft, win_rate, win_rate_ci, n_prompts, held_out_attack, split), OUT/metrics.md (cells
"27.4 [24.4-30.6]": a rate and its interval, in percent; the printed table shows "27.4±3.2", ± the larger
half-width; below both, the n behind each rate), OUT/generations.jsonl (every prompt, response, judge label and
RM score) and, when matplotlib is installed, plots: the violation vs false-refusal trade-off per stage,
reward vs KL from the training logs, and the RM score distributions. The last line printed names every file
written and every plot not written, with the reason. An OUT that already holds an evaluation (or a training run)
is an error unless --overwrite; every input is read before anything is written.

Real checkpoints (a .gguf, a HF or Meta folder, or a .pt whose tokenizer is a real model's, e.g. SmolLM2 fine-tuned
by train_sft.py; or any checkpoint with --benchmarks-only): the world's prompts, judge and reward models do not
apply, so only the public benchmarks run (benchmarks.py: AdvBench, HarmBench, XSTest, TruthfulQA MC, BOLD), and
--benchmarks DATA_DIR is required; --sft, --rm-safety, --rm-helpful, --prompts and --limit are errors, and so is a
mix of world and real checkpoints without --benchmarks-only. OUT/metrics.json holds per checkpoint "benchmarks"
(each rate x with x_ci, its 95% Wilson interval, and x_n; MC2 and BOLD's per-group means with a mean's normal
interval; n_* integer counts); OUT/metrics.md and the printed table show them; OUT/benchmark_generations.jsonl
holds every benchmark answer (stage, benchmark, prompt, response, refusal or BOLD's group and sentiment), as it
does beside a world evaluation with --benchmarks; OUT/benchmark_tradeoff.png plots AdvBench refusals against XSTest
false refusals with their intervals. An OUT that is a checkpoint's own folder is an error unless --overwrite.

    python evaluate.py --checkpoints smollm2=.gl/SmolLM2-135M-Instruct.Q4_1.gguf --benchmarks ../shared/data \\
        --benchmark-limit 100 --out out/eval_smollm2

Your own prompts and answers, one JSON object per line:
  messages  [{"role": ..., "content": ...}, ...] ending with a user turn   } one of the two
  prompt    the user's text, a one-turn conversation                       }
  kind      harmful | benign | borderline (a benign request that sounds unsafe)               (required)
  category  a risk category (harmful) or world fact type (benign: capital, symbol, ...)      (default unspecified)
  attack    the red-team vector the prompt uses                                               (default direct)
  answer    the gold answer keyword of a benign or borderline prompt: accuracy counts only prompts with one
  subject   the request itself (harmful, borderline) or the fact's subject (benign): lets the judge see bare
            instructions that name the request, and a refusal that names another request (confused)
  id        a string or number                                                                (default FILE:LINE)
  response  the answer to grade                                                               (--responses only)
Other fields are kept as they are. A malformed line, a missing or wrong-typed field or an unknown kind is an
error naming FILE:LINE and the field, and nothing is written.
- --checkpoints ... --prompts FILE --out DIR generates each checkpoint's answers to the file's prompts and grades
  them (with --sft, --rm-safety, --rm-helpful, --baseline as above): DIR/metrics.json, DIR/metrics.md and
  DIR/generations.jsonl.
- --responses FILE --out DIR grades the answers in the file, no model needed: DIR/graded.jsonl (each input line
  with the judge's refused, unsafe, correct, no_answer, confused, gold_safety and gold_helpfulness added;
  fields of those names are replaced), DIR/metrics.json (keyed "responses") and DIR/metrics.md.
Their rates, each with _ci and _n: refusal_rate over all prompts and refusal_rate_by_kind per kind;
violation_rate (also _by_category, _by_attack) over harmful prompts; accuracy over the prompts with an answer;
no_answer_rate over all prompts; confused_refusal_rate over the refusals of harmful prompts.

--aggregate DIR [DIR ...] --out DIR combines the metrics.json of several seeds' evaluations of the same
checkpoints: per stage, every number x becomes its mean over the seeds, with x_sd (sample standard deviation),
x_min and x_max; each rate also gets x_ci, the 95% Wilson interval over all seeds' prompts pooled (its count
rate * x_n summed over seeds), and x_n, that pooled count (gold scores: no interval); n_* counts are summed;
n_seeds. Labels (split, held_out_attack) must agree between the seeds. Writes
DIR/metrics.json, DIR/metrics.md (cells "mean ± sd [pooled interval]") and the trade-off plot with sd error bars.

Other modes: --audit runs the pre-training data audit (Llama 2, section 4.1) on a corpus; --chat CHECKPOINT
opens an interactive chat in the terminal, streaming tokens, with the safety RM's score after each answer.

    python evaluate.py --checkpoints sft=out/sft/model.pt ppo=out/ppo/model.pt --sft out/sft/model.pt \\
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/eval
    python evaluate.py --checkpoints ppo=out/ppo/model.pt --prompts redteam.jsonl --out out/redteam
    python evaluate.py --responses answers.jsonl --out out/graded
    python evaluate.py --aggregate out/seed0/eval out/seed1/eval out/seed2/eval --out out/eval --overwrite
    python evaluate.py --audit
    python evaluate.py --chat out/ppo/model.pt --rm-safety out/rm_safety/model.pt
"""
import json
import math
import os
import statistics
import sys
import textwrap
import warnings

import torch

import data
import judge
import loaders
import reward
import runtime
import world
from judge import gold_metrics, win_rate
from model import KVCache, load_checkpoint, respond, sample_next, token_logprobs
from tokenizer import SPECIAL_TOKENS, split_turns


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def stream_tokens(model, prompt_ids, max_new_tokens, eos_id, temperature=0.0, top_p=1.0, generator=None):
    """Yield the continuation of one prompt token by token (for the chat); the same tokens as generate()."""
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    if max_new_tokens <= 0:
        return
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt_ids], device=device), None, cache, last_only=True)[:, -1]  # (1, V)
    for _ in range(max_new_tokens):
        next_tok = sample_next(logits.float(), temperature, top_p=top_p, generator=generator)  # (1,)
        yield int(next_tok)
        if int(next_tok) == eos_id:
            return
        logits = model(next_tok[:, None], None, cache)[:, -1]


# ---------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def sequence_logprobs(model, pairs, batch_size=64):
    """sum_t log p(y_t | x, y_<t) per (prompt ids x, response ids y) pair: float tensor (N,)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [p + r for p, r in pairs]
    if max(map(len, rows), default=0) > model.config.max_seq_len:
        raise ValueError(f"a prompt + response of {max(map(len, rows))} tokens exceeds this model's "
                         f"max_seq_len {model.config.max_seq_len}")
    out = torch.zeros(len(pairs))
    for start in range(0, len(rows), batch_size):
        chunk = range(start, min(start + batch_size, len(rows)))
        batch = data.collate([rows[i] for i in chunk], pad_id=0)  # pads are masked out: any id will do
        tokens, attention_mask = batch["tokens"].to(device), batch["attention_mask"].to(device)
        logp = token_logprobs(model, tokens, attention_mask)                    # (B, T-1)
        response_mask = torch.zeros_like(logp)
        for b, i in enumerate(chunk):
            n_prompt, n_response = len(pairs[i][0]), len(pairs[i][1])
            response_mask[b, n_prompt - 1:n_prompt - 1 + n_response] = 1      # logp[t] scores token t + 1
        out[start:start + len(chunk)] = (logp * response_mask).sum(1).float().cpu()
    return out


def kl_to_reference(model, ref_model, pairs, batch_size=64):
    """Per-sequence log-ratio sum_t [log pi(y_t) - log pi_ref(y_t)] on the pairs (N,): the KL of Llama 2's
    penalty (section 3.2.3) summed over the response."""
    return sequence_logprobs(model, pairs, batch_size) - sequence_logprobs(ref_model, pairs, batch_size)


def _mean_or_none(values):
    return None if values is None or len(values) == 0 else float(torch.as_tensor(values).float().mean())


def _rate_or_none(flags):
    """(rate, 95% Wilson interval, count) of True among flags; the rate None when there are none."""
    k, n = sum(flags), len(flags)
    return (k / n if n else None), judge.wilson(k, n), n


def file_metrics(examples, responses):
    """The rates of a prompt file's answers (see the module docstring), gold_metrics' where it has them: each rate
    x with x_ci (95% Wilson interval) and x_n (its count); n_prompts and n_<kind> count the prompts."""
    gold = gold_metrics(examples, responses)
    judgements = [judge.judge(ex, r) for ex, r in zip(examples, responses)]
    out = {}
    out["refusal_rate"], out["refusal_rate_ci"], out["refusal_rate_n"] = _rate_or_none([j.refused for j in judgements])
    by_kind = {"harmful": "harmful_refusal_rate", "benign": "benign_refusal_rate", "borderline": "false_refusal_rate"}
    kinds = [k for k in KINDS if gold[f"n_{k}"]]
    for suffix in ("", "_ci", "_n"):
        out[f"refusal_rate_by_kind{suffix}"] = {k: gold[by_kind[k] + suffix] for k in kinds}
    for name in ("violation_rate", "violation_rate_by_category", "violation_rate_by_attack"):
        out.update({name + suffix: gold[name + suffix] for suffix in ("", "_ci", "_n")})
    # accuracy over the prompts that carry a gold answer: without one, no answer can be judged correct
    out["accuracy"], out["accuracy_ci"], out["accuracy_n"] = _rate_or_none(
        [j.correct for ex, j in zip(examples, judgements) if ex.answer])
    for name in ("no_answer_rate", "confused_refusal_rate"):
        out.update({name + suffix: gold[name + suffix] for suffix in ("", "_ci", "_n")})
    out.update({f"n_{k}": gold[f"n_{k}"] for k in ("prompts", *KINDS)})
    return out


def evaluate_checkpoint(name, model, tok, examples, args, baseline_texts, sft, reward_models, benchmarks,
                        grade=gold_metrics, about=None, bench_generations=None):
    """Generate on the examples and grade: (metrics, response texts, one generations.jsonl row per example); with
    benchmarks, m["benchmarks"] and one bench_generations row per benchmark answer.

    baseline_texts: the responses of args.baseline (None: this checkpoint is the baseline); sft: (model, tok) or
    None; reward_models: {"safety": (model, tok) or None, "helpfulness": ...}; benchmarks: that module or None;
    grade: gold_metrics (a world split) or file_metrics (a prompt file); about: keys naming the prompts.
    """
    too_long = sum(len(tok.encode_prompt(ex.messages)) >= model.config.max_seq_len for ex in examples)
    if too_long:  # an unanswered prompt would be graded as a harmless non-answer: refuse instead
        raise runtime.UserError(f"{name}: {too_long} of {len(examples)} prompts leave no room to answer in its "
                                f"{model.config.max_seq_len}-token context")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    answers = respond(model, tok, [ex.messages for ex in examples], args.max_new_tokens, args.temperature,
                      args.top_p, args.batch_size, generator, desc=name)
    texts, pairs = [a.text for a in answers], [(a.prompt, a.tokens) for a in answers]
    m = {**grade(examples, texts), **(about or {})}
    conversations = [ex.messages for ex in examples]
    safety_p = reward.probabilities(reward_models["safety"], conversations, texts)
    helpful_p = reward.probabilities(reward_models["helpfulness"], conversations, texts)
    m["rm_safety_mean"], m["rm_helpfulness_mean"] = _mean_or_none(safety_p), _mean_or_none(helpful_p)
    kl = None if sft is None else kl_to_reference(model, sft[0], pairs, args.batch_size)
    m["kl_to_sft"] = _mean_or_none(kl)
    m.update(win_rate(examples, texts, texts if baseline_texts is None else baseline_texts))
    # Wilson over prompts with a tie as half a win (k = wins + ties / 2 of n). A prompt's outcome is 0, 1/2 or 1,
    # whose variance is at most that of a 0/1 outcome with the same mean: if anything, the interval is too wide.
    m["win_rate_ci"], m["win_rate_n"] = judge.wilson(m["win_rate"] * len(examples), len(examples)), len(examples)
    m["win_rate_baseline"] = args.baseline
    if benchmarks is not None:
        m["benchmarks"] = run_benchmarks(benchmarks, name, model, tok, args, bench_generations)
    generations = [dict(stage=name, id=ex.id, kind=ex.kind, category=ex.category, attack=ex.attack,
                        held_out=ex.kind == "harmful" and ex.attack == world.HELD_OUT_ATTACK and ex.split == "test",
                        prompt=ex.prompt, messages=ex.messages, response=r, **vars(judge.judge(ex, r)),
                        rm_safety=None if safety_p is None else float(safety_p[i]),
                        rm_helpfulness=None if helpful_p is None else float(helpful_p[i]),
                        kl_to_sft=None if kl is None else float(kl[i]))
                   for i, (ex, r) in enumerate(zip(examples, texts))]
    return m, texts, generations


def run_benchmarks(benchmarks, name, model, tok, args, generations):
    """benchmarks.run_all on one checkpoint; generations gets its answers, each row naming the checkpoint (stage)."""
    rows = []
    result = benchmarks.run_all(model, tok, args.benchmarks, args.benchmark_limit, args.max_new_tokens,
                                args.batch_size, rows, bold_domains=args.bold_domains, bold_tokens=args.bold_tokens,
                                bold_limit=args.bold_limit)
    if generations is not None:
        generations += [dict(stage=name, **row) for row in rows]
    return result


# ---------------------------------------------------------------------------------------------- real checkpoints
def world_checkpoint(path):
    """Whether path holds a model of the embedded world: this project's .pt whose tokenizer was made here
    (tokenizer.Tokenizer's own control tokens, SPECIAL_TOKENS, and no others). A real model (a .gguf, a HF or Meta
    folder, loaders.py) brings its own control tokens (<|im_start|>, <|eot_id|>, ...), and keeps them when
    train_sft.py fine-tunes it: the world's prompts, judge and reward models do not apply to it."""
    if loaders.is_real(path):
        return False
    return set(load_checkpoint(path)["tokenizer"]["special_tokens"]) == set(SPECIAL_TOKENS)


WORLD_FLAGS = ("--sft", "--rm-safety", "--rm-helpful", "--prompts", "--limit")  # what only the world's path reads


def benchmarks_only(args, checkpoints):
    """Whether this call runs the public benchmarks only: with --benchmarks-only, or when every checkpoint is a
    real one. A mix of world and real checkpoints is an error, and so, with the benchmarks only, are a missing
    --benchmarks and the flags of the world's evaluation."""
    real = [name for name, path in checkpoints.items() if not world_checkpoint(path)]
    if not args.benchmarks_only and not real:
        return False
    if not args.benchmarks_only and len(real) < len(checkpoints):
        trained = [name for name in checkpoints if name not in real]
        raise runtime.UserError(f"world checkpoints ({', '.join(trained)}) and real ones ({', '.join(real)}: a real "
                                f"model's tokenizer) in one call: the world's metrics do not apply to a real model. "
                                f"Evaluate them in separate calls, or pass --benchmarks-only to run only the "
                                f"benchmarks on all")
    why = "--benchmarks-only" if args.benchmarks_only else f"real checkpoints ({', '.join(real)})"
    if args.benchmarks is None:
        raise runtime.UserError(f"{why}: only the public benchmarks apply; give --benchmarks DATA_DIR (the folder "
                                f"benchmarks.py reads)")
    given = [f for f in WORLD_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        raise runtime.UserError(f"{given[0]} belongs to the world's evaluation; with {why} only the benchmarks run "
                                f"(--benchmark-limit caps them)")
    return True


def evaluate_benchmarks(args, checkpoints, device, benchmarks):
    """The benchmarks-only evaluation: each checkpoint's benchmarks.run_all metrics under "benchmarks", their
    answers in OUT/benchmark_generations.jsonl, the tables, the AdvBench vs XSTest trade-off plot."""
    rows, generations = {}, []
    for name, path in checkpoints.items():
        model, tok, _ = loaders.load_policy(path, device)
        rows[name] = dict(checkpoint=path, benchmark_limit=args.benchmark_limit,
                          benchmarks=run_benchmarks(benchmarks, name, model, tok, args, generations))
        del model
    rows = _json_safe(rows)
    open_out(args.out, args.overwrite)
    data.write_jsonl(os.path.join(args.out, "benchmark_generations.jsonl"), generations)
    write_tables(args.out, rows)
    written, skipped = ["metrics.json", "metrics.md", "benchmark_generations.jsonl"], dict.fromkeys(BENCH_PLOTS,
                                                                                                  "--no-plots")
    if not args.no_plots:
        plots, skipped = make_plots(rows, [], {}, args.out, BENCH_PLOTS)
        written += plots
    print(summary(args.out, written, skipped))
    return rows


# ---------------------------------------------------------------------------------------------- prompt files
KINDS = ("harmful", "benign", "borderline")
TEXT_FIELDS = ("prompt", "kind", "category", "attack", "answer", "subject")
JUDGE_FIELDS = ("refused", "unsafe", "correct", "no_answer", "confused")  # the judge's labels in graded.jsonl


def example_from_row(row, where, with_response=False):
    """A world.Example (and the response, with_response) from one line of a prompt file (schema: the module
    docstring); a missing or wrong-typed field or an unknown kind is a ValueError naming `where` and the field."""
    for field in ("kind", "response") if with_response else ("kind",):
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
    if ("messages" in row) == ("prompt" in row):
        raise ValueError(f"{where}: field 'prompt' or 'messages': give " + ("one, not both" if "prompt" in row
                                                                            else "one of them"))
    for field in TEXT_FIELDS + (("response",) if with_response else ()):
        if field in row and not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} should be a string, got {json.dumps(row[field]):.60}")
    if "id" in row and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool)):
        raise ValueError(f"{where}: field 'id' should be a string or a number, got {json.dumps(row['id']):.60}")
    if row["kind"] not in KINDS:
        raise ValueError(f"{where}: field 'kind' should be one of {', '.join(KINDS)}, got {row['kind']!r}")
    if row["kind"] == "harmful" and row.get("answer"):
        raise ValueError(f"{where}: field 'answer': a harmful prompt has no gold answer to give")
    messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
    try:
        split_turns(messages, "user")
    except ValueError as e:
        raise ValueError(f"{where}: field 'messages': {e}") from None
    if not messages[-1]["content"].strip():
        raise ValueError(f"{where}: field {'messages' if 'messages' in row else 'prompt'!r}: the user's text is empty")
    example = world.Example(str(row.get("id", where)), row["kind"], messages, row.get("category", "unspecified"),
                            row.get("attack", "direct"), answer=row.get("answer", ""),
                            subject=row.get("subject", ""), split="file")
    return (example, row["response"]) if with_response else example


def read_examples(path, with_response=False):
    """(what example_from_row gives for every line, the lines as read): the whole file is checked first."""
    if not os.path.isfile(path):
        raise runtime.UserError(f"no prompt file at {path}")
    rows = data.read_jsonl(path, with_lines=True)
    return [example_from_row(row, f"{path}:{line}", with_response) for line, row in rows], [row for _, row in rows]


# ---------------------------------------------------------------------------------------------- several seeds
SCORES = ("gold_safety", "gold_helpfulness")  # mean scores in [0, 1] with a count, not rates: no Wilson interval


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _spread(values):
    """(mean, sample sd, min, max) of the numbers among values (a seed's null is left out); None where undefined."""
    xs = [x for x in values if _number(x)]
    if not xs:
        return None, None, None, None
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, min(xs), max(xs)


def _pooled(values, counts):
    """(95% Wilson interval, n) of every seed's prompts taken together: k = sum of rate * n. The product is rounded
    to the nearest half, which is exact for a count and for win_rate's ties counted half."""
    k = sum(round(2 * x * n) / 2 for x, n in zip(values, counts) if _number(x) and _number(n))
    n = sum(n for n in counts if _number(n))
    return judge.wilson(k, n), n


def combine_seeds(stage, metrics, where):
    """One stage's metrics over seeds (one dict per seed; `where` names their files): see the module docstring."""
    out = {"n_seeds": len(metrics)}
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    for key in keys:
        if key.endswith(("_ci", "_n")) and key.rsplit("_", 1)[0] in keys:
            continue  # an interval or count: pooled below, with its rate
        values = [m.get(key) for m in metrics]
        counted, rate = f"{key}_n" in keys, f"{key}_n" in keys and key not in SCORES
        if key.startswith("n_"):
            out[key] = sum(v for v in values if _number(v))
        elif any(isinstance(v, dict) for v in values):  # by category, by attack, by kind, benchmarks
            subs = list(dict.fromkeys(s for v in values if isinstance(v, dict) for s in v))
            spreads = {s: _spread([(v or {}).get(s) for v in values]) for s in subs}
            for i, suffix in enumerate(("", "_sd", "_min", "_max")):
                out[key + suffix] = {s: spreads[s][i] for s in subs}
            if counted:
                counts = [m.get(f"{key}_n") or {} for m in metrics]
                pooled = {s: _pooled([(v or {}).get(s) for v in values], [c.get(s) for c in counts]) for s in subs}
                if rate:
                    out[f"{key}_ci"] = {s: p[0] for s, p in pooled.items()}
                out[f"{key}_n"] = {s: p[1] for s, p in pooled.items()}
        elif all(v is None or _number(v) for v in values):
            out[key], out[f"{key}_sd"], out[f"{key}_min"], out[f"{key}_max"] = _spread(values)
            if counted:
                ci, n = _pooled(values, [m.get(f"{key}_n") for m in metrics])
                if rate:
                    out[f"{key}_ci"] = ci
                out[f"{key}_n"] = n
        elif any(v != values[0] for v in values):  # split, held_out_attack, the baseline: pooling needs them equal
            raise runtime.UserError(f"checkpoint {stage!r}: {key} differs between the evaluations ("
                                    + ", ".join(f"{v!r} in {w}" for v, w in zip(values, where)) + ")")
        else:
            out[key] = values[0]
    return out


def read_evaluations(folders, out):
    """{folder: its metrics.json} for --aggregate, checked: each a per-checkpoint evaluation, the same names."""
    runs = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        if os.path.realpath(folder) == os.path.realpath(out):
            raise runtime.UserError(f"--out {out} is one of the --aggregate folders; write the combination elsewhere")
        if any(os.path.realpath(folder) == os.path.realpath(f) for f in runs):
            raise runtime.UserError(f"--aggregate {folder} is given twice (its prompts would count twice)")
        if not os.path.isfile(path):
            raise runtime.UserError(f"--aggregate {folder}: no metrics.json in it")
        try:
            with open(path) as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise runtime.UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, dict) or not rows or not all(isinstance(m, dict) for m in rows.values()):
            raise runtime.UserError(f"{path}: expected one object of metrics per checkpoint, keyed by its name")
        if any("n_seeds" in m for m in rows.values()):
            raise runtime.UserError(f"{path} already combines seeds; aggregate the seeds' own evaluations")
        first = next(iter(runs.items()), None)
        if first is not None and set(rows) != set(first[1]):
            raise runtime.UserError(f"{path} evaluates {sorted(rows)} but {first[0]} {sorted(first[1])}: aggregate "
                                    f"evaluations of the same checkpoints")
        runs[folder] = rows
    return runs


def aggregate(folders, out, overwrite=False, no_plots=False):
    """--aggregate: combine several seeds' metrics.json into out (metrics.json, metrics.md, trade-off plot)."""
    runs = read_evaluations(folders, out)
    check_out(out, overwrite)
    where = [os.path.join(f, "metrics.json") for f in runs]
    names = list(next(iter(runs.values())))
    rows = _json_safe({name: combine_seeds(name, [r[name] for r in runs.values()], where) for name in names})
    open_out(out, overwrite)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    note = (f"Combined over {len(runs)} seeds ({', '.join(folders)}): each cell is the mean ± the sample standard "
            f"deviation over seeds [the 95% Wilson interval of all seeds' prompts pooled]; n is pooled too.")
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(format_markdown(rows) + "\n\n" + note + " " + legend(rows) + "\n")
    print(format_table(rows))
    print(textwrap.fill(note, 120))
    written, skipped = list(AGGREGATE_FILES), {"tradeoff.png": "--no-plots"}
    if not no_plots:
        plots, skipped = make_plots(rows, [], {}, out, ("tradeoff.png",))
        written += plots
    print(summary(out, written, skipped))
    return rows


# ---------------------------------------------------------------------------------------------- tables
# A column: (header, metrics key, sub-key of a per-group dict or None, kind); kind "rate" prints 100 * value with
# its interval, "num" three decimals, "count" a whole number.
MODEL_COLUMNS = [("RM-safe", "rm_safety_mean", None, "num"), ("RM-help", "rm_helpfulness_mean", None, "num"),
                 ("KL-sft", "kl_to_sft", None, "num"), ("win%", "win_rate", None, "rate")]


def columns(rows):
    """The table's columns for rows of a world split's metrics or, when they hold refusal_rate, a prompt file's."""
    if any("refusal_rate" in m for m in rows.values()):
        return file_columns(rows)
    mark = lambda a: a + ("*" if a == world.HELD_OUT_ATTACK else "")
    cols = [("viol%", "violation_rate", None, "rate")]
    cols += [(f"{c}%", "violation_rate_by_category", c, "rate") for c in world.CATEGORIES]
    cols += [(f"{mark(a)}%", "violation_rate_by_attack", a, "rate") for a in world.ATTACKS]
    cols += [(header, key, None, "rate") for header, key in (
        ("FR-border%", "false_refusal_rate"), ("FR-plain%", "false_refusal_rate_plain"),
        ("FR-wrapped%", "false_refusal_rate_wrapped"), ("FR-benign%", "benign_refusal_rate"),
        ("FR-benign-wrapped%", "benign_refusal_rate_wrapped"), ("acc%", "benign_accuracy"),
        ("no-ans%", "no_answer_rate"), ("confused%", "confused_refusal_rate"))]
    return cols + MODEL_COLUMNS


def file_columns(rows):
    """A prompt file's columns, those measured in some row: refusals overall and per kind, violations overall and
    per category and attack (when the file has more than one), accuracy, no answer, confused, the model's."""
    groups = lambda key: list(dict.fromkeys(g for m in rows.values() for g in (m.get(key) or {})))
    cols = [("refused%", "refusal_rate", None, "rate")]
    cols += [(f"refused-{k}%", "refusal_rate_by_kind", k, "rate") for k in KINDS if k in groups("refusal_rate_by_kind")]
    cols += [("viol%", "violation_rate", None, "rate")]
    for key in ("violation_rate_by_category", "violation_rate_by_attack"):
        cols += [(f"viol-{g}%", key, g, "rate") for g in groups(key)] if len(groups(key)) > 1 else []
    cols += [("acc%", "accuracy", None, "rate"), ("no-ans%", "no_answer_rate", None, "rate"),
             ("confused%", "confused_refusal_rate", None, "rate")] + MODEL_COLUMNS
    return [c for c in cols if any(_get(m, c[1], c[2]) is not None for m in rows.values())]


def benchmark_rows(rows):
    """{name: its benchmarks.run_all metrics} of the rows that ran the benchmarks."""
    return {name: m["benchmarks"] for name, m in rows.items() if isinstance(m.get("benchmarks"), dict)}


def benchmark_columns(bench_rows):
    """The columns of benchmark_rows' flat dicts, in run_all's order: each rate or mean that carries an interval
    ("advbench_refusal%", "truthfulqa_mc2%"; in percent), each BOLD group's mean sentiment ("gender:American_actors",
    in [-1, 1]), any other number as it is. The n_* counts and each metric's n go in the n line, as integers."""
    keys = list(dict.fromkeys(k for m in bench_rows.values() for k in m))
    cols = []
    for key in keys:
        if key.startswith("n_") or key.endswith(("_ci", "_n")) and key.rsplit("_", 1)[0] in keys:
            continue
        values = [m.get(key) for m in bench_rows.values()]
        if any(isinstance(v, dict) for v in values):  # BOLD: one column per group
            groups = dict.fromkeys(g for v in values if isinstance(v, dict) for g in v)
            cols += [(f"{key.removeprefix('bold_')}:{g}", key, g, "num") for g in groups]
        elif any(_number(v) for v in values):
            rate = f"{key}_ci" in keys
            cols.append((key.removesuffix("_rate") + "%" * rate, key, None, "rate" if rate else "num"))
    return cols


def _get(m, key, sub, suffix=""):
    """m[key + suffix], or its entry `sub` when the column is one group of a per-group dict."""
    value = m.get(key + suffix)
    if sub is None:
        return value
    return value.get(sub) if isinstance(value, dict) else None


def _cell(m, column, markdown=False):
    """One table cell. A rate: "27.4 [24.4-30.6]" (markdown) or "27.4±3.1" (printed, ± the larger half-width of
    the 95% interval). Rows combined over seeds (with _sd): "27.4 ± 2.0 [24.4-30.6]", ± the sd over seeds and the
    interval pooled over all seeds' prompts. "-": not measured."""
    _, key, sub, kind = column
    value = _get(m, key, sub)
    if not _number(value):
        return "-"
    if kind == "count":
        return f"{value:.0f}"
    show = (lambda x: f"{100 * x:.1f}") if kind == "rate" else (lambda x: f"{x:.3f}")
    ci = _get(m, key, sub, "_ci")
    ci = ci if isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci)) else None
    interval = f" [{show(ci[0])}-{show(ci[1])}]" if ci else ""
    if f"{key}_sd" in m:  # combined over seeds
        sd = _get(m, key, sub, "_sd")
        return show(value) + (f" ± {show(sd)}" if _number(sd) else "") + interval
    if ci is None or markdown:
        return show(value) + interval
    return f"{show(value)}±{show(max(value - ci[0], ci[1] - value))}"


def table_cells(rows, cols, markdown=False):
    return [[name] + [_cell(m, c, markdown) for c in cols] for name, m in rows.items()]


N_LINE = "n (prompts behind each rate):"


def group_sizes(rows, cols):
    """The count behind each rate column, "header n", once when every row has the same, else per row."""
    parts = []
    for header, key, sub, kind in cols:
        counts = {name: _get(m, key, sub, "_n") for name, m in rows.items()}
        if not any(_number(n) for n in counts.values()):
            continue
        show = lambda n: f"{n:.0f}" if _number(n) else "-"
        if len(set(counts.values())) == 1:
            parts.append(f"{header} {show(next(iter(counts.values())))}")
        else:
            parts.append(f"{header} " + ", ".join(f"{name} {show(n)}" for name, n in counts.items()))
    return parts


def format_table(rows, cols=None, width=120):
    """rows: {name: metrics}. One line per checkpoint, rates in percent with their interval, columns aligned; a
    table wider than `width` goes on below, the stage column repeated. Then the n behind each rate."""
    cols = columns(rows) if cols is None else cols
    head = ["stage"] + [h for h, _, _, _ in cols]
    body = table_cells(rows, cols)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    blocks, block = [], []
    for i in range(1, len(head)):
        if block and widths[0] + sum(widths[j] + 2 for j in block + [i]) > width:
            blocks.append(block)
            block = []
        block.append(i)
    line = lambda cells, block: "  ".join(cells[j].rjust(widths[j]) for j in [0] + block)
    lines = ["\n".join(line(r, b) for r in [head] + body) for b in blocks + [block]]
    parts = group_sizes(rows, cols)
    n_lines = [N_LINE]  # the parts, "; " between them, on lines of at most `width`
    for i, part in enumerate(parts):
        piece = part + (";" if i < len(parts) - 1 else "")
        if len(n_lines[-1]) + 1 + len(piece) > width and n_lines[-1].strip():
            n_lines.append(" ")
        n_lines[-1] += " " + piece
    return "\n\n".join(lines) + ("\n" + "\n".join(n_lines) if parts else "")


def format_markdown(rows, cols=None):
    """rows as a markdown table, cells "27.4 [24.4-30.6]", then the n behind each rate."""
    cols = columns(rows) if cols is None else cols
    head = ["stage"] + [h for h, _, _, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_cells(rows, cols, markdown=True)]
    parts = group_sizes(rows, cols)
    return "\n".join(lines) + (f"\n\n{N_LINE} " + "; ".join(parts) if parts else "")


def legend(rows):
    """What each column of columns(rows) means."""
    cells = ("Rates in percent of the prompts of each group." if any("n_seeds" in m for m in rows.values()) else
             "Rates in percent of the prompts of each group, each with its 95% Wilson interval: [low-high] in "
             "metrics.md; in the printed table ± the larger half-width of it.")
    file_mode = any("refusal_rate" in m for m in rows.values())
    model = any(k in m for m in rows.values() for k in ("rm_safety_mean", "kl_to_sft", "win_rate"))
    return " ".join([cells, FILE_LEGEND if file_mode else LEGEND] + [MODEL_LEGEND] * model
                    + ["'-': not measured. n: the prompts behind each rate."])


LEGEND = (f"viol: unsafe compliance on harmful prompts, overall, per risk category and per attack vector "
          f"(* {world.HELD_OUT_ATTACK}: held out of all training). FR-border: refusals of all borderline prompts "
          f"(benign requests that sound unsafe); FR-plain of those asked plainly, FR-wrapped of those inside an attack "
          f"wrapper. FR-benign: refusals of all benign prompts; FR-benign-wrapped of those inside an attack wrapper. "
          f"acc: correct answers to benign prompts. no-ans: empty or degenerate answers, of all prompts. confused: "
          f"refusals of harmful prompts that name another request and never this one, of all refusals of harmful "
          f"prompts.")
FILE_LEGEND = ("refused: refusals of all prompts; refused-KIND of the prompts of that kind (of benign and borderline "
               "ones: false refusals). viol: unsafe compliance on harmful prompts, overall and per category and attack "
               "of the file. acc: correct answers of the prompts with a gold answer. no-ans: empty or degenerate "
               "answers, of all prompts. confused: refusals of harmful prompts that name another request and never "
               "this one, of all refusals of harmful prompts.")
BENCH_LEGEND = ("Benchmarks (benchmarks.py): advbench_refusal and harmbench_refusal: GCG's refusal phrases found in "
                "the answer to a harmful request (an empty answer is no refusal); xstest_false_refusal: XSTest's "
                "refusal prefixes on its safe prompts, xstest_unsafe_refusal on its unsafe ones; truthfulqa_mc1 and "
                "mc2 by log-likelihood; each in percent with its 95% interval (Wilson; MC2 a mean's normal "
                "interval). DOMAIN:GROUP: BOLD's mean VADER compound sentiment, in [-1, 1], of the model's "
                "continuations of that group's prompts, with the normal 95% interval of the mean. n: the items "
                "behind each.")
MODEL_LEGEND = ("RM-safe / RM-help: mean sigmoid RM score. KL-sft: mean sequence log-ratio to the SFT model. win: "
                "gold-judge win rate against the baseline, ties half.")


def format_audit(audit):
    """The data audit as text tables (the layout of Llama 2 Table 9)."""
    n = audit["n_documents"]
    lines = [f"Pre-training data audit over {n} documents", "", "personal data removed:"]
    lines += [f"  {name:12s} {count:8d}" for name, count in audit["personal_data_removed"].items()]
    lines += ["", f"pronouns ({audit['documents_with_pronouns']} documents use one; share of those):",
              f"  {'group':15s} {'docs':>8s} {'share%':>8s} {'mentions':>9s}"]
    lines += [f"  {g:15s} {p['documents']:8d} {100 * p['share']:8.1f} {p['mentions']:9d}"
              for g, p in audit["pronouns"].items()]
    lines += ["", "identity terms (axis: share of all documents; term: share of the axis's documents):"]
    for axis, a in audit["identity_terms"].items():
        lines.append(f"  {axis:20s} {a['documents']:8d} docs {100 * a['share']:6.1f}%")
        found = sorted(((t, v) for t, v in a["terms"].items() if v["documents"]), key=lambda tv: -tv[1]["documents"])
        lines += [f"      {t:16s} {v['documents']:8d} {100 * v['share']:6.1f}%" for t, v in found]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
# The first of these keys that a training log's rows hold is plotted: PPO logs its reward (the RM score on the
# logit scale) and the per-sequence KL; DPO logs the implicit reward margin beta * (h_chosen - h_rejected).
REWARD_KEYS = ("reward", "rm_score", "margin")
KL_KEYS = ("kl", "kl_to_ref")
PLOTS = ("tradeoff.png", "reward_kl.png", "rm_scores.png")
BENCH_PLOTS = ("benchmark_tradeoff.png",)  # with --benchmarks


def training_curve(path):
    """(reward key, KL key, [(kl, reward)]) from a metrics.jsonl, or None when it logs no reward and KL."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for rk in REWARD_KEYS:
        for kk in KL_KEYS:
            points = [(r[kk], r[rk]) for r in rows if number(r.get(kk)) and number(r.get(rk))]
            if points:
                return rk, kk, points
    return None


def make_plots(rows, generations, log_paths, out, plots=PLOTS):
    """Write those of `plots` (PLOTS: the trade-off, reward-vs-KL and RM-distribution plots) that there is data for
    into out. Returns (paths written, {plot not written: why})."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], dict.fromkeys(plots, "matplotlib is not installed: pip install matplotlib")
    draw = {"tradeoff.png": (lambda path: tradeoff_plot(plt, rows, path), "no harmful prompt was evaluated"),
            "reward_kl.png": (lambda path: reward_kl_plot(plt, log_paths, path),
                              "no training log with reward and KL keys"),
            "rm_scores.png": (lambda path: rm_scores_plot(plt, rows, generations, path),
                              "no --rm-safety or --rm-helpful given"),
            "benchmark_tradeoff.png": (lambda path: benchmark_tradeoff_plot(plt, rows, path),
                                       "no checkpoint ran both AdvBench and XSTest")}
    written, skipped = [], {}
    for name in plots:
        plot, why_not = draw[name]
        path = plot(os.path.join(out, name))
        if path:
            written.append(path)
        else:
            skipped[name] = why_not
    return written, skipped


def _tradeoff_point(m, suffix=""):
    """(false-refusal rate on borderline prompts, violation rate) of one row, or with suffix "_sd" their sd over
    seeds; a prompt file's row (it has refusal_rate) counts the refusals of its borderline prompts."""
    refused = m.get("false_refusal_rate" + suffix) if "refusal_rate" not in m \
        else (m.get("refusal_rate_by_kind" + suffix) or {}).get("borderline")
    return refused, m.get("violation_rate" + suffix)


def tradeoff_plot(plt, rows, path):
    """The safety/helpfulness trade-off, one point per stage (Llama 2, section 4.2.3: safety without false
    refusals), with error bars of one sd when the rows combine seeds. Returns path, or None when no row has a
    violation rate (no harmful prompt was evaluated)."""
    names = [n for n in rows if _number(rows[n].get("violation_rate"))]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    xs = [100 * (_tradeoff_point(rows[n])[0] or 0) for n in names]
    ys = [100 * rows[n]["violation_rate"] for n in names]
    sds = [[100 * s if _number(s) else 0 for s in _tradeoff_point(rows[n], "_sd")] for n in names]
    seeds = any("n_seeds" in rows[n] for n in names)
    # no line between stages: the later ones each start from SFT, not from each other
    if seeds:
        ax.errorbar(xs, ys, xerr=[s[0] for s in sds], yerr=[s[1] for s in sds], fmt="o", capsize=3)
    else:
        ax.scatter(xs, ys)
    labels = {}  # stages that land on the same point share one label
    for n, x, y in zip(names, xs, ys):
        labels.setdefault((round(x, 1), round(y, 1)), []).append(n)
    for (x, y), group in labels.items():
        ax.annotate(", ".join(group), (x, y), textcoords="offset points", xytext=(5, 4))
    # keep a stage at 0% false refusals, and its error bar, inside the frame
    ax.set_xlim(-2, max(10, 1.2 * max(x + s[0] for x, s in zip(xs, sds))))
    ax.set_ylim(-2, 102)
    ax.set_xlabel("false-refusal rate on borderline prompts (%)")
    ax.set_ylabel("violation rate on harmful prompts (%)")
    ax.set_title("safety / helpfulness trade-off per stage" + ("\n(mean ± sd over seeds)" if seeds else ""))
    return _save(fig, plt, path)


def benchmark_tradeoff_plot(plt, rows, path):
    """The same trade-off on the public benchmarks: AdvBench refusal rate against XSTest's false-refusal rate on
    its safe prompts, one point per checkpoint with its Wilson intervals as error bars. None when no checkpoint
    ran both."""
    keys = ("xstest_false_refusal_rate", "advbench_refusal_rate")
    bench = {n: m for n, m in benchmark_rows(rows).items() if all(_number(m.get(k)) for k in keys)}
    if not bench:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, m in bench.items():
        (x, y), (x_ci, y_ci) = [100 * m[k] for k in keys], [[100 * v for v in m[f"{k}_ci"]] for k in keys]
        ax.errorbar([x], [y], xerr=[[x - x_ci[0]], [x_ci[1] - x]], yerr=[[y - y_ci[0]], [y_ci[1] - y]], fmt="o",
                    capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4))
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("XSTest false-refusal rate, safe prompts (%)")
    ax.set_ylabel("AdvBench refusal rate (%)")
    ax.set_title("refusals of harmful vs safe prompts\n(95% Wilson intervals)")
    return _save(fig, plt, path)


def reward_kl_plot(plt, log_paths, path):
    """Reward against KL to the reference over training, one panel per log (their rewards have different units);
    None when no log holds both."""
    curves = {name: training_curve(p) for name, p in log_paths.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4), squeeze=False)
    for ax, (name, (rk, kk, points)) in zip(axes[0], curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], ".-")
        ax.set_xlabel(f"{kk} (KL to the reference, nats per sequence)")
        ax.set_ylabel(rk)
        ax.set_title(f"{name}: {rk} vs KL during training")
    return _save(fig, plt, path)


def rm_scores_plot(plt, rows, generations, path):
    """RM score distributions per stage: safety RM on harmful prompts, helpfulness RM on the others; None without
    RM scores."""
    panels = [("rm_safety", "harmful", "safety RM score, harmful prompts"),
              ("rm_helpfulness", None, "helpfulness RM score, benign and borderline prompts")]
    if not any(g.get(key) is not None for g in generations for key, _, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, kind, title) in zip(axes, panels):
        for name in rows:
            vals = [g[key] for g in generations if g["stage"] == name and g.get(key) is not None
                    and ((g["kind"] == "harmful") == (kind == "harmful"))]
            if vals:
                ax.hist(vals, bins=20, range=(0, 1), histtype="step", label=name)
        ax.set_title(title)
        ax.set_xlabel("sigmoid(r)")
        ax.legend()
    return _save(fig, plt, path)


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(out, written, skipped):
    """The last line printed: every file written in out, then every plot not written and why."""
    line = f"wrote {out}: " + ", ".join(os.path.basename(p) for p in written)
    reasons = {}
    for name, why in skipped.items():
        reasons.setdefault(why, []).append(name)
    if reasons:
        line += "; not written: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items())
    return line


# ---------------------------------------------------------------------------------------------- chat
def fit_prompt(tok, head, turns, text, max_len, room):
    """The chat's next prompt: head + turns + the user's text, leaving `room` of the max_len-token context to answer
    in. The oldest exchanges are forgotten first; a text that does not fit on its own is cut to its last tokens
    that do. Returns (turns with the user's turn, prompt ids, note for the user or None); prompt None when not even
    a cut text fits (the system prompt fills the context)."""
    limit = max_len - room
    new = turns + [{"role": "user", "content": text}]
    prompt = tok.encode_prompt(head + new)
    while len(prompt) > limit and len(new) > 1:
        new = new[2:]  # forget the oldest exchange
        prompt = tok.encode_prompt(head + new)
    if len(prompt) <= limit:
        return new, prompt, None
    ids = tok.encode(text)
    keep = len(ids) - (len(prompt) - limit)
    while keep > 0:
        cut = tok.decode(ids[-keep:]).lstrip("\ufffd").strip()  # a cut inside a multi-byte character
        prompt = tok.encode_prompt(head + [{"role": "user", "content": cut}]) if cut else None
        if prompt is not None and len(prompt) <= limit:
            return ([{"role": "user", "content": cut}], prompt,
                    f"your message was cut to its last {keep} tokens to fit the {max_len}-token context")
        keep -= max(1, len(prompt) - limit) if prompt is not None else 1
    return turns, None, (f"your message does not fit the {max_len}-token context: the system prompt leaves no "
                         f"room for it and a {room}-token answer; shorten --system")


def safety_score(safety_rm, conversation, answer):
    """The safety RM's "[safety RM: p]" note on the answer. The conversation's oldest exchanges are left out until
    it fits the RM's context; one that still does not fit is scored on its last tokens, and the note says so."""
    rm, rm_tok = safety_rm
    max_len = rm.config.max_seq_len
    head = conversation[:1] if conversation[0]["role"] == "system" else []
    turns = conversation[len(head):]
    while len(turns) > 1 and len(reward.encode_scored(rm_tok, head + turns, answer)) > max_len:
        turns = turns[2:]
    n = len(reward.encode_scored(rm_tok, head + turns, answer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # score's warning that it cut the row: the note below says it instead
        p = float(reward.probabilities(safety_rm, [head + turns], [answer])[0])
    return f"[safety RM: {p:.3f}" + (f", on the last {max_len} of {n} tokens]" if n > max_len else "]")


def chat(model, tok, safety_rm=None, system=None, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0,
         inp=None, out=None):
    """Interactive chat in the model's template, streaming each answer token by token; after each answer the
    safety RM's sigmoid score when one is given. /reset starts over, /quit or end of input ends. Returns the
    conversation.

    The context keeps room for an answer of min(max_new_tokens, half the context) tokens: the oldest exchanges are
    forgotten, then a message too long on its own is cut to its last tokens, with a notice.
    """
    inp, out = inp or sys.stdin, out or sys.stdout
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    head = [{"role": "system", "content": system}] if system else []
    max_len = model.config.max_seq_len
    room = max(1, min(max_new_tokens, max_len // 2))
    turns = []
    out.write("chat: type a message; /reset clears the conversation, /quit (or Ctrl-D) ends\n")
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            out.write("\n")
            break
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        turns, prompt, note = fit_prompt(tok, head, turns, line.strip(), max_len, room)
        if note:
            out.write(f"[{note}]\n")
        if prompt is None:
            continue
        out.write("assistant>")
        ids, shown = [], ""
        for t in stream_tokens(model, prompt, max_new_tokens, tok.eos_id, temperature, top_p, generator):
            ids.append(t)
            text = tok.decode(ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(shown):])
                out.flush()
                shown = text
        out.write(tok.decode(ids)[len(shown):] + "\n")  # a cut-off multi-byte character, if any
        answer = tok.decode(ids).strip()
        turns.append({"role": "assistant", "content": answer})
        if safety_rm is not None:
            out.write(safety_score(safety_rm, head + turns[:-1], answer) + "\n")
        out.flush()
    return head + turns


# ---------------------------------------------------------------------------------------------- command line
EVAL_FILES = ("metrics.json", "metrics.md", "generations.jsonl")  # what an evaluation writes, besides PLOTS
BENCH_FILES = ("benchmark_generations.jsonl",)                    # and with --benchmarks, besides BENCH_PLOTS
RESPONSE_FILES = ("metrics.json", "metrics.md", "graded.jsonl")   # what --responses writes
AGGREGATE_FILES = ("metrics.json", "metrics.md")                  # what --aggregate writes, besides tradeoff.png
# any mode's: --overwrite replaces them all
OUTPUTS = tuple(dict.fromkeys((*EVAL_FILES, *RESPONSE_FILES, *PLOTS, *BENCH_FILES, *BENCH_PLOTS)))


def parse_checkpoints(specs):
    """{name: path} from NAME=PATH (or PATH, named by its folder); a name given twice is a ValueError."""
    named = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (os.path.basename(os.path.dirname(os.path.abspath(spec))),
                                                             spec)
        if not name or not path:
            raise ValueError(f"--checkpoints {spec!r}: expected NAME=PATH or PATH")
        if name in named:
            raise ValueError(f"checkpoint name {name!r} given twice; name them NAME=PATH")
        named[name] = path
    return named


def get_args(argv=None):
    p = runtime.parser(__doc__)
    # what to evaluate
    p.add_argument("--checkpoints", nargs="+", default=None, help="NAME=PATH pairs (or PATH, named by its folder)")
    p.add_argument("--split", choices=("test", "validation"), default=None, help="the world split --checkpoints "
                   "answers: test (held out; only evaluate.py reads it) or validation (what tuning reads) "
                   "(default: test)")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="with --checkpoints: answer this file's "
                   "prompts instead of a world split (schema below)")
    p.add_argument("--responses", default=None, metavar="FILE.jsonl", help="grade the responses in this file with "
                   "the gold judge, no model (schema below); needs --out")
    p.add_argument("--aggregate", nargs="+", default=None, metavar="DIR", help="combine the metrics.json of these "
                   "evaluation folders (one per seed, the same checkpoints): mean, sd, min, max and pooled "
                   "intervals; needs --out")
    p.add_argument("--baseline", default=None, help="checkpoint NAME that win rates are against (default: the first)")
    p.add_argument("--sft", default=None, help="SFT checkpoint for kl_to_sft (null when not given)")
    p.add_argument("--rm-safety", default=None, help="safety reward model checkpoint (train_rm.py) for rm_safety_mean")
    p.add_argument("--rm-helpful", default=None, help="helpfulness reward model checkpoint for rm_helpfulness_mean")
    p.add_argument("--limit", type=runtime.positive_int, default=None, help="evaluate every k-th prompt so that "
                   "about this many remain, all kinds kept (default: all)")
    p.add_argument("--benchmarks", default=None, help="folder of real benchmark data: adds benchmarks.run_all's "
                   "metrics")
    p.add_argument("--benchmark-limit", type=runtime.positive_int, default=None, help="examples per benchmark, "
                   "BOLD prompts per group, evenly spaced (default: all)")
    p.add_argument("--benchmarks-only", action="store_true", help="run only the benchmarks, no world metrics (the "
                   "default for real checkpoints: a .gguf, a HF or Meta folder, a .pt with a real model's tokenizer)")
    p.add_argument("--bold-domains", nargs="*", default=None, metavar="DOMAIN", help="BOLD domains to run: gender, "
                   "race, religious_ideology, political_ideology, profession (default: all but profession; none "
                   "given: skip BOLD)")
    p.add_argument("--bold-tokens", type=runtime.positive_int, default=32, help="tokens generated per BOLD "
                   "continuation (default 32)")
    p.add_argument("--bold-limit", type=runtime.positive_int, default=None, help="BOLD prompts per group, evenly "
                   "spaced (default: --benchmark-limit's)")
    p.add_argument("--logs", nargs="*", default=None, help="NAME=metrics.jsonl training logs for the reward-vs-KL "
                   "plot (default: the metrics.jsonl beside each checkpoint)")
    p.add_argument("--out", default=None, help="folder for metrics.json, metrics.md, generations.jsonl (or "
                   "graded.jsonl) and plots; needed with --checkpoints, --responses and --aggregate")
    p.add_argument("--overwrite", action="store_true", help="replace the evaluation already in OUT (without it, a "
                   "folder that holds an evaluation or a training run is an error)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    # generation
    p.add_argument("--max-new-tokens", type=runtime.positive_int, default=64, help="tokens generated per answer")
    p.add_argument("--temperature", type=runtime.nonnegative_float, default=0.0, help="0 is greedy; 1 samples the "
                   "policy itself")
    p.add_argument("--top-p", type=runtime.positive_float, default=1.0, help="nucleus sampling mass, at most 1 "
                   "(with temperature > 0)")
    p.add_argument("--batch-size", type=runtime.positive_int, default=64, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0, help="world seed (the split's prompts) and sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    # other modes
    p.add_argument("--audit", nargs="?", const="world", default=None, metavar="JSONL",
                   help="print the pre-training data audit of the world's base corpus, or of a JSONL file's "
                        "'text' fields, and exit")
    p.add_argument("--chat", default=None, metavar="CHECKPOINT", help="interactive chat with this checkpoint")
    p.add_argument("--system", default=None, help="chat: system prompt")
    args = runtime.parse_args(p, {}, argv)
    modes = ("checkpoints", "responses", "aggregate", "chat", "audit")
    if sum(getattr(args, mode) is not None for mode in modes) != 1:
        p.error("give one of --checkpoints, --responses, --aggregate, --chat or --audit")
    if args.top_p > 1:
        p.error(f"--top-p must be <= 1, got {args.top_p}")
    if args.prompts is not None and args.checkpoints is None:
        p.error("--prompts needs --checkpoints to answer them (to grade answers you have, use --responses)")
    if args.split is not None and (args.checkpoints is None or args.prompts is not None):
        p.error("--split picks the world split that --checkpoints answers; not with " + ("--prompts" if args.prompts
                                                                                          else "this mode"))
    args.split = args.split or "test"
    for mode, what in (("checkpoints", "metrics.json, metrics.md, generations.jsonl and plots"),
                       ("responses", "graded.jsonl, metrics.json and metrics.md"),
                       ("aggregate", "metrics.json, metrics.md and the trade-off plot")):
        if getattr(args, mode) is not None and args.out is None:
            p.error(f"--{mode} needs --out FOLDER (for {what})")
    if args.responses is not None or args.aggregate is not None:
        model_flags = ("--baseline", "--sft", "--rm-safety", "--rm-helpful", "--limit", "--benchmarks", "--logs")
        given = [f for f in model_flags if getattr(args, f[2:].replace("-", "_")) is not None]
        if given:
            p.error(f"{given[0]} needs --checkpoints (--{'responses' if args.responses else 'aggregate'} uses no "
                    f"model)")
    if args.checkpoints is not None:
        try:
            names = list(parse_checkpoints(args.checkpoints))
        except ValueError as e:
            p.error(str(e))
        if args.baseline is not None and args.baseline not in names:
            p.error(f"--baseline {args.baseline!r} is not one of the checkpoints {names}")
        args.baseline = args.baseline or names[0]
    bad_logs = [s for s in args.logs or [] if "=" not in s]
    if bad_logs:
        p.error(f"--logs {bad_logs[0]!r}: expected NAME=metrics.jsonl")
    return args


def check_out(out, overwrite, checkpoints=()):
    """An evaluation's folder: writable, and holding no evaluation or training run, nor the folder of one of the
    checkpoints, unless overwrite (which replaces only evaluation files)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise runtime.UserError(f"--out {out} is a file, not a folder")
    if not runtime.writable(out):
        raise runtime.UserError(f"--out {out}: cannot write there (permission denied)")
    held = [f for f in (*OUTPUTS, *runtime.RUN_FILES) if os.path.exists(os.path.join(out, f))]
    if held and not overwrite:
        raise runtime.UserError(f"{out} already holds {', '.join(held)}; pass --overwrite to replace its evaluation "
                                f"or choose another --out")
    home = [p for p in checkpoints if os.path.realpath(out) == loaders.checkpoint_folder(p)]
    if home and not overwrite:
        raise runtime.UserError(f"--out {out} is the folder of the checkpoint {home[0]}; choose another --out, or "
                                f"pass --overwrite to write the evaluation beside it")


def open_out(out, overwrite):
    """Create out, every evaluation file of any mode already in it removed with overwrite (no stale plot or
    generations.jsonl is left beside the new results)."""
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS if overwrite else ():
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def load_benchmarks(args):
    """The benchmarks module, its data folder and --bold-domains checked (None: its default domains), or None
    without --benchmarks."""
    if args.benchmarks is None:
        return None
    try:
        import benchmarks
    except ImportError as e:
        raise runtime.UserError(f"--benchmarks needs benchmarks.py beside evaluate.py ({e})") from None
    benchmarks.available(args.benchmarks)
    unknown = [d for d in args.bold_domains or () if d not in benchmarks.BOLD_DOMAINS]
    if unknown:
        raise runtime.UserError(f"--bold-domains {unknown[0]!r}: not one of {', '.join(benchmarks.BOLD_DOMAINS)}")
    if args.bold_domains is None:
        args.bold_domains = list(benchmarks.DEFAULT_BOLD_DOMAINS)
    return benchmarks


def _json_safe(x):
    """NaN (an empty group, or its interval) becomes null: metrics.json stays valid JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_tables(out, rows):
    """Write out/metrics.json and out/metrics.md (the table, the n behind each rate, the legend, any benchmarks)
    and print the tables. Rows of the benchmarks only (real checkpoints) get the benchmark table alone."""
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    bench = benchmark_rows(rows)
    bench_cols = benchmark_columns(bench)
    graded = any(k in m for m in rows.values() for k in ("violation_rate", "refusal_rate", "n_seeds"))
    markdown = format_markdown(rows) + "\n\n" + legend(rows) + "\n" if graded else ""
    if bench_cols:
        markdown += ("\nBenchmarks:\n\n" if graded else "") + format_markdown(bench, bench_cols) + "\n\n" \
            + BENCH_LEGEND + "\n"
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(markdown)
    if graded:
        print(format_table(rows))
        print("±: the larger half-width of each rate's 95% Wilson interval; metrics.md gives the intervals and a "
              "legend")
    if bench_cols:
        print(("\nbenchmarks:\n" if graded else "") + format_table(bench, bench_cols))
        print("±: the larger half-width of each 95% interval (Wilson for rates and MC1, normal for MC2 and BOLD's "
              "means); metrics.md gives the intervals and a legend")


def write_outputs(args, rows, generations, checkpoints, bench_generations=None):
    """Create OUT (its old evaluation removed with --overwrite), write the files, print the tables and the summary;
    with bench_generations (--benchmarks) also benchmark_generations.jsonl and the benchmark trade-off plot."""
    open_out(args.out, args.overwrite)
    data.write_jsonl(os.path.join(args.out, "generations.jsonl"), generations)
    written, plot_names = list(EVAL_FILES), PLOTS
    if bench_generations is not None:
        data.write_jsonl(os.path.join(args.out, "benchmark_generations.jsonl"), bench_generations)
        written, plot_names = written + list(BENCH_FILES), PLOTS + BENCH_PLOTS
    write_tables(args.out, rows)
    skipped = dict.fromkeys(plot_names, "--no-plots")
    if not args.no_plots:
        logs = (dict(s.split("=", 1) for s in args.logs) if args.logs is not None
                else {n: os.path.join(os.path.dirname(p), "metrics.jsonl") for n, p in checkpoints.items()})
        plots, skipped = make_plots(rows, generations, logs, args.out, plot_names)
        written += plots
    print(summary(args.out, written, skipped))


def grade_responses(path, out, overwrite=False):
    """--responses: grade a file's answers with the gold judge; out/graded.jsonl, metrics.json and metrics.md."""
    check_out(out, overwrite)
    pairs, lines = read_examples(path, with_response=True)
    examples, texts = [ex for ex, _ in pairs], [r for _, r in pairs]
    rows = {"responses": _json_safe({**file_metrics(examples, texts), "file": path})}
    open_out(out, overwrite)
    with open(os.path.join(out, "graded.jsonl"), "w") as f:
        for line, ex, text in zip(lines, examples, texts):
            j = judge.judge(ex, text)
            labels = {name: getattr(j, name) for name in JUDGE_FIELDS}
            f.write(json.dumps({**line, **labels, "gold_safety": j.safety, "gold_helpfulness": j.helpfulness}) + "\n")
    write_tables(out, rows)
    print(summary(out, list(RESPONSE_FILES), {}))
    return rows


def main(args):
    if args.audit is not None:
        texts = (world.build_world(args.seed).corpus if args.audit == "world"
                 else [r["text"] for r in data.read_jsonl(args.audit, required=("text",))])
        audit = data.audit_corpus(texts)
        print(format_audit(audit))
        return audit
    if args.aggregate is not None:
        return aggregate(args.aggregate, args.out, args.overwrite, args.no_plots)
    if args.responses is not None:
        return grade_responses(args.responses, args.out, args.overwrite)
    device = runtime.pick_device(args.device)
    if args.chat is not None:
        model, tok, _ = loaders.load_policy(args.chat, device)
        safety_rm = reward.load_reward_model(args.rm_safety, device) if args.rm_safety else None
        return chat(model, tok, safety_rm, args.system, args.max_new_tokens, args.temperature, args.top_p, args.seed)

    # ------------------------------------------------------------------ every input, read before anything is written
    checkpoints = parse_checkpoints(args.checkpoints)
    check_out(args.out, args.overwrite, checkpoints.values())
    for name, path in checkpoints.items():
        if not os.path.exists(path):
            raise runtime.UserError(f"no checkpoint at {path} (for {name})")
    if benchmarks_only(args, checkpoints):
        return evaluate_benchmarks(args, checkpoints, device, load_benchmarks(args))
    if args.prompts is not None:  # a prompt file, graded by its own rates
        examples, grade, about = read_examples(args.prompts)[0], file_metrics, dict(file=args.prompts)
    else:
        examples, grade = world.build_world(args.seed).split(args.split), gold_metrics
        about = dict(held_out_attack=world.HELD_OUT_ATTACK, split=args.split)
    if args.limit:
        examples = examples[::max(1, math.ceil(len(examples) / args.limit))]
    sft = loaders.load_policy(args.sft, device)[:2] if args.sft else None
    reward_models = {name: reward.load_reward_model(path, device) if path else None
                     for name, path in (("safety", args.rm_safety), ("helpfulness", args.rm_helpful))}
    benchmarks = load_benchmarks(args)

    # ------------------------------------------------------------------ generate and grade, one checkpoint at a time
    rows, responses, generations, bench_generations = {}, {}, [], [] if benchmarks else None
    order = [args.baseline] + [n for n in checkpoints if n != args.baseline]  # the baseline's answers come first
    for name in order:
        model, tok, _ = loaders.load_policy(checkpoints[name], device)
        if sft is not None and tok.to_dict() != sft[1].to_dict():
            raise runtime.UserError(f"{checkpoints[name]} and --sft {args.sft} use different tokenizers: no KL")
        rows[name], responses[name], rows_out = evaluate_checkpoint(
            name, model, tok, examples, args, responses.get(args.baseline), sft, reward_models, benchmarks, grade,
            about, bench_generations)
        generations += rows_out
        del model

    # ------------------------------------------------------------------ write, print, plot
    rows = {name: _json_safe(rows[name]) for name in checkpoints}  # the order given
    write_outputs(args, rows, generations, checkpoints, bench_generations)
    return rows


if __name__ == "__main__":
    runtime.command(main, get_args)
