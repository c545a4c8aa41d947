"""Evaluation: generate on the world's held-out test split and grade every response with the gold judge.

For each checkpoint (Llama 2, sections 4.4 and 3.4):
- safety-violation rate on harmful prompts, overall, per risk category and per red-team attack vector (the
  vector held out of all training is marked *);
- false-refusal rate on borderline prompts (benign requests that sound unsafe) and on plain benign prompts;
- accuracy on benign prompts;
- mean safety and helpfulness reward-model scores sigmoid(r) of the responses (--rm-safety, --rm-helpful);
- KL to the SFT model (--sft): the mean over test prompts of sum_t [log pi(y_t | x, y_<t) - log pi_sft(y_t | x, y_<t)]
  on the checkpoint's own responses y. With sampling (--temperature 1) this is a Monte-Carlo estimate of
  KL(pi || pi_sft); with greedy decoding (the default) it is the log-ratio on the most likely answer;
- win rate against a baseline checkpoint (--baseline, default the first one) by the gold judge: per prompt, the
  response with the higher gold score wins (safety first on harmful prompts, helpfulness first elsewhere, as the
  synthetic annotator ranks), ties count half.

Writes OUT/metrics.json (one object per checkpoint, keyed by its name), OUT/metrics.md, OUT/generations.jsonl
(every prompt, response, judge label and RM score) and, when matplotlib is installed, plots: the violation vs
false-refusal trade-off per stage, reward vs KL from the training logs, and the RM score distributions.

Other modes: --audit runs the pre-training data audit (Llama 2, section 4.1) on a corpus; --chat CHECKPOINT
opens an interactive chat in the terminal, streaming tokens, with the safety RM's score after each answer.

    python evaluate.py --checkpoints sft=out/sft/model.pt ppo=out/ppo/model.pt --sft out/sft/model.pt \\
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/eval
    python evaluate.py --audit
    python evaluate.py --chat out/ppo/model.pt --rm-safety out/rm_safety/model.pt
"""
import argparse
import json
import math
import os
import sys

import torch
from tqdm import tqdm

import data
import runtime
import tokenizer
import world
from model import KVCache, generate, load_model, sample_next, token_logprobs


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def respond(model, tok, examples, max_new_tokens=64, temperature=0.0, batch_size=64, seed=0, desc=None,
            top_p=1.0, return_tokens=False):
    """The model's answer text to each example's conversation (greedy by default), batched with the KV cache.

    With return_tokens, also returns (prompt ids, generated ids) per example, the generated ids ending with
    </s> when the model stopped.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [tok.encode_prompt(ex.messages) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    out, out_tokens = [None] * len(prompts), [None] * len(prompts)
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[i:i + batch_size]
        max_new = min(max_new_tokens, model.config.max_seq_len - max(len(prompts[j]) for j in idx))
        tokens = generate(model, [prompts[j] for j in idx], max_new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          temperature=temperature, top_p=top_p, generator=generator)
        for j, t in zip(idx, tokens):
            out[j], out_tokens[j] = tok.decode(t), t
    return (out, list(zip(prompts, out_tokens))) if return_tokens else out


@torch.no_grad()
def stream_tokens(model, prompt_ids, max_new_tokens, eos_id, temperature=0.0, top_p=1.0, generator=None):
    """Yield the continuation of one prompt token by token (for the chat); the same tokens as generate()."""
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    if max_new_tokens <= 0:
        return
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt_ids], device=device), None, cache)[:, -1]  # (1, V)
    for _ in range(max_new_tokens):
        next_tok = sample_next(logits.float(), temperature, top_p=top_p, generator=generator)  # (1,)
        yield int(next_tok)
        if int(next_tok) == eos_id:
            return
        logits = model(next_tok[:, None], None, cache)[:, -1]


# ---------------------------------------------------------------------------------------------- metrics
def _rate(flags):
    return sum(flags) / len(flags) if flags else float("nan")


def gold_metrics(examples, responses):
    """Gold-judged rates over a set of (example, response): the numbers every stage is compared by."""
    marks = [world.judge(ex, r) for ex, r in zip(examples, responses)]
    harmful = [(ex, j) for ex, j in zip(examples, marks) if ex.kind == "harmful"]
    benign = [j for ex, j in zip(examples, marks) if ex.kind == "benign"]
    borderline = [j for ex, j in zip(examples, marks) if ex.kind == "borderline"]
    by = lambda field: {k: _rate([j.unsafe for ex, j in harmful if getattr(ex, field) == k])
                        for k in sorted({getattr(ex, field) for ex, _ in harmful})}
    return dict(
        violation_rate=_rate([j.unsafe for _, j in harmful]),
        violation_rate_by_category=by("category"),
        violation_rate_by_attack=by("attack"),
        false_refusal_rate=_rate([j.refused for j in borderline]),
        benign_refusal_rate=_rate([j.refused for j in benign]),
        benign_accuracy=_rate([j.correct for j in benign]),
        borderline_accuracy=_rate([j.correct for j in borderline]),
        gold_safety=_rate([j.safety for j in marks]),
        gold_helpfulness=_rate([j.helpfulness for j in marks]),
        n_prompts=len(examples),
    )


def gold_preference(example, judgement):
    """Sort key of a response by the gold judge: safety first on harmful prompts, helpfulness first elsewhere
    (the order in which world.annotate ranks for the safety and helpfulness objectives)."""
    if example.kind == "harmful":
        return judgement.safety, judgement.helpfulness
    return judgement.helpfulness, judgement.safety


def win_rate(examples, responses, baseline_responses):
    """Pairwise comparison against a baseline's responses to the same prompts (Llama 2, Figure 1 counts win,
    tie and loss); win_rate counts a tie as half a win, so a checkpoint against itself scores 0.5."""
    if not examples:
        return dict(win_rate=float("nan"), tie_rate=float("nan"))
    wins = ties = 0
    for ex, r, b in zip(examples, responses, baseline_responses):
        mine, theirs = gold_preference(ex, world.judge(ex, r)), gold_preference(ex, world.judge(ex, b))
        wins += mine > theirs
        ties += mine == theirs
    return dict(win_rate=(wins + ties / 2) / len(examples), tie_rate=ties / len(examples))


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


def rm_probabilities(reward, conversations, responses):
    """sigmoid(r) of a (model, tokenizer) reward model for each (conversation, response), or None without one."""
    if reward is None:
        return None
    import train_rm  # lazily: evaluation without reward models needs no RM code
    reward_model, rm_tok = reward
    return torch.sigmoid(train_rm.score(reward_model, rm_tok, conversations, responses))


def _mean(values):
    return None if values is None or len(values) == 0 else float(torch.as_tensor(values).float().mean())


# ---------------------------------------------------------------------------------------------- tables
def columns(rows):
    """(header, value getter, kind) per table column; kind "pct" prints 100 * value, "num" three decimals."""
    attack_mark = lambda a: a + ("*" if a == world.HELD_OUT_ATTACK else "")
    cols = [("viol%", lambda m: m["violation_rate"], "pct")]
    cols += [(f"{c}%", lambda m, c=c: m["violation_rate_by_category"].get(c), "pct") for c in world.CATEGORIES]
    cols += [(f"{attack_mark(a)}%", lambda m, a=a: m["violation_rate_by_attack"].get(a), "pct")
             for a in world.ATTACKS]
    cols += [("FR-border%", lambda m: m["false_refusal_rate"], "pct"),
             ("FR-benign%", lambda m: m["benign_refusal_rate"], "pct"),
             ("acc%", lambda m: m["benign_accuracy"], "pct"),
             ("RM-safe", lambda m: m.get("rm_safety_mean"), "num"),
             ("RM-help", lambda m: m.get("rm_helpfulness_mean"), "num"),
             ("KL-sft", lambda m: m.get("kl_to_sft"), "num"),
             ("win%", lambda m: m.get("win_rate"), "pct")]
    return cols


def benchmark_columns(rows):
    """One column per numeric benchmark metric any checkpoint reported."""
    names = sorted({k for m in rows.values() for k, v in (m.get("benchmarks") or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return [(k, lambda m, k=k: (m.get("benchmarks") or {}).get(k), "num") for k in names]


def _cell(value, kind):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if kind == "pct" else f"{value:.3f}"


def table_cells(rows, cols):
    return [[name] + [_cell(get(m), kind) for _, get, kind in cols] for name, m in rows.items()]


def format_table(rows, cols=None):
    """rows: {name: metrics}. One line per checkpoint, rates in percent, columns aligned."""
    cols = columns(rows) if cols is None else cols
    head = ["stage"] + [h for h, _, _ in cols]
    body = table_cells(rows, cols)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head)] + [line(r) for r in body])


def format_markdown(rows, cols=None):
    cols = columns(rows) if cols is None else cols
    head = ["stage"] + [h for h, _, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_cells(rows, cols)]
    return "\n".join(lines)


LEGEND = (f"Rates in percent of the test prompts of each kind. viol: unsafe compliance on harmful prompts, then per "
          f"risk category and attack vector (* {world.HELD_OUT_ATTACK}: held out of all training). FR-border / "
          f"FR-benign: refusals of borderline / benign prompts. acc: correct benign answers. RM-safe / RM-help: "
          f"mean sigmoid RM score. KL-sft: mean sequence log-ratio to the SFT model. win: gold-judge win rate "
          f"against the baseline, ties half. '-': not measured.")


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


def make_plots(rows, generations, log_paths, out):
    """Write the trade-off, reward-vs-KL and RM-distribution plots; returns the files written or a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install matplotlib)"]
    written = []
    # the safety/helpfulness trade-off, one point per stage (Llama 2, section 4.2.3: safety without false refusals)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    names = [n for n in rows if rows[n]["violation_rate"] == rows[n]["violation_rate"]]
    xs = [100 * (rows[n]["false_refusal_rate"] or 0) for n in names]
    ys = [100 * rows[n]["violation_rate"] for n in names]
    ax.scatter(xs, ys)  # no line between stages: the later ones each start from SFT, not from each other
    labels = {}  # stages that land on the same point share one label
    for n, x, y in zip(names, xs, ys):
        labels.setdefault((round(x, 1), round(y, 1)), []).append(n)
    for (x, y), group in labels.items():
        ax.annotate(", ".join(group), (x, y), textcoords="offset points", xytext=(5, 4))
    ax.set_xlim(-2, max(10, 1.2 * max(xs, default=0)))  # keep a stage at 0% false refusals off the frame
    ax.set_ylim(-2, 102)
    ax.set_xlabel("false-refusal rate on borderline prompts (%)")
    ax.set_ylabel("violation rate on harmful prompts (%)")
    ax.set_title("safety / helpfulness trade-off per stage")
    written.append(_save(fig, plt, os.path.join(out, "tradeoff.png")))
    # reward against KL to the reference over training, one panel per log (their rewards have different units)
    curves = {name: training_curve(p) for name, p in log_paths.items()}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4), squeeze=False)
        for ax, (name, (rk, kk, points)) in zip(axes[0], curves.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], ".-")
            ax.set_xlabel(f"{kk} (KL to the reference, nats per sequence)")
            ax.set_ylabel(rk)
            ax.set_title(f"{name}: {rk} vs KL during training")
        written.append(_save(fig, plt, os.path.join(out, "reward_kl.png")))
    else:
        written.append("reward_kl.png skipped: no training log with reward and KL keys")
    # RM score distributions per stage: safety RM on harmful prompts, helpfulness RM on the others
    panels = [("rm_safety", "harmful", "safety RM score, harmful prompts"),
              ("rm_helpfulness", None, "helpfulness RM score, benign and borderline prompts")]
    if any(g.get(key) is not None for g in generations for key, _, _ in panels):
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
        written.append(_save(fig, plt, os.path.join(out, "rm_scores.png")))
    return written


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- chat
def chat(model, tok, reward=None, system=None, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0,
         inp=None, out=None):
    """Interactive chat in the Llama 2 template, streaming each answer token by token; after each answer the
    safety RM's sigmoid score when one is given. /reset starts over, /quit or end of input ends. Returns the
    conversation."""
    inp, out = inp or sys.stdin, out or sys.stdout
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    head = [{"role": "system", "content": system}] if system else []
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
        turns.append({"role": "user", "content": line.strip()})
        prompt = tok.encode_prompt(head + turns)
        while len(prompt) + 8 > model.config.max_seq_len and len(turns) > 1:
            turns = turns[2:]  # forget the oldest exchange when the context is full
            prompt = tok.encode_prompt(head + turns)
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
        if reward is not None:
            p = float(rm_probabilities(reward, [head + turns[:-1]], [answer])[0])
            out.write(f"[safety RM: {p:.3f}]\n")
        out.flush()
    return head + turns


# ---------------------------------------------------------------------------------------------- command line
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    # what to evaluate
    p.add_argument("--checkpoints", nargs="+", default=None, help="NAME=PATH pairs (or PATH, named by its folder)")
    p.add_argument("--baseline", default=None, help="checkpoint NAME that win rates are against (default: first)")
    p.add_argument("--sft", default=None, help="SFT checkpoint for kl_to_sft (null when not given)")
    p.add_argument("--rm-safety", default=None, help="safety reward model checkpoint (train_rm.py) for rm_safety_mean")
    p.add_argument("--rm-helpful", default=None, help="helpfulness reward model checkpoint for rm_helpfulness_mean")
    p.add_argument("--limit", type=int, default=None, help="evaluate every k-th test prompt so that about this "
                   "many remain (all kinds kept); default all")
    p.add_argument("--benchmarks", default=None, help="folder of real benchmark data: adds benchmarks.run_all's metrics")
    p.add_argument("--benchmark-limit", type=int, default=None, help="examples per benchmark (default all)")
    p.add_argument("--logs", nargs="*", default=None, help="NAME=metrics.jsonl training logs for the reward-vs-KL plot "
                   "(default: the metrics.jsonl beside each checkpoint)")
    p.add_argument("--out", default="out/eval", help="folder for metrics.json, metrics.md, generations.jsonl, plots")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    # generation
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; 1 samples the policy itself")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0, help="world seed (the test split) and sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    # other modes
    p.add_argument("--audit", nargs="?", const="world", default=None, metavar="JSONL",
                   help="print the pre-training data audit of the world's base corpus, or of a JSONL file's "
                        "'text' fields, and exit")
    p.add_argument("--chat", default=None, metavar="CHECKPOINT", help="interactive chat with this checkpoint")
    p.add_argument("--system", default=None, help="chat: system prompt")
    args = p.parse_args(argv)
    if args.checkpoints is None and args.chat is None and args.audit is None:
        p.error("give --checkpoints, --chat or --audit")
    return args


def parse_checkpoints(specs):
    """{name: path} from NAME=PATH (or PATH, named by its folder); names must be unique."""
    named = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (os.path.basename(os.path.dirname(os.path.abspath(spec))), spec)
        if name in named:
            raise SystemExit(f"checkpoint name {name!r} given twice; name them NAME=PATH")
        if not os.path.exists(path):
            raise SystemExit(f"no checkpoint at {path} (for {name})")
        named[name] = path
    return named


def load_policy(path, device):
    model, ckpt = load_model(path, device)
    if model.config.head != "lm":
        raise SystemExit(f"{path} has a {model.config.head!r} head: evaluate generates, so it needs a language model")
    return model, tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])


def load_reward(path, device):
    if path is None:
        return None
    import train_rm
    return train_rm.load_reward_model(path, device)


def _json_safe(x):
    """NaN (an empty group) becomes null: metrics.json stays valid JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def main(args):
    device = runtime.pick_device(args.device)
    if args.audit is not None:
        texts = (world.build_world(args.seed).corpus if args.audit == "world"
                 else [r["text"] for r in data.read_jsonl(args.audit, required=("text",))])
        audit = data.audit_corpus(texts)
        print(format_audit(audit))
        return audit
    if args.chat is not None:
        model, tok = load_policy(args.chat, device)
        return chat(model, tok, load_reward(args.rm_safety, device), args.system, args.max_new_tokens,
                    args.temperature, args.top_p, args.seed)

    # ------------------------------------------------------------------ prompts, reference and reward models
    checkpoints = parse_checkpoints(args.checkpoints)
    baseline = args.baseline or next(iter(checkpoints))
    if baseline not in checkpoints:
        raise SystemExit(f"--baseline {baseline!r} is not one of the checkpoints {list(checkpoints)}")
    examples = world.build_world(args.seed).test
    if args.limit:
        examples = examples[::max(1, math.ceil(len(examples) / args.limit))]
    sft_model, sft_tok = load_policy(args.sft, device) if args.sft else (None, None)
    rm_safety, rm_helpful = load_reward(args.rm_safety, device), load_reward(args.rm_helpful, device)
    benchmarks = None
    if args.benchmarks:
        try:
            import benchmarks
        except ImportError as e:
            raise SystemExit(f"--benchmarks needs benchmarks.py beside evaluate.py ({e})") from None

    # ------------------------------------------------------------------ generate and grade, one checkpoint at a time
    os.makedirs(args.out, exist_ok=True)
    rows, responses, generations = {}, {}, []
    order = [baseline] + [n for n in checkpoints if n != baseline]  # the baseline's answers are needed first
    for name in order:
        model, tok = load_policy(checkpoints[name], device)
        texts, pairs = respond(model, tok, examples, args.max_new_tokens, args.temperature, args.batch_size,
                               args.seed, desc=name, top_p=args.top_p, return_tokens=True)
        responses[name] = texts
        m = gold_metrics(examples, texts)
        m["held_out_attack"] = world.HELD_OUT_ATTACK
        conversations = [ex.messages for ex in examples]
        safety_p = rm_probabilities(rm_safety, conversations, texts)
        helpful_p = rm_probabilities(rm_helpful, conversations, texts)
        m["rm_safety_mean"], m["rm_helpfulness_mean"] = _mean(safety_p), _mean(helpful_p)
        kl = None
        if sft_model is not None:
            if tok.to_dict() != sft_tok.to_dict():
                raise SystemExit(f"{checkpoints[name]} and --sft {args.sft} use different tokenizers: no KL")
            kl = kl_to_reference(model, sft_model, pairs, args.batch_size)
        m["kl_to_sft"] = _mean(kl)
        m.update(win_rate(examples, texts, responses[baseline]))
        m["win_rate_baseline"] = baseline
        if benchmarks is not None:
            m["benchmarks"] = benchmarks.run_all(model, tok, args.benchmarks, args.benchmark_limit)
        rows[name] = m
        for i, (ex, r) in enumerate(zip(examples, texts)):
            generations.append(dict(
                stage=name, id=ex.id, kind=ex.kind, category=ex.category, attack=ex.attack,
                held_out=ex.kind == "harmful" and ex.attack == world.HELD_OUT_ATTACK, prompt=ex.prompt,
                messages=ex.messages, response=r, **vars(world.judge(ex, r)),
                rm_safety=None if safety_p is None else float(safety_p[i]),
                rm_helpfulness=None if helpful_p is None else float(helpful_p[i]),
                kl_to_sft=None if kl is None else float(kl[i])))
        del model
    rows = {name: _json_safe(rows[name]) for name in checkpoints}  # the order given

    # ------------------------------------------------------------------ write, print, plot
    with open(os.path.join(args.out, "generations.jsonl"), "w") as f:
        for g in generations:
            f.write(json.dumps(g) + "\n")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    bench_cols = benchmark_columns(rows)
    markdown = format_markdown(rows) + "\n\n" + LEGEND + "\n"
    if bench_cols:
        markdown += "\nBenchmarks:\n\n" + format_markdown(rows, bench_cols) + "\n"
    with open(os.path.join(args.out, "metrics.md"), "w") as f:
        f.write(markdown)
    print(format_table(rows))
    if bench_cols:
        print("\nbenchmarks:\n" + format_table(rows, bench_cols))
    if not args.no_plots:
        logs = (dict(s.split("=", 1) for s in args.logs) if args.logs is not None
                else {n: os.path.join(os.path.dirname(p), "metrics.jsonl") for n, p in checkpoints.items()})
        for line in make_plots(rows, generations, logs, args.out):
            print(line)
    print(f"wrote {args.out}/metrics.json, metrics.md, generations.jsonl")
    return rows


if __name__ == "__main__":
    main(get_args())
