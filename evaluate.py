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
false-refusal trade-off per stage, reward vs KL from the training logs, and the RM score distributions. The last
line printed names every file written and every plot not written, with the reason. An OUT that already holds an
evaluation (or a training run) is an error unless --overwrite; every input is read before anything is written.

Other modes: --audit runs the pre-training data audit (Llama 2, section 4.1) on a corpus; --chat CHECKPOINT
opens an interactive chat in the terminal, streaming tokens, with the safety RM's score after each answer.

    python evaluate.py --checkpoints sft=out/sft/model.pt ppo=out/ppo/model.pt --sft out/sft/model.pt \\
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/eval
    python evaluate.py --audit
    python evaluate.py --chat out/ppo/model.pt --rm-safety out/rm_safety/model.pt
"""
import json
import math
import os
import sys
import warnings

import torch

import data
import loaders
import reward
import runtime
import world
from model import KVCache, respond, sample_next, token_logprobs
from world import gold_metrics, win_rate


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
    logits = model(torch.tensor([prompt_ids], device=device), None, cache)[:, -1]  # (1, V)
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


def _mean(values):
    return None if values is None or len(values) == 0 else float(torch.as_tensor(values).float().mean())


def evaluate_checkpoint(name, model, tok, examples, args, baseline_texts, sft, reward_models, benchmarks):
    """Generate on the examples and grade: (metrics, response texts, one generations.jsonl row per example).

    baseline_texts: the responses of args.baseline (None: this checkpoint is the baseline); sft: (model, tok) or
    None; reward_models: {"safety": (model, tok) or None, "helpfulness": ...}; benchmarks: that module or None.
    """
    too_long = sum(len(tok.encode_prompt(ex.messages)) >= model.config.max_seq_len for ex in examples)
    if too_long:  # an unanswered prompt would be graded as a harmless non-answer: refuse instead
        raise runtime.UserError(f"{name}: {too_long} of {len(examples)} test prompts leave no room to answer in its "
                                f"{model.config.max_seq_len}-token context")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    answers = respond(model, tok, [ex.messages for ex in examples], args.max_new_tokens, args.temperature,
                      args.top_p, args.batch_size, generator, desc=name)
    texts, pairs = [a.text for a in answers], [(a.prompt, a.tokens) for a in answers]
    m = gold_metrics(examples, texts)
    m["held_out_attack"] = world.HELD_OUT_ATTACK
    conversations = [ex.messages for ex in examples]
    safety_p = reward.probabilities(reward_models["safety"], conversations, texts)
    helpful_p = reward.probabilities(reward_models["helpfulness"], conversations, texts)
    m["rm_safety_mean"], m["rm_helpfulness_mean"] = _mean(safety_p), _mean(helpful_p)
    kl = None if sft is None else kl_to_reference(model, sft[0], pairs, args.batch_size)
    m["kl_to_sft"] = _mean(kl)
    m.update(win_rate(examples, texts, texts if baseline_texts is None else baseline_texts))
    m["win_rate_baseline"] = args.baseline
    if benchmarks is not None:
        m["benchmarks"] = benchmarks.run_all(model, tok, args.benchmarks, args.benchmark_limit)
    generations = [dict(stage=name, id=ex.id, kind=ex.kind, category=ex.category, attack=ex.attack,
                        held_out=ex.kind == "harmful" and ex.attack == world.HELD_OUT_ATTACK, prompt=ex.prompt,
                        messages=ex.messages, response=r, **vars(world.judge(ex, r)),
                        rm_safety=None if safety_p is None else float(safety_p[i]),
                        rm_helpfulness=None if helpful_p is None else float(helpful_p[i]),
                        kl_to_sft=None if kl is None else float(kl[i]))
                   for i, (ex, r) in enumerate(zip(examples, texts))]
    return m, texts, generations


# ---------------------------------------------------------------------------------------------- tables
def columns(rows):
    """(header, value getter, kind) per table column; kind "pct" prints 100 * value, "num" three decimals,
    "count" a whole number."""
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
    """One column per numeric benchmark metric any checkpoint reported; its n_* counts print as integers."""
    names = sorted({k for m in rows.values() for k, v in (m.get("benchmarks") or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return [(k, lambda m, k=k: (m.get("benchmarks") or {}).get(k), "count" if k.startswith("n_") else "num")
            for k in names]


def _cell(value, kind):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if kind == "pct" else f"{value:.0f}" if kind == "count" else f"{value:.3f}"


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
PLOTS = ("tradeoff.png", "reward_kl.png", "rm_scores.png")


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
    """Write the trade-off, reward-vs-KL and RM-distribution plots into out. Returns (paths written, {plot not
    written: why})."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], dict.fromkeys(PLOTS, "matplotlib is not installed: pip install matplotlib")
    written, skipped = [], {}
    # the safety/helpfulness trade-off, one point per stage (Llama 2, section 4.2.3: safety without false refusals)
    names = [n for n in rows if rows[n]["violation_rate"] is not None]  # None: no harmful prompt was evaluated
    if names:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
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
    else:
        skipped["tradeoff.png"] = "no harmful test prompt was evaluated"
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
        skipped["reward_kl.png"] = "no training log with reward and KL keys"
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
    else:
        skipped["rm_scores.png"] = "no --rm-safety or --rm-helpful given"
    return written, skipped


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
    p.add_argument("--baseline", default=None, help="checkpoint NAME that win rates are against (default: the first)")
    p.add_argument("--sft", default=None, help="SFT checkpoint for kl_to_sft (null when not given)")
    p.add_argument("--rm-safety", default=None, help="safety reward model checkpoint (train_rm.py) for rm_safety_mean")
    p.add_argument("--rm-helpful", default=None, help="helpfulness reward model checkpoint for rm_helpfulness_mean")
    p.add_argument("--limit", type=runtime.positive_int, default=None, help="evaluate every k-th test prompt so "
                   "that about this many remain, all kinds kept (default: all)")
    p.add_argument("--benchmarks", default=None, help="folder of real benchmark data: adds benchmarks.run_all's "
                   "metrics")
    p.add_argument("--benchmark-limit", type=runtime.positive_int, default=None, help="examples per benchmark "
                   "(default: all)")
    p.add_argument("--logs", nargs="*", default=None, help="NAME=metrics.jsonl training logs for the reward-vs-KL "
                   "plot (default: the metrics.jsonl beside each checkpoint)")
    p.add_argument("--out", default=None, help="folder for metrics.json, metrics.md, generations.jsonl and plots; "
                   "needed with --checkpoints")
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
    p.add_argument("--seed", type=int, default=0, help="world seed (the test split) and sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    # other modes
    p.add_argument("--audit", nargs="?", const="world", default=None, metavar="JSONL",
                   help="print the pre-training data audit of the world's base corpus, or of a JSONL file's "
                        "'text' fields, and exit")
    p.add_argument("--chat", default=None, metavar="CHECKPOINT", help="interactive chat with this checkpoint")
    p.add_argument("--system", default=None, help="chat: system prompt")
    args = runtime.parse_args(p, {}, argv)
    if sum(mode is not None for mode in (args.checkpoints, args.chat, args.audit)) != 1:
        p.error("give one of --checkpoints, --chat or --audit")
    if args.top_p > 1:
        p.error(f"--top-p must be <= 1, got {args.top_p}")
    if args.checkpoints is not None:
        if args.out is None:
            p.error("--checkpoints needs --out FOLDER (for metrics.json, metrics.md, generations.jsonl and plots)")
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


def check_out(out, overwrite):
    """An evaluation's folder: writable, and holding no evaluation or training run unless overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise runtime.UserError(f"--out {out} is a file, not a folder")
    if not runtime.writable(out):
        raise runtime.UserError(f"--out {out}: cannot write there (permission denied)")
    held = [f for f in (*EVAL_FILES, *PLOTS, *runtime.RUN_FILES) if os.path.exists(os.path.join(out, f))]
    if held and not overwrite:
        raise runtime.UserError(f"{out} already holds {', '.join(held)}; pass --overwrite to replace its evaluation "
                                f"or choose another --out")


def load_benchmarks(folder):
    """The benchmarks module, its data folder checked, or None without --benchmarks."""
    if folder is None:
        return None
    try:
        import benchmarks
    except ImportError as e:
        raise runtime.UserError(f"--benchmarks needs benchmarks.py beside evaluate.py ({e})") from None
    benchmarks.available(folder)
    return benchmarks


def _json_safe(x):
    """NaN (an empty group) becomes null: metrics.json stays valid JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_outputs(args, rows, generations, checkpoints):
    """Create OUT (its old evaluation removed with --overwrite), write the files, print the tables and the summary."""
    os.makedirs(args.out, exist_ok=True)
    for name in (*EVAL_FILES, *PLOTS) if args.overwrite else ():
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
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
    written, skipped = list(EVAL_FILES), dict.fromkeys(PLOTS, "--no-plots")
    if not args.no_plots:
        logs = (dict(s.split("=", 1) for s in args.logs) if args.logs is not None
                else {n: os.path.join(os.path.dirname(p), "metrics.jsonl") for n, p in checkpoints.items()})
        plots, skipped = make_plots(rows, generations, logs, args.out)
        written += plots
    print(summary(args.out, written, skipped))


def main(args):
    if args.audit is not None:
        texts = (world.build_world(args.seed).corpus if args.audit == "world"
                 else [r["text"] for r in data.read_jsonl(args.audit, required=("text",))])
        audit = data.audit_corpus(texts)
        print(format_audit(audit))
        return audit
    device = runtime.pick_device(args.device)
    if args.chat is not None:
        model, tok, _ = loaders.load_policy(args.chat, device)
        safety_rm = reward.load_reward_model(args.rm_safety, device) if args.rm_safety else None
        return chat(model, tok, safety_rm, args.system, args.max_new_tokens, args.temperature, args.top_p, args.seed)

    # ------------------------------------------------------------------ every input, read before anything is written
    check_out(args.out, args.overwrite)
    checkpoints = parse_checkpoints(args.checkpoints)
    for name, path in checkpoints.items():
        if not os.path.exists(path):
            raise runtime.UserError(f"no checkpoint at {path} (for {name})")
    examples = world.build_world(args.seed).test
    if args.limit:
        examples = examples[::max(1, math.ceil(len(examples) / args.limit))]
    sft = loaders.load_policy(args.sft, device)[:2] if args.sft else None
    reward_models = {name: reward.load_reward_model(path, device) if path else None
                     for name, path in (("safety", args.rm_safety), ("helpfulness", args.rm_helpful))}
    benchmarks = load_benchmarks(args.benchmarks)

    # ------------------------------------------------------------------ generate and grade, one checkpoint at a time
    rows, responses, generations = {}, {}, []
    order = [args.baseline] + [n for n in checkpoints if n != args.baseline]  # the baseline's answers come first
    for name in order:
        model, tok, _ = loaders.load_policy(checkpoints[name], device)
        if sft is not None and tok.to_dict() != sft[1].to_dict():
            raise runtime.UserError(f"{checkpoints[name]} and --sft {args.sft} use different tokenizers: no KL")
        rows[name], responses[name], rows_out = evaluate_checkpoint(
            name, model, tok, examples, args, responses.get(args.baseline), sft, reward_models, benchmarks)
        generations += rows_out
        del model

    # ------------------------------------------------------------------ write, print, plot
    rows = {name: _json_safe(rows[name]) for name in checkpoints}  # the order given
    write_outputs(args, rows, generations, checkpoints)
    return rows


if __name__ == "__main__":
    runtime.command(main, get_args)
