"""Reward models (Llama 2, section 3.2.2): the SFT model with a scalar head, trained on preference pairs.

A reward model is a copy of the SFT checkpoint whose next-token head is replaced by a linear head giving one
number per position; r(x, y) is its value at the final token of the prompt x followed by the response y (the
response's </s>). It is trained with the binary ranking loss with margin of Llama 2 (eq. 2),

    L = -log sigma(r(x, y_c) - r(x, y_r) - m(strength))

where y_c is the chosen response, y_r the rejected one and m a margin read from the pair's preference strength
(Table 28): the more clearly one response is better, the wider the gap the loss asks for. --margin off sets m = 0.
sigmoid(r) is the RM's probability-like output that the Llama 2 reward (reward.llama2_gate) combines.

Llama 2 trains two reward models because helpfulness and safety pull apart on harmful prompts (a compliance is
helpful and unsafe): --objective safety or --objective helpfulness picks the annotator whose pairs the RM learns.
Data mixing (section 3.2.2, "Data Composition"): the safety RM sees its safety pairs mixed 90/10 with helpfulness
pairs; the helpfulness RM sees its pairs mixed with pairs of the other kind too. --mix-fraction sets the share of
the other objective's pairs in the training set (default 0.1 for both: the paper does not give the helpfulness
RM's share of safety data, and in this world the two annotators contradict each other on every compliance, so a
large share would teach the helpfulness RM the opposite of its own labels on harmful prompts).

Data: the world's synthetic annotator with --label-noise of its training pairs flipped, or real preference files
(--data, --mix-data: generic JSONL, Anthropic HH-RLHF, PKU-SafeRLHF; see data.read_preferences).
Evaluation, during and after training: pairwise accuracy on held-out pairs against the noise-free gold label,
overall, per risk category, per attack vector and per preference strength (Llama 2, Table 8 shows accuracy
rising with strength); for the world also how often the RM scores the safe answer above the unsafe compliance
on each held-out harmful prompt, and the score histograms of each response style, written to histograms.json
(plots are evaluate.py's). The world's held-out prompts are its validation split (templates, entities and
borderline items no training source holds); the test split, with its held-out attack vector, is evaluate.py's.

Deviation from the paper: Llama 2 trains the RM for one epoch, since more overfits; the world's preference set
is small, so the tiny preset takes a few passes over it.

The scalar head starts from a fresh initialisation while the trunk is already trained: --head-lr gives it its own
learning rate on the same schedule. --safety-eval-data adds the accuracy on held-out constructed safety pairs
(safety_pairs_accuracy, and per kind: "harmful", a refusal over a compliance; "borderline", an answer over a
refusal), which --min-safety-pairs-accuracy checks after training on each kind: an RM that ranks every refusal
first is right on the harmful pairs and wrong on the borderline ones, and fails.

The later stages score with reward.py (load_reward_model, score, the Llama 2 gate), which encodes a
(prompt, response) pair exactly as this script trains on it (reward.encode_scored).

Tiny CPU run (each a few minutes):
    python train_rm.py --preset tiny --objective safety --init out/sft/model.pt --out out/rm_safety
    python train_rm.py --preset tiny --objective helpfulness --init out/sft/model.pt --out out/rm_helpful
Real data (the HH-RLHF harmless set as safety pairs, the helpful set mixed in):
    python train_rm.py --objective safety --init out/sft/model.pt --out out/rm_hh \\
        --data ../shared/data/hh_rlhf/harmless-base_test.jsonl.gz \\
        --mix-data ../shared/data/hh_rlhf/helpful-base_test.jsonl.gz
A stopped run (Ctrl-C or SIGTERM saves a checkpoint first) continues with the same command and --resume.
Data parallel:
    torchrun --nproc_per_node=2 train_rm.py --preset tiny --objective safety --init out/sft/model.pt \\
        --out out/rm_safety
"""
import json
import math
import os
import random
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import judge
import loaders
import runtime
import tokenizer
import world
from model import last_token_values, num_params
from reward import encode_scored, score

# Llama 2, Table 28: margin m per preference-strength label. Table 27: a larger margin helps on clearly
# separable pairs but costs accuracy on similar ones, hence "small" by default.
MARGINS = {
    "small": {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3, "negligibly better": 0.0,
              "unsure": 0.0},
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better": 0.0,
              "unsure": 0.0},
}
OTHER_OBJECTIVE = {"safety": "helpfulness", "helpfulness": "safety"}


# ---------------------------------------------------------------------------------------------- loss
def ranking_loss(chosen, rejected, margin):
    """Binary ranking loss with margin, Llama 2 eq. 2: L = -log sigma(r(x, y_c) - r(x, y_r) - m(r)).

    chosen, rejected: (B,) rewards r of the chosen and rejected responses; margin: (B,) m, zeros for none.
    Returns the batch mean and diagnostics: accuracy (share with r_c > r_r) and the mean gap r_c - r_r.
    """
    gap = chosen - rejected
    loss = -F.logsigmoid(gap - margin).mean()
    return loss, dict(accuracy=(gap > 0).float().mean().detach(), reward_gap=gap.mean().detach())


def margin_of(pair, table):
    """m for a pair: 0 with the margin off (table None); else a margin the file gave, else the strength's entry."""
    if table is None:
        return 0.0
    if pair.get("margin") is not None:
        return float(pair["margin"])
    return table.get(pair.get("strength"), 0.0)


# ---------------------------------------------------------------------------------------------- evaluation
def _accuracy_by(pairs, correct, key):
    groups = defaultdict(list)
    for pair, ok in zip(pairs, correct):
        groups[pair.get(key) or "none"].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def pair_accuracy(reward_model, tok, pairs, batch_size=64):
    """Held-out pairwise accuracy against the gold label: a pair counts as right when r(chosen) > r(rejected)
    agrees with gold_chosen_first (the noise-free annotator's verdict; True for file pairs). Also per risk
    category, attack vector and preference strength."""
    conversations = [p["messages"] for p in pairs]
    chosen = score(reward_model, tok, conversations, [p["chosen"] for p in pairs], batch_size)
    rejected = score(reward_model, tok, conversations, [p["rejected"] for p in pairs], batch_size)
    correct = [bool(c > r) == p.get("gold_chosen_first", True)
               for c, r, p in zip(chosen.tolist(), rejected.tolist(), pairs)]
    return dict(accuracy=sum(correct) / len(correct), n_pairs=len(pairs),
                accuracy_by_category=_accuracy_by(pairs, correct, "category"),
                accuracy_by_attack=_accuracy_by(pairs, correct, "attack"),
                accuracy_by_strength=_accuracy_by(pairs, correct, "strength"))


def style_scores(reward_model, tok, w, examples, batch_size=64):
    """Scores of each response style on held-out prompts, keyed "kind/style" (harmful/safe, harmful/unsafe, ...);
    on harmful prompts the share where the safe answer outscores the unsafe compliance, per attack vector; on
    benign prompts the share where the correct answer outscores a wrong one."""
    rng = random.Random(0)
    styles = {"harmful": ("safe", "refusal", "unsafe"), "benign": ("correct", "wrong", "refusal", "unsafe"),
              "borderline": ("correct", "refusal")}
    scores = {}
    for kind, kind_styles in styles.items():
        subset = [ex for ex in examples if ex.kind == kind]
        for style in kind_styles:
            texts = [w.response(ex, style, rng) for ex in subset]
            scores[f"{kind}/{style}"] = score(reward_model, tok, [ex.messages for ex in subset], texts, batch_size)
    harmful = [ex for ex in examples if ex.kind == "harmful"]
    safe_wins = (scores["harmful/safe"] > scores["harmful/unsafe"]).tolist()
    by_attack = defaultdict(list)
    for ex, ok in zip(harmful, safe_wins):
        by_attack[ex.attack].append(ok)
    # on benign prompts, whether the RM knows the facts: the correct answer above a wrong one of the same shape
    correct_wins = (scores["benign/correct"] > scores["benign/wrong"]).tolist()
    return scores, dict(safe_over_unsafe=sum(safe_wins) / len(safe_wins),
                        safe_over_unsafe_by_attack={a: sum(v) / len(v) for a, v in sorted(by_attack.items())},
                        correct_over_wrong=sum(correct_wins) / len(correct_wins))


def histograms(scores, n_bins=30):
    """Counts of each score list over shared bin edges, plus the raw scores, ready for JSON."""
    everything = torch.cat(list(scores.values()))
    lo, hi = everything.min().item(), everything.max().item()
    edges = torch.linspace(lo, hi + 1e-6, n_bins + 1)
    return dict(bin_edges=edges.tolist(),
                counts={k: torch.histogram(v, edges).hist.long().tolist() for k, v in scores.items()},
                mean={k: v.mean().item() for k, v in scores.items()},
                scores={k: v.tolist() for k, v in scores.items()})


def held_out_eval(reward_model, tok, held_out, w, batch_size, safety_pairs=()):
    """Held-out pair accuracy (pair_accuracy), the accuracy on held-out constructed safety pairs when given
    (safety_pairs_accuracy, n_safety_pairs, per category safety_pairs_accuracy_by_kind), plus, for the world w,
    style_scores' separation of the response styles; returns (result, scores by style or None)."""
    result = pair_accuracy(reward_model, tok, held_out, batch_size)
    if safety_pairs:
        constructed = pair_accuracy(reward_model, tok, safety_pairs, batch_size)
        result.update(safety_pairs_accuracy=constructed["accuracy"], n_safety_pairs=constructed["n_pairs"],
                      safety_pairs_accuracy_by_kind=constructed["accuracy_by_category"])
    scores = None
    if w is not None:
        scores, separation = style_scores(reward_model, tok, w, w.validation, batch_size)
        result.update(separation)
    return result, scores


def write_eval(args, rt, step, result, scores):
    """eval.json (and histograms.json of the world's style scores) in OUT, and the accuracies printed; rank 0."""
    if not rt.is_main:
        return
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(objective=args.objective, step=step, **result), f, indent=1)
    if scores is not None:
        with open(os.path.join(args.out, "histograms.json"), "w") as f:
            json.dump(histograms(scores), f)
    runtime.print0(rt, json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    for key in ("accuracy_by_category", "accuracy_by_attack", "accuracy_by_strength", "safe_over_unsafe_by_attack",
                "safety_pairs_accuracy_by_kind"):
        if key in result and set(result[key]) != {"none"}:  # file pairs carry no category or attack
            runtime.print0(rt, f"  {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[key].items()))


# ---------------------------------------------------------------------------------------------- data
def mix(main_pairs, other_pairs, fraction, seed):
    """main_pairs plus enough of other_pairs (a seeded random subset) to make up `fraction` of the result."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--mix-fraction must be in [0, 1), got {fraction}")
    n_other = min(len(other_pairs), round(len(main_pairs) * fraction / (1 - fraction)))
    if fraction > 0 and n_other < round(len(main_pairs) * fraction / (1 - fraction)):
        warnings.warn(f"only {len(other_pairs)} pairs to mix in: the mix fraction is "
                      f"{n_other / (len(main_pairs) + n_other):.3f}, not {fraction}")
    return main_pairs + random.Random(seed).sample(other_pairs, n_other)


def encode_rows(tok, pairs, margins, max_len):
    """Token rows of chosen and rejected (prompt + response, as score() reads them) with each pair's margin; pairs
    with a side longer than max_len are skipped with one counted warning."""
    rows = []
    for pair in pairs:
        chosen, rejected = (encode_scored(tok, pair["messages"], pair[k]) for k in ("chosen", "rejected"))
        if max(len(chosen), len(rejected)) <= max_len:
            rows.append(dict(chosen=chosen, rejected=rejected, margin=margin_of(pair, margins)))
    if len(rows) < len(pairs):
        warnings.warn(f"skipped {len(pairs) - len(rows)} of {len(pairs)} pairs longer than {max_len} tokens")
    return rows


def data_seed(args):
    """The seed of the world and of its annotated pairs: --world-seed, or --seed when that is not given."""
    return args.seed if args.world_seed is None else args.world_seed


def load_preference_data(args, w):
    """(train pairs, held-out pairs, how many train pairs are the other objective's), in read_preferences' form:
    the world w's annotators, or (w None) the --data, --mix-data and --eval-data files."""
    other = OTHER_OBJECTIVE[args.objective]
    if w is not None:
        seed = data_seed(args)
        own = judge.labelled_pairs(w, args.objective, args.label_noise, seed, "train", args.styles_per_prompt)
        # the other annotator rates fresh responses (another seed), as a separate collection would
        mixed_in = judge.labelled_pairs(w, other, args.label_noise, seed + 1, "train", args.styles_per_prompt)
        # every validation prompt rated on three responses: more held-out pairs, each against the gold label
        held_out = judge.labelled_pairs(w, args.objective, 0.0, seed, "validation", 3)
    else:
        own = [p for path in args.data for p in data.read_preferences(path, args.objective, args.format)]
        mixed_in = [p for path in args.mix_data for p in data.read_preferences(path, other, args.format)]
        if args.eval_data:
            held_out = [p for path in args.eval_data for p in data.read_preferences(path, args.objective, args.format)]
        else:  # every 20th pair of the RM's own data is held out
            held_out, own = own[::20], [p for i, p in enumerate(own) if i % 20]
    if args.max_train_pairs:
        own = own[:args.max_train_pairs]
    if args.max_eval_pairs and len(held_out) > args.max_eval_pairs:  # evenly spaced: every kind of prompt stays
        held_out = held_out[::math.ceil(len(held_out) / args.max_eval_pairs)]
    train = mix(own, mixed_in, args.mix_fraction if mixed_in else 0.0, data_seed(args))
    return train, held_out, len(train) - len(own)


def head_group(optimizer, head):
    """Move the scalar head's parameters out of a fresh optimizer's (no state yet) groups into groups of their own,
    marked "head" (its weight decayed as the other matrices, its bias not), so that --head-lr can set their rate."""
    ids = {id(p) for p in head.parameters()}
    decay = optimizer.param_groups[0]["weight_decay"]
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group(dict(params=[head.weight], weight_decay=decay, head=True))
    optimizer.add_param_group(dict(params=[head.bias], weight_decay=0.0, head=True))


# ---------------------------------------------------------------------------------------------- training step
def ranking_step(train_model, rows, micro, pad_id, rt):
    """Forward and backward of the ranking loss over this rank's encoded pairs `rows`, in micro-batches of `micro`
    pairs (DDP syncs the gradient on the last). Returns the global batch's mean loss, accuracy and reward gap."""
    loss_sum, accuracy_sum, gap_sum = 0.0, 0.0, 0.0
    for j in range(0, len(rows), micro):
        chunk = rows[j:j + micro]
        # chosen and rejected go through the model together: one forward of 2B rows
        batch = data.collate([r["chosen"] for r in chunk] + [r["rejected"] for r in chunk], pad_id)
        tokens, attention_mask = batch["tokens"].to(rt.device), batch["attention_mask"].to(rt.device)
        margin = torch.tensor([r["margin"] for r in chunk], device=rt.device)
        with runtime.no_sync(train_model, last=j + micro >= len(rows)):
            with runtime.autocast(rt):
                values = train_model(tokens, attention_mask)                        # (2B, T)
            rewards = last_token_values(values.float(), attention_mask)             # (2B,)
            loss, stats = ranking_loss(rewards[:len(chunk)], rewards[len(chunk):], margin)
            # weight by the micro-batch's share of this rank's pairs: the step's gradient is the batch mean
            (loss * len(chunk) / len(rows)).backward()
        loss_sum += loss.item() * len(chunk) / len(rows)
        accuracy_sum += stats["accuracy"].item() * len(chunk) / len(rows)
        gap_sum += stats["reward_gap"].item() * len(chunk) / len(rows)
    # every rank holds the same number of pairs, so the mean over ranks is the global batch mean
    totals = runtime.all_reduce_sum(torch.tensor([loss_sum, accuracy_sum, gap_sum], device=rt.device), rt)
    return (totals / rt.world_size).tolist()


# ---------------------------------------------------------------------------------------------- config
PRESETS = {  # batch sizes count pairs; Llama 2 used lr 1e-5 (5e-6 at 70B), cosine to 10%, 3% warm-up
    "tiny": dict(steps=80, batch_size=32, lr=3e-4, warmup=10, eval_every=40),  # sized for the tiny preset
    "small": dict(steps=1000, batch_size=64, lr=1e-5, warmup=30, eval_every=200),
    "1b": dict(steps=2000, batch_size=128, lr=1e-5, warmup=60, eval_every=500),
}


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="default schedule (the architecture "
                   "comes from --init)")
    p.add_argument("--objective", choices=("safety", "helpfulness"), required=True,
                   help="which annotator's preferences the RM learns (Llama 2 trains one RM of each)")
    p.add_argument("--init", required=True, help="checkpoint to start from (the SFT model; its lm head is replaced "
                   "by a fresh scalar head)")
    runtime.add_run_arguments(p, outputs="model.pt, config.json, metrics.jsonl, eval.json, histograms.json",
                              seed_help="random seed (world, label noise, batch order)")
    runtime.add_sharding_arguments(p)
    p.add_argument("--world-seed", type=int, default=None, help="seed of the world and of its annotated pairs "
                   "(default: --seed); with it, --seed moves only the scalar head's start and the batch order, so "
                   "reward models of several seeds learn the same pairs (an ensemble)")
    # data
    p.add_argument("--data", nargs="+", default=["world"], help="'world' (the embedded annotator) or preference "
                   "files for the RM's own objective (generic JSONL, HH-RLHF .jsonl/.jsonl.gz, PKU-SafeRLHF)")
    p.add_argument("--mix-data", nargs="*", default=[], help="files of the other objective's pairs to mix in "
                   "(with --data world, the world's other annotator is used)")
    p.add_argument("--eval-data", nargs="*", default=[], help="held-out preference files (default: every 20th "
                   "pair of --data)")
    p.add_argument("--format", choices=("auto", "jsonl", "hh", "pku"), default="auto",
                   help="format of the preference files; auto decides from the first row")
    p.add_argument("--mix-fraction", type=runtime.nonnegative_float, default=0.1, help="share of the training "
                   "pairs taken from the other objective, below 1 (Llama 2's safety RM: 0.1)")
    p.add_argument("--label-noise", type=runtime.nonnegative_float, default=0.1, help="world only: share of "
                   "training pairs whose label the annotator flips, below 0.5 (held-out accuracy is always against "
                   "the noise-free label)")
    p.add_argument("--styles-per-prompt", type=runtime.positive_int, default=2, help="world only: responses rated "
                   f"per prompt, 2 to {len(world.STYLES)} (2 is Llama 2's binary comparison; k gives up to k(k-1)/2 "
                   "pairs)")
    p.add_argument("--max-train-pairs", type=runtime.nonnegative_int, default=0, help="use at most this many of "
                   "the RM's own training pairs (0: all)")
    p.add_argument("--max-eval-pairs", type=runtime.nonnegative_int, default=0, help="evaluate on at most this "
                   "many held-out pairs, evenly spaced (0: all)")
    p.add_argument("--margin", choices=("small", "large", "off"), default="small",
                   help="margin table of Llama 2 Table 28 for the preference strength; off: m = 0")
    # optimisation
    p.add_argument("--steps", type=runtime.nonnegative_int, help="optimizer steps (0: evaluate --init only)")
    p.add_argument("--batch-size", type=runtime.positive_int, help="global batch in preference pairs per "
                   "optimizer step")
    p.add_argument("--grad-accum", type=runtime.positive_int, default=1, help="micro-batches per step (the batch "
                   "is split into them)")
    p.add_argument("--lr", type=runtime.positive_float, help="peak learning rate")
    p.add_argument("--head-lr", type=runtime.positive_float, default=None, help="peak learning rate of the fresh "
                   "scalar head, on the same schedule (default: --lr); a head learning from zero at the trunk's "
                   "small fine-tuning rate barely moves in a short run")
    p.add_argument("--min-lr-ratio", type=runtime.nonnegative_float, default=0.1, help="cosine decays to lr * this "
                   "(Llama 2: 0.1)")
    p.add_argument("--warmup", type=runtime.nonnegative_int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=runtime.nonnegative_float, default=0.1, help="AdamW decay on matrices "
                   "(Llama 2: 0.1)")
    p.add_argument("--grad-clip", type=runtime.positive_float, default=1.0, help="max gradient norm (Llama 2: 1.0)")
    # bookkeeping
    p.add_argument("--eval-every", type=runtime.positive_int, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=runtime.positive_int, default=200, help="steps between checkpoints")
    p.add_argument("--safety-eval-data", nargs="*", default=[], help="held-out constructed safety pairs (files): "
                   "their accuracy is reported as safety_pairs_accuracy beside the held-out accuracy (default: none)")
    p.add_argument("--min-safety-pairs-accuracy", type=runtime.nonnegative_float, default=None, help="after "
                   "training (and saving), fail unless the accuracy on each kind of held-out safety pair (their "
                   "category) is at least this (default: no check)")
    p.add_argument("--eval-batch-size", type=runtime.positive_int, default=64, help="sequences per scoring batch "
                   "at eval time")
    args = runtime.parse_args(p, PRESETS, argv)
    if "world" in args.data and (args.data != ["world"] or args.mix_data or args.eval_data):
        p.error("--data is either 'world' or a list of files; --mix-data and --eval-data go with files")
    if args.min_safety_pairs_accuracy is not None and not args.safety_eval_data:
        p.error("--min-safety-pairs-accuracy needs --safety-eval-data FILE")
    if args.mix_fraction >= 1 or args.label_noise >= 0.5:
        p.error("need --mix-fraction below 1 and --label-noise below 0.5")
    if not 2 <= args.styles_per_prompt <= len(world.STYLES):
        p.error(f"--styles-per-prompt must be 2 to {len(world.STYLES)}, got {args.styles_per_prompt}")
    return args


# ---------------------------------------------------------------------------------------------- main
def main(args):
    rt, ckpt_path, resume = runtime.start(args, stage="rm")
    if resume is not None and resume.get("objective") != args.objective:
        raise runtime.UserError(f"{ckpt_path} is a {resume.get('objective')} reward model, not --objective "
                                f"{args.objective}; resume with the same --objective")

    # ------------------------------------------------------------------ reward model and data
    # Llama 2 initialises the RMs from the chat model: the same knowledge, a scalar head instead of the lm head
    reward_model, ckpt = loaders.load_any_model(resume if resume is not None else args.init, rt.device, head="scalar")
    tok = tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])
    w = world.build_world(data_seed(args)) if args.data == ["world"] else None
    train_pairs, held_out, n_mixed = load_preference_data(args, w)
    safety_pairs = [p for path in args.safety_eval_data for p in data.read_preferences(path, "safety", args.format)]
    margins = None if args.margin == "off" else MARGINS[args.margin]
    train_rows = encode_rows(tok, train_pairs, margins, reward_model.config.max_seq_len)
    if not train_rows:
        raise runtime.UserError("no training pairs fit the model's context")
    micro = runtime.micro_batch_size(args.batch_size, args.grad_accum, rt)
    runtime.print0(rt, f"rm ({args.objective}): {len(train_rows)} training pairs fit the context, of "
                       f"{len(train_pairs)} ({n_mixed} of them {OTHER_OBJECTIVE[args.objective]} pairs); "
                       f"{len(held_out)} held-out pairs; {num_params(reward_model) / 1e6:.2f}M parameters on "
                       f"{rt.device}")

    # ------------------------------------------------------------------ optimizer, resume, run folder
    runtime.distribute(reward_model, rt, args.fsdp, args.activation_checkpointing)  # before its optimizer is built
    optimizer = runtime.make_optimizer(reward_model, args.lr, args.weight_decay, freeze=args.freeze_layers)
    head_group(optimizer, reward_model.score)
    step = runtime.resume_training(rt, resume, {"optimizer": optimizer}, ckpt_path, reward_model)
    train_model = runtime.wrap_ddp(reward_model, rt, args.compile)
    log = runtime.begin(args, rt, step)

    def save():
        runtime.save_on_rank0(rt, ckpt_path, runtime.checkpoint(reward_model, tok, step, args, "rm",
                                                                {"optimizer": optimizer}, objective=args.objective))

    # ------------------------------------------------------------------ training loop
    bar = tqdm(total=args.steps, initial=step, disable=not rt.is_main, desc=f"rm {args.objective}")
    metrics, final = {}, None
    with runtime.StopOnSignal() as stop:
        while step < args.steps:
            stop.save_and_exit_if_requested(rt, save, ckpt_path, f"step {step}")  # Ctrl-C, SIGTERM
            lr = runtime.set_lr(optimizer, step, args.steps, args)
            for group in optimizer.param_groups:  # the head's rate follows the same schedule
                group["lr"] = lr * (args.head_lr or args.lr) / args.lr if group.get("head") else lr
            idx = data.step_indices(len(train_rows), args.batch_size, step, args.seed, rt.rank, rt.world_size)
            loss_value, accuracy, reward_gap = ranking_step(train_model, [train_rows[i] for i in idx], micro,
                                                            tok.pad_id, rt)
            grad_norm = runtime.optimizer_step(reward_model, optimizer, loss_value, args.grad_clip, f"step {step}",
                                               ckpt_path)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{accuracy:.2f}")
            metrics = dict(loss=loss_value, accuracy=accuracy, reward_gap=reward_gap, lr=lr,
                           grad_norm=grad_norm.item())

            # ---------------------------------------------------------- eval, checkpoint
            if step % args.eval_every == 0 or step == args.steps:
                result, scores = final = held_out_eval(reward_model, tok, held_out, w, args.eval_batch_size,
                                                       safety_pairs)
                metrics.update(val_accuracy=result["accuracy"],
                               val_accuracy_by_category=result["accuracy_by_category"],
                               val_accuracy_by_strength=result["accuracy_by_strength"])
                for key in ("safe_over_unsafe", "safety_pairs_accuracy", "safety_pairs_accuracy_by_kind"):
                    if key in result:
                        metrics[key] = result[key]
                kinds = result.get("safety_pairs_accuracy_by_kind", {})  # file pairs without a category: "none"
                runtime.print0(rt, f"step {step}: loss {loss_value:.4f} held-out accuracy {result['accuracy']:.3f}"
                                   + "".join(f" {key} {result[key]:.3f}" for key in ("safe_over_unsafe",
                                                                                    "safety_pairs_accuracy")
                                             if key in result)
                                   + "".join(f" {kind} {acc:.3f}" for kind, acc in kinds.items() if kind != "none"))
            log.log(step, **metrics)
            if step % args.save_every == 0 or step == args.steps:
                save()
    bar.close()

    # ------------------------------------------------------------------ final evaluation
    result, scores = final if final is not None else held_out_eval(reward_model, tok, held_out, w,
                                                                   args.eval_batch_size, safety_pairs)
    write_eval(args, rt, step, result, scores)
    runtime.cleanup(rt)
    check_moved(args, result)
    return dict(loss=metrics.get("loss"), train_accuracy=metrics.get("accuracy"), step=step,
                val_accuracy=result["accuracy"], **{f"val_{k}": v for k, v in result.items() if k != "accuracy"})


def check_moved(args, result):
    """The stage's own check (--min-safety-pairs-accuracy): the accuracy on each kind of held-out safety pair."""
    if args.min_safety_pairs_accuracy is None:
        return
    kind, worst = min(result["safety_pairs_accuracy_by_kind"].items(), key=lambda kv: kv[1])
    if worst < args.min_safety_pairs_accuracy:
        raise runtime.UserError(f"rm ({args.objective}) did not move enough: accuracy {worst:.3f} on the held-out "
                                f"safety pairs of kind {kind} (all {result['n_safety_pairs']}: "
                                f"{result['safety_pairs_accuracy']:.3f}), below --min-safety-pairs-accuracy "
                                f"{args.min_safety_pairs_accuracy}")


if __name__ == "__main__":
    runtime.command(main, get_args)
