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
RM score) and, unless --no-plots, plots: the violation vs false-refusal trade-off per stage,
reward vs KL from the training logs, and the RM score distributions (the tables and plots are report.py's). The
last line printed names every file written and every plot not written, with the reason. An OUT that already holds
an evaluation (or a training run) is an error unless --overwrite; every input is read before anything is written.

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

--audit runs the pre-training data audit (Llama 2, section 4.1) on a corpus. Several seeds' evaluations are
combined by report.py --aggregate; chat.py talks to a checkpoint with the safety RM's score after each answer.

    python evaluate.py --checkpoints sft=out/sft/model.pt ppo=out/ppo/model.pt --sft out/sft/model.pt \\
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/eval
    python evaluate.py --checkpoints ppo=out/ppo/model.pt --prompts redteam.jsonl --out out/redteam
    python evaluate.py --responses answers.jsonl --out out/graded
    python evaluate.py --audit
"""
import json
import math
import os
import random

import torch

import data
import judge
import loaders
import report
import reward
import runtime
import world
from judge import gold_metrics, win_rate
from model import load_checkpoint, respond, token_logprobs
from tokenizer import SPECIAL_TOKENS, split_turns


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


def mean_or_none(values):
    """The mean of values, None when there are none (no RM given, no SFT model to compare with)."""
    return None if values is None or len(values) == 0 else float(torch.as_tensor(values).float().mean())


def rate_ci_n(flags):
    """(rate, 95% Wilson interval, count) of True among flags; the rate None when there are none."""
    k, n = sum(flags), len(flags)
    return (k / n if n else None), judge.wilson(k, n), n


def file_metrics(examples, responses):
    """The rates of a prompt file's answers (see the module docstring), gold_metrics' where it has them: each rate
    x with x_ci (95% Wilson interval) and x_n (its count); n_prompts and n_<kind> count the prompts."""
    gold = gold_metrics(examples, responses)
    judgements = [judge.judge(ex, r) for ex, r in zip(examples, responses)]
    out = {}
    out["refusal_rate"], out["refusal_rate_ci"], out["refusal_rate_n"] = rate_ci_n([j.refused for j in judgements])
    by_kind = {"harmful": "harmful_refusal_rate", "benign": "benign_refusal_rate", "borderline": "false_refusal_rate"}
    kinds = [k for k in world.KINDS if gold[f"n_{k}"]]
    for suffix in ("", "_ci", "_n"):
        out[f"refusal_rate_by_kind{suffix}"] = {k: gold[by_kind[k] + suffix] for k in kinds}
    for name in ("violation_rate", "violation_rate_by_category", "violation_rate_by_attack"):
        out.update({name + suffix: gold[name + suffix] for suffix in ("", "_ci", "_n")})
    # accuracy over the prompts that carry a gold answer: without one, no answer can be judged correct
    out["accuracy"], out["accuracy_ci"], out["accuracy_n"] = rate_ci_n([j.correct for ex, j in zip(examples, judgements)
                                                                       if ex.answer])
    for name in ("no_answer_rate", "confused_refusal_rate"):
        out.update({name + suffix: gold[name + suffix] for suffix in ("", "_ci", "_n")})
    out.update({f"n_{k}": gold[f"n_{k}"] for k in ("prompts", *world.KINDS)})
    return out


def knowledge_probe(model, tok, w, chat=True, batch_size=64):
    """Does the model know its world? Two log-likelihood probes, per split of the world's requests, items and facts
    (no generation, no judge):

    knowledge: the model prefers each true knowledge sentence of the base corpus ("It is illegal to rob a bank.")
      over its contrast ("It is safe and legal to rob a bank."), each as a document of its own;
    facts: asked a fact question in a held-out (test) phrasing, the model prefers the true answer sentence over
      the same sentence with another value of its table, as a chat answer (chat=True) or, for the base model, in
      the corpus's unaligned "User: / Assistant:" form.

    Returns rate_metrics for knowledge_probe and fact_probe, each also _by_split (train, validation, test)."""
    rng = random.Random(0)
    sentence_pairs, splits = [], []
    for true, contrast, split, _ in w.knowledge():
        sentence_pairs += [([tok.eos_id], tok.encode(true)), ([tok.eos_id], tok.encode(contrast))]
        splits.append(split)
    fact_pairs, fact_splits = [], []
    for split in world.SPLITS:
        for kind, x, y in w.facts_of[split]:
            table, templates, sentence = world.FACT_TYPES[kind]
            question = rng.choice(templates["test"]).format(x=x)
            wrong = rng.choice(sorted(set(table.values()) - {y}))
            if chat:
                prompt = tok.encode_prompt([{"role": "user", "content": question}])
                answers = [tok.encode(sentence.format(x=x, y=v)) for v in (y, wrong)]
            else:
                prompt = [tok.eos_id] + tok.encode(f"User: {question}\nAssistant:")
                answers = [tok.encode(" " + sentence.format(x=x, y=v)) for v in (y, wrong)]
            fact_pairs += [(prompt, a) for a in answers]
            fact_splits.append(split)
    out = {}
    for name, pairs, where in (("knowledge_probe", sentence_pairs, splits), ("fact_probe", fact_pairs, fact_splits)):
        logp = sequence_logprobs(model, pairs, batch_size).view(-1, 2)
        right = (logp[:, 0] > logp[:, 1]).tolist()
        out.update(judge.rate_metrics(name, right))
        by_split = {s: [r for r, w_ in zip(right, where) if w_ == s] for s in world.SPLITS}
        out[f"{name}_by_split"] = {s: judge.mean(v) for s, v in by_split.items()}
        out[f"{name}_by_split_ci"] = {s: judge.wilson(sum(v), len(v)) for s, v in by_split.items()}
        out[f"{name}_by_split_n"] = {s: len(v) for s, v in by_split.items()}
    return out


def evaluate_checkpoint(name, model, tok, examples, args, baseline_texts, sft, reward_models, benchmarks,
                        grade=gold_metrics, about=None, bench_generations=None, stage=None):
    """Generate on the examples and grade: (metrics, response texts, one generations.jsonl row per example); with
    benchmarks, m["benchmarks"] and one bench_generations row per benchmark answer.

    baseline_texts: the responses of args.baseline (None: this checkpoint is the baseline); sft: (model, tok) or
    None; reward_models: {"safety": (model, tok) or None, "helpfulness": ...}; benchmarks: that module or None;
    grade: gold_metrics (a world split, with the knowledge probe) or file_metrics (a prompt file); about: keys
    naming the prompts; stage: the checkpoint's stage ("base" is probed in the corpus's form, not as a chat).
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
    if grade is gold_metrics:  # a world split: does the checkpoint still know its world?
        m.update(knowledge_probe(model, tok, world.build_world(args.seed), stage != "base", args.batch_size))
    conversations = [ex.messages for ex in examples]
    safety_p = reward.probabilities(reward_models["safety"], conversations, texts)
    helpful_p = reward.probabilities(reward_models["helpfulness"], conversations, texts)
    m["rm_safety_mean"], m["rm_helpfulness_mean"] = mean_or_none(safety_p), mean_or_none(helpful_p)
    kl = None if sft is None else kl_to_reference(model, sft[0], pairs, args.batch_size)
    m["kl_to_sft"] = mean_or_none(kl)
    m.update(win_rate(examples, texts, texts if baseline_texts is None else baseline_texts))
    # Wilson over prompts with a tie as half a win (k = wins + ties / 2 of n). A prompt's outcome is 0, 1/2 or 1,
    # whose variance is at most that of a 0/1 outcome with the same mean: if anything, the interval is too wide.
    m["win_rate_ci"], m["win_rate_n"] = judge.wilson(m["win_rate"] * len(examples), len(examples)), len(examples)
    m["win_rate_baseline"] = args.baseline
    if benchmarks is not None:
        m["benchmarks"] = run_benchmarks(benchmarks, name, model, tok, args, bench_generations)
    generations = [dict(stage=name, id=ex.id, kind=ex.kind, category=ex.category, attack=ex.attack, subject=ex.subject,
                        rung=ex.rung,
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
    rows = report.json_safe(rows)
    report.open_folder(args.out, args.overwrite)
    data.write_jsonl(os.path.join(args.out, "benchmark_generations.jsonl"), generations)
    report.write_tables(args.out, rows)
    written = ["metrics.json", "metrics.md", "benchmark_generations.jsonl"]
    skipped = dict.fromkeys(report.BENCH_PLOTS, "--no-plots")
    if not args.no_plots:
        plots, skipped = report.make_plots(rows, [], {}, args.out, report.BENCH_PLOTS)
        written += plots
    print(report.summary(args.out, written, skipped))
    return rows


# ---------------------------------------------------------------------------------------------- prompt files
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
    if row["kind"] not in world.KINDS:
        raise ValueError(f"{where}: field 'kind' should be one of {', '.join(world.KINDS)}, got {row['kind']!r}")
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


# ---------------------------------------------------------------------------------------------- the data audit
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


# ---------------------------------------------------------------------------------------------- command line
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
                   "graded.jsonl) and plots; needed with --checkpoints and --responses")
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
    # the data audit
    p.add_argument("--audit", nargs="?", const="world", default=None, metavar="JSONL",
                   help="print the pre-training data audit of the world's base corpus, or of a JSONL file's "
                        "'text' fields, and exit")
    args = runtime.parse_args(p, {}, argv)
    modes = ("checkpoints", "responses", "audit")
    if sum(getattr(args, mode) is not None for mode in modes) != 1:
        p.error("give one of --checkpoints, --responses or --audit")
    if args.top_p > 1:
        p.error(f"--top-p must be <= 1, got {args.top_p}")
    if args.prompts is not None and args.checkpoints is None:
        p.error("--prompts needs --checkpoints to answer them (to grade answers you have, use --responses)")
    if args.split is not None and (args.checkpoints is None or args.prompts is not None):
        p.error("--split picks the world split that --checkpoints answers; not with " + ("--prompts" if args.prompts
                                                                                          else "this mode"))
    args.split = args.split or "test"
    for mode, what in (("checkpoints", "metrics.json, metrics.md, generations.jsonl and plots"),
                       ("responses", "graded.jsonl, metrics.json and metrics.md")):
        if getattr(args, mode) is not None and args.out is None:
            p.error(f"--{mode} needs --out FOLDER (for {what})")
    if args.responses is not None:
        model_flags = ("--baseline", "--sft", "--rm-safety", "--rm-helpful", "--limit", "--benchmarks", "--logs")
        given = [f for f in model_flags if getattr(args, f[2:].replace("-", "_")) is not None]
        if given:
            p.error(f"{given[0]} needs --checkpoints (--responses uses no model)")
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
    """The evaluation folder's rules (report.check_folder), and not the folder of one of the checkpoints unless
    overwrite."""
    report.check_folder(out, overwrite)
    home = [p for p in checkpoints if os.path.realpath(out) == loaders.checkpoint_folder(p)]
    if home and not overwrite:
        raise runtime.UserError(f"--out {out} is the folder of the checkpoint {home[0]}; choose another --out, or "
                                f"pass --overwrite to write the evaluation beside it")


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



def write_outputs(args, rows, generations, checkpoints, bench_generations=None):
    """Create OUT (its old evaluation removed with --overwrite), write the files, print the tables and the summary;
    with bench_generations (--benchmarks) also benchmark_generations.jsonl and the benchmark trade-off plot."""
    report.open_folder(args.out, args.overwrite)
    data.write_jsonl(os.path.join(args.out, "generations.jsonl"), generations)
    written, plot_names = list(report.EVAL_FILES), report.PLOTS
    if bench_generations is not None:
        data.write_jsonl(os.path.join(args.out, "benchmark_generations.jsonl"), bench_generations)
        written, plot_names = written + list(report.BENCH_FILES), report.PLOTS + report.BENCH_PLOTS
    report.write_tables(args.out, rows)
    skipped = dict.fromkeys(plot_names, "--no-plots")
    if not args.no_plots:
        logs = (dict(s.split("=", 1) for s in args.logs) if args.logs is not None
                else {n: os.path.join(os.path.dirname(p), "metrics.jsonl") for n, p in checkpoints.items()})
        plots, skipped = report.make_plots(rows, generations, logs, args.out, plot_names)
        written += plots
    print(report.summary(args.out, written, skipped))


def grade_responses(path, out, overwrite=False):
    """--responses: grade a file's answers with the gold judge; out/graded.jsonl, metrics.json and metrics.md."""
    check_out(out, overwrite)
    pairs, lines = read_examples(path, with_response=True)
    examples, texts = [ex for ex, _ in pairs], [r for _, r in pairs]
    rows = {"responses": report.json_safe({**file_metrics(examples, texts), "file": path})}
    report.open_folder(out, overwrite)
    with open(os.path.join(out, "graded.jsonl"), "w") as f:
        for line, ex, text in zip(lines, examples, texts):
            j = judge.judge(ex, text)
            labels = {name: getattr(j, name) for name in JUDGE_FIELDS}
            f.write(json.dumps({**line, **labels, "gold_safety": j.safety, "gold_helpfulness": j.helpfulness}) + "\n")
    report.write_tables(out, rows)
    print(report.summary(out, list(report.RESPONSE_FILES), {}))
    return rows


def main(args):
    if args.audit is not None:
        texts = (world.build_world(args.seed).corpus if args.audit == "world"
                 else [r["text"] for r in data.read_jsonl(args.audit, required=("text",))])
        audit = data.audit_corpus(texts)
        print(format_audit(audit))
        return audit
    if args.responses is not None:
        return grade_responses(args.responses, args.out, args.overwrite)
    device = runtime.pick_device(args.device)

    # ------------------------------------------------------------------ every input, read before anything is written
    checkpoints = parse_checkpoints(args.checkpoints)
    check_out(args.out, args.overwrite, checkpoints.values())
    if not args.no_plots:
        report.pyplot()  # a missing matplotlib is an error now, not after every answer is generated
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
        model, tok, ckpt = loaders.load_policy(checkpoints[name], device)
        if sft is not None and tok.to_dict() != sft[1].to_dict():
            raise runtime.UserError(f"{checkpoints[name]} and --sft {args.sft} use different tokenizers: no KL")
        rows[name], responses[name], rows_out = evaluate_checkpoint(
            name, model, tok, examples, args, responses.get(args.baseline), sft, reward_models, benchmarks, grade,
            about, bench_generations, ckpt.get("stage"))
        generations += rows_out
        del model

    # ------------------------------------------------------------------ write, print, plot
    rows = {name: report.json_safe(rows[name]) for name in checkpoints}  # the order given
    write_outputs(args, rows, generations, checkpoints, bench_generations)
    return rows


if __name__ == "__main__":
    runtime.command(main, get_args)
