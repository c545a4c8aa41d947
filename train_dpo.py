"""Direct preference optimisation and its siblings: align the SFT model on preference pairs, no reward model.

DPO (Rafailov et al., 2023) shows that the KL-regularised RLHF objective of Llama 2 (section 3.2.3) has a
closed-form optimum, pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so the reward is implicit in the
policy, r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + const, and the Bradley-Terry ranking loss of the reward
model becomes a loss on the policy itself. With the log-ratio difference of a pair

    h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))

(log-probs summed over the answer tokens only), --loss picks one member of the family:
    dpo    -log sigma(beta h)                                      Rafailov et al. 2023, eq. 7
    ipo    (h - 1 / (2 beta))^2                                    Azar et al. 2023, eq. 17
    cdpo   -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   Mitchell 2023: DPO under label noise eps
    rpo    -log sigma(beta h) - alpha log pi(y_c) / |y_c|          Pang et al. 2024: DPO + SFT on the chosen
    simpo  -log sigma(beta (log pi(y_c)/|y_c| - log pi(y_r)/|y_r|) - gamma)   Meng et al. 2024, eq. 6

Data: the world's preference pairs combined the way the Llama 2 reward combines its two reward models
(section 3.2.2): R_c = R_s if is_safety(x) else R_h. Here the gate picks the annotator rather than the RM: on a
safety prompt (world.is_safety: a harmful request, in any attack wrapper) the pair comes from the safety
annotator, on every other prompt (benign and borderline) from the helpfulness annotator. Deviation: Llama 2's
second clause (also use R_s where R_s < 0.15, an unsafe answer to a prompt not tagged as a safety prompt) is
left out. On benign and borderline prompts the world's only unsafe answer is the "[details omitted]"
placeholder, which the helpfulness annotator already ranks below every answer but a refusal; the clause would
only turn (refusal, placeholder) pairs into "refuse" lessons on borderline prompts, i.e. false refusals.
Label noise flips a share of training pairs, as the reward models are trained (--label-noise).
Real data (data.read_preferences: generic JSONL, HH-RLHF, PKU-SafeRLHF): --safety-data files hold the safety
prompts and their safety labels, --data files the other prompts and their helpfulness labels.

Reference: the frozen copy of --init (SimPO's loss does without it; it still gives the logged KL). Its log-probs
are computed once before training (the default: the reference never changes, so the second forward per step is
wasted work), or every step with --ref-on-the-fly.
Chosen and rejected answers go through the model in one forward pass, concatenated along the batch.

Logged: loss, the implicit rewards beta log(pi/pi_ref) of chosen and rejected (SimPO: beta times the mean
log-prob), their margin, preference accuracy (margin > 0), and at eval time the held-out loss and accuracy and
a sampled estimate of KL(pi || pi_ref) (responses drawn from the policy at temperature 1 for held-out prompts).
The world's held-out pairs are noise-free pairs on its validation prompts; the test split is evaluate.py's. With
files, every 20th pair is held out, or --val-data and --safety-val-data name held-out files; the held-out loss and
accuracy are also reported for the safety pairs alone (val_loss_safety, val_accuracy_safety), which
--max-safety-val-loss and --min-safety-val-accuracy check after training.

Tiny CPU run (minutes):
    python train_dpo.py --preset tiny --init out/sft/model.pt --out out/dpo
    python evaluate.py --checkpoints sft=out/sft/model.pt dpo=out/dpo/model.pt --out out/eval_dpo
A stopped run (Ctrl-C or SIGTERM saves a checkpoint first) continues with the same command and --resume (the
same --init: it is the reference).
Data parallel:
    torchrun --nproc_per_node=2 train_dpo.py --preset tiny --init out/sft/model.pt --out out/dpo
"""
import math
import os
import random
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import judge
import loaders
import runtime
import world
from model import generate, num_params, token_logprobs


# ---------------------------------------------------------------------------------------------- losses
def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """The DPO loss, the Bradley-Terry likelihood of the implicit reward (Rafailov et al. 2023, eq. 7).

    L = -log sigma(beta h),  h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))
    Inputs are (B,) summed answer log-probs. Returns the batch mean and the implicit rewards
    beta log(pi / pi_ref) of chosen and rejected, each (B,), detached.
    """
    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, dict(chosen_reward=chosen_reward.detach(), rejected_reward=rejected_reward.detach())


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """The IPO loss: regress the log-ratio difference onto a fixed target (Azar et al. 2023, eq. 17).

    L = (h - 1 / (2 beta))^2, h as in DPO. Unlike DPO's sigmoid, the square stops pushing once h reaches the
    target, so a pair the data always agrees on cannot drive the policy arbitrarily far from the reference.
    Inputs are (B,) summed answer log-probs; returns the mean and the rewards beta log(pi / pi_ref).
    """
    chosen_logratio, rejected_logratio = chosen - ref_chosen, rejected - ref_rejected
    loss = ((chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2).mean()
    return loss, dict(chosen_reward=beta * chosen_logratio.detach(), rejected_reward=beta * rejected_logratio.detach())


def cdpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """Conservative DPO: DPO when each label is flipped with probability eps (Mitchell 2023, "A note on DPO
    with noisy preferences").

    L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h as in DPO; eps = label_smoothing.
    Its optimum is a finite margin (beta h = log((1 - eps) / eps)) instead of an unbounded one.
    Inputs are (B,) summed answer log-probs; returns the mean and the rewards beta log(pi / pi_ref).
    """
    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = (-(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)).mean()
    return loss, dict(chosen_reward=chosen_reward.detach(), rejected_reward=rejected_reward.detach())


def rpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, beta, alpha):
    """DPO plus the SFT loss on the chosen answer, which keeps the chosen answers likely while their margin
    grows (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1).

    L = -log sigma(beta h) - alpha log pi(y_c) / |y_c|, h as in DPO.
    Inputs are (B,) summed answer log-probs and the chosen answers' token counts |y_c|; returns the mean and
    the rewards beta log(pi / pi_ref).
    """
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    return loss - alpha * (chosen / chosen_len).mean(), stats


def simpo_loss(chosen_mean, rejected_mean, beta, gamma):
    """SimPO: a reference-free margin loss on length-normalised log-probs (Meng et al. 2024, eq. 6).

    L = -log sigma(beta / |y_c| log pi(y_c) - beta / |y_r| log pi(y_r) - gamma)
    Inputs are (B,) mean log-probs per answer token. Returns the mean and the rewards beta * mean log-prob.
    """
    chosen_reward, rejected_reward = beta * chosen_mean, beta * rejected_mean
    loss = -F.logsigmoid(chosen_reward - rejected_reward - gamma).mean()
    return loss, dict(chosen_reward=chosen_reward.detach(), rejected_reward=rejected_reward.detach())


def pair_loss(loss, logps, ref_logps, lengths, beta, label_smoothing, rpo_alpha, gamma):
    """The member `loss` of the family (--loss) on one batch. logps, ref_logps, lengths: (B, 2), column 0 chosen;
    label_smoothing is cdpo's eps, rpo_alpha rpo's alpha and gamma simpo's margin (each read by its loss only)."""
    chosen, rejected = logps.unbind(1)
    ref_chosen, ref_rejected = ref_logps.unbind(1)
    losses = {
        "dpo": lambda: dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta),
        "ipo": lambda: ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta),
        "cdpo": lambda: cdpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing),
        "rpo": lambda: rpo_loss(chosen, rejected, ref_chosen, ref_rejected, lengths[:, 0], beta, rpo_alpha),
        "simpo": lambda: simpo_loss(chosen / lengths[:, 0], rejected / lengths[:, 1], beta, gamma),
    }
    return losses[loss]()


LOSSES = ("dpo", "ipo", "cdpo", "rpo", "simpo")


# ---------------------------------------------------------------------------------------------- data
def load_pairs(args, tok, max_len):
    """Encoded training and held-out pairs; each row also records whether its prompt is a safety prompt."""
    if args.data == ["world"]:
        # --pairs llama2: the gate picks the annotator per prompt; safety or helpfulness: one annotator for every
        # prompt, to compare with the gate
        w = world.build_world(args.seed)
        train = judge.labelled_pairs(w, args.pairs, args.label_noise, args.seed, "train", args.styles_per_prompt)
        val = judge.labelled_pairs(w, args.pairs, 0.0, args.seed + 1, "validation", args.styles_per_prompt)
        val = val[::max(1, len(val) // args.val_pairs)][:args.val_pairs]
    else:
        # the gate on files: the --safety-data files hold the safety prompts, labelled for safety (HH-RLHF
        # harmless-base, PKU-SafeRLHF's safer response); the --data files the rest, labelled for helpfulness
        other, safety = read_gated(args.data, args.safety_data, args.format)
        if args.safety_fraction is not None and safety:
            n_other = round(len(safety) * (1 - args.safety_fraction) / max(args.safety_fraction, 1e-9))
            other = random.Random(args.seed).sample(other, min(n_other, len(other)))
        pairs = other + safety
        if args.val_data or args.safety_val_data:
            val_other, val_safety = read_gated(args.val_data, args.safety_val_data, args.format)
            val = [p for group in (val_other, val_safety)
                   for p in group[::max(1, math.ceil(len(group) / args.val_pairs))]]
            train = pairs
        else:
            val, train = pairs[::20][:args.val_pairs], [p for i, p in enumerate(pairs) if i % 20]
    return encode(tok, train, max_len), encode(tok, val, max_len)


def read_gated(paths, safety_paths, fmt):
    """(pairs of paths labelled for helpfulness, pairs of safety_paths labelled for safety), each with its flag."""
    return ([dict(p, safety=False) for path in paths for p in data.read_preferences(path, "helpfulness", fmt)],
            [dict(p, safety=True) for path in safety_paths for p in data.read_preferences(path, "safety", fmt)])


def encode(tok, pairs, max_len):
    """data.encode_pairs rows, each with its pair's safety flag; over-long pairs skipped with a counted warning."""
    rows = [dict(row, safety=p["safety"]) for p, row in zip(pairs, data.encode_pairs(tok, pairs, math.inf))]
    kept = [r for r in rows if max(len(r["chosen"]), len(r["rejected"])) <= max_len]
    if len(kept) < len(rows):
        warnings.warn(f"skipped {len(rows) - len(kept)} of {len(rows)} pairs longer than {max_len} tokens")
    return kept


@dataclass
class PairBatch:
    """B encoded pairs as one batch of 2B right-padded rows, the B chosen answers then the B rejected ones, so one
    forward pass scores both: tokens, attention_mask and answer_mask, each (2B, T); answer_mask is 1 on the answer
    tokens (the final response and its </s>), 0 on the prompt and the padding."""
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor


def collate_pairs(rows, pad_id, device):
    """A PairBatch of data.encode_pairs rows."""
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    masks = [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows]
    batch = data.collate(seqs, pad_id, masks)
    return PairBatch(batch["tokens"].to(device), batch["attention_mask"].to(device), batch["loss_mask"].to(device))


def answer_logps(model, batch):
    """(B, 2) log-probs log pi(y|x) summed over answer tokens (chosen, rejected) and (B, 2) answer token counts |y|."""
    logp = token_logprobs(model, batch.tokens, batch.attention_mask)                # (2B, T-1)
    answer = (batch.answer_mask[:, 1:] * batch.attention_mask[:, 1:]).to(logp.dtype)
    sums, counts = (logp * answer).sum(1), answer.sum(1)                            # (2B,)
    return sums.view(2, -1).T, counts.view(2, -1).T                                 # (B, 2)


@torch.no_grad()
def reference_logps(ref_model, rows, tok, rt, batch_size):
    """(N, 2) answer log-probs of every pair under the frozen reference, computed once; each rank scores every
    world_size-th batch and a sum over ranks gathers them."""
    out = torch.zeros(len(rows), 2, device=rt.device)
    starts = list(range(0, len(rows), batch_size))[rt.rank::rt.world_size]
    for i in tqdm(starts, desc="reference log-probs", disable=not rt.is_main, leave=False):
        with runtime.autocast(rt):
            out[i:i + batch_size] = answer_logps(ref_model, collate_pairs(rows[i:i + batch_size], tok.pad_id,
                                                                          rt.device))[0].float()
    return runtime.all_reduce_sum(out, rt)


def prompt_ids(row):
    """The prompt's tokens: the chosen row up to its first answer token."""
    return row["chosen"][:row["chosen_mask"].index(1)]


@torch.no_grad()
def sampled_kl(policy, ref_model, prompts, tok, max_new_tokens, generator):
    """Monte-Carlo KL(pi || pi_ref) per response: mean over y ~ pi(.|x) of sum_t log pi(y_t) - log pi_ref(y_t)."""
    policy.eval()
    max_new = min(max_new_tokens, policy.config.max_seq_len - max(len(p) for p in prompts))
    responses = generate(policy, prompts, max_new, tok.eos_id, tok.pad_id, temperature=1.0, generator=generator)
    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    batch = {k: v.to(generator.device) for k, v in data.collate(seqs, tok.pad_id, masks).items()}
    answer = batch["loss_mask"][:, 1:].float()
    logratio = (token_logprobs(policy, batch["tokens"], batch["attention_mask"])
                - token_logprobs(ref_model, batch["tokens"], batch["attention_mask"]))   # (B, T-1)
    policy.train()
    return ((logratio * answer).sum(1)).mean().item()


@torch.no_grad()
def eval_pairs(policy, rows, ref_logps, loss_of, batch_size, pad_id, rt):
    """Held-out loss (loss_of(logps, ref_logps, lengths): the run's pair_loss) and preference accuracy, overall
    and on safety / other prompts."""
    policy.eval()
    losses, correct, n = torch.zeros(len(rows)), torch.zeros(len(rows), dtype=torch.bool), len(rows)
    for i in range(0, n, batch_size):
        chunk = rows[i:i + batch_size]
        with runtime.autocast(rt):
            logps, lengths = answer_logps(policy, collate_pairs(chunk, pad_id, rt.device))
        for j in range(len(chunk)):  # one pair at a time through the loss: its mean is then per pair
            losses[i + j] = loss_of(logps[j:j + 1].float(), ref_logps[i + j:i + j + 1], lengths[j:j + 1])[0].item()
        stats = loss_of(logps.float(), ref_logps[i:i + len(chunk)], lengths)[1]
        correct[i:i + len(chunk)] = (stats["chosen_reward"] > stats["rejected_reward"]).cpu()
    policy.train()
    safety = torch.tensor([r["safety"] for r in rows], dtype=torch.bool)
    rate = lambda x, sel: x[sel].float().mean().item() if sel.any() else float("nan")  # noqa: E731
    every = torch.ones(n, dtype=torch.bool)
    return dict(val_loss=rate(losses, every), val_accuracy=rate(correct, every),
                val_loss_safety=rate(losses, safety), val_accuracy_safety=rate(correct, safety),
                val_loss_other=rate(losses, ~safety), val_accuracy_other=rate(correct, ~safety))


def show_samples(policy, prompts, tok, max_new_tokens, rt):
    """Print the policy's greedy answers to a few held-out prompts (rank 0; every rank answers, as --fsdp needs)."""
    policy.eval()
    outs = generate(policy, prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.0)
    policy.train()
    for prompt, out in zip(prompts, outs):
        runtime.print0(rt, f"  > {tok.decode(prompt)[-70:]}\n    {tok.decode(out)}")


# ---------------------------------------------------------------------------------------------- training step
def preference_step(train_model, ref_model, rows, ref_logps, loss_of, micro, batch_size, pad_id, rt):
    """Forward and backward of loss_of (the run's pair_loss) over this rank's encoded pairs `rows`, in micro-batches
    of `micro` pairs (DDP syncs the gradient on the last). The reference's answer log-probs are ref_logps
    (len(rows), 2), precomputed, or ref_model's when ref_logps is None (--ref-on-the-fly). Returns the global
    batch's mean loss, chosen reward, rejected reward and accuracy."""
    sums = torch.zeros(4, device=rt.device)  # summed over this rank's pairs: loss, rewards, accuracy
    for j in range(0, len(rows), micro):
        chunk = rows[j:j + micro]
        batch = collate_pairs(chunk, pad_id, rt.device)
        if ref_logps is None:
            with torch.no_grad(), runtime.autocast(rt):
                chunk_ref = answer_logps(ref_model, batch)[0].float()
        else:
            chunk_ref = ref_logps[j:j + micro]
        with runtime.no_sync(train_model, last=j + micro >= len(rows)):
            with runtime.autocast(rt):
                logps, lengths = answer_logps(train_model, batch)
            loss, stats = loss_of(logps.float(), chunk_ref, lengths)
            # a mean over the global batch whatever the split; DDP averages over ranks, hence * world_size
            (loss * len(chunk) / batch_size * rt.world_size).backward()
        sums += torch.stack([loss.detach() * len(chunk), stats["chosen_reward"].sum(),
                             stats["rejected_reward"].sum(),
                             (stats["chosen_reward"] > stats["rejected_reward"]).float().sum()])
    return (runtime.all_reduce_sum(sums, rt) / batch_size).tolist()


# ---------------------------------------------------------------------------------------------- config
# The architecture comes from --init; a preset sets only the training schedule. tiny: sized for a few CPU
# minutes on the tiny SFT model (beta, lr and steps chosen by a sweep on the validation split).
PRESETS = {
    "tiny": dict(steps=120, batch_size=32, lr=3e-5, warmup=10, eval_every=40),
    "small": dict(steps=1000, batch_size=64, lr=5e-7, warmup=100, eval_every=200),
    "1b": dict(steps=2000, batch_size=64, lr=5e-7, warmup=150, eval_every=250),
}
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "cdpo": 0.1, "rpo": 0.1, "simpo": 2.0}  # the papers' usual values


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="default schedule (the architecture "
                   "comes from --init)")
    p.add_argument("--init", required=True, help="checkpoint of the policy's start and the frozen reference (the "
                   "SFT model)")
    runtime.add_run_arguments(p, outputs="model.pt, config.json, metrics.jsonl",
                              seed_help="random seed (world, batch order, label noise, KL samples)")
    runtime.add_sharding_arguments(p)
    # loss
    p.add_argument("--loss", choices=LOSSES, default="dpo", help="member of the DPO family (see the module doc)")
    p.add_argument("--beta", type=runtime.positive_float, default=None, help="inverse temperature of the implicit "
                   f"reward; default per loss: {DEFAULT_BETA}")
    p.add_argument("--label-smoothing", type=runtime.nonnegative_float, default=0.1, help="cdpo: assumed "
                   "probability that a label is flipped, below 0.5")
    p.add_argument("--rpo-alpha", type=runtime.nonnegative_float, default=1.0, help="rpo: weight of the chosen "
                   "answers' per-token NLL")
    p.add_argument("--gamma", type=runtime.nonnegative_float, default=1.0, help="simpo: target reward margin")
    p.add_argument("--ref-on-the-fly", action="store_true", help="run the reference model every step instead of "
                   "scoring all pairs once before training (same numbers, more compute, less memory)")
    # data
    p.add_argument("--data", nargs="*", default=["world"], help="'world' (embedded preference pairs) or files "
                   "of pairs on prompts that are not safety prompts, labelled for helpfulness: generic JSONL "
                   "{'prompt', 'chosen', 'rejected'}, HH-RLHF (.jsonl, .jsonl.gz) or PKU-SafeRLHF")
    p.add_argument("--safety-data", nargs="*", default=[], help="files of pairs on safety prompts, labelled for "
                   "safety (e.g. HH-RLHF harmless-base; PKU-SafeRLHF takes its safer response)")
    p.add_argument("--format", choices=("auto", "jsonl", "hh", "pku"), default="auto", help="file format of "
                   "--data and --safety-data (auto: from the first row)")
    p.add_argument("--pairs", choices=("llama2", "safety", "helpfulness"), default="llama2", help="world: which "
                   "annotator labels each pair; llama2 = safety on safety prompts, helpfulness on the rest")
    p.add_argument("--label-noise", type=runtime.nonnegative_float, default=0.1, help="world: share of training "
                   "pairs whose label is flipped, below 0.5 (the reward models train with 0.1)")
    p.add_argument("--styles-per-prompt", type=runtime.positive_int, default=2, help="world: candidate responses "
                   f"per prompt, 2 to {len(world.STYLES)}; k responses give up to k(k-1)/2 pairs")
    p.add_argument("--safety-fraction", type=runtime.nonnegative_float, default=None, help="files: keep a random "
                   "subset of the --data pairs so that --safety-data's make up this share of the training pairs, 0 "
                   "to 1 (default: every pair, as the files come)")
    p.add_argument("--val-pairs", type=runtime.positive_int, default=256, help="held-out pairs for eval loss and "
                   "accuracy, whose prompts the KL estimate samples (world: noise-free pairs on validation prompts; "
                   "files: every 20th pair, or --val-data and --safety-val-data, up to this many of each)")
    p.add_argument("--val-data", nargs="*", default=[], help="held-out helpfulness pairs (files; with "
                   "--safety-val-data they replace the every-20th split, and every training pair is trained on)")
    p.add_argument("--safety-val-data", nargs="*", default=[], help="held-out safety pairs (files); their loss and "
                   "accuracy are val_loss_safety and val_accuracy_safety")
    # the stage's own check (pipeline.sh sets it for the real model)
    p.add_argument("--max-safety-val-loss", type=runtime.positive_float, default=None, help="after training (and "
                   "saving), fail unless the held-out safety pairs' loss is below this (ln 2 = 0.693 is the "
                   "untrained policy's DPO loss; default: no check)")
    p.add_argument("--min-safety-val-accuracy", type=runtime.nonnegative_float, default=None, help="after "
                   "training, fail unless the implicit reward ranks at least this share of the held-out safety "
                   "pairs right (default: no check)")
    # optimisation
    p.add_argument("--steps", type=runtime.positive_int, help="optimizer steps")
    p.add_argument("--batch-size", type=runtime.positive_int, help="global batch in pairs per optimizer step")
    p.add_argument("--grad-accum", type=runtime.positive_int, default=1, help="micro-batches per step (the batch "
                   "is split into them)")
    p.add_argument("--lr", type=runtime.positive_float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=runtime.nonnegative_float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=runtime.nonnegative_int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=runtime.nonnegative_float, default=0.0, help="AdamW decay on matrices; 0 "
                   "keeps the policy pulled only toward the reference, through the loss")
    p.add_argument("--grad-clip", type=runtime.positive_float, default=1.0, help="max gradient norm")
    # bookkeeping
    p.add_argument("--eval-every", type=runtime.positive_int, help="steps between held-out evaluations, KL "
                   "estimates and samples")
    p.add_argument("--kl-prompts", type=runtime.positive_int, default=32, help="held-out prompts sampled for the "
                   "KL estimate")
    p.add_argument("--max-new-tokens", type=runtime.positive_int, default=48, help="tokens per sampled response "
                   "(KL, samples)")
    p.add_argument("--save-every", type=runtime.positive_int, default=100, help="steps between checkpoints")
    p.add_argument("--keep-every", type=runtime.nonnegative_int, default=0, help="also keep the policy's weights "
                   "every this many steps as OUT/policy_<step>.pt, a checkpoint evaluate.py reads: the stage at "
                   "several strengths (0: none)")
    args = runtime.parse_args(p, PRESETS, argv)
    if args.beta is None:
        args.beta = DEFAULT_BETA[args.loss]
    if args.data != ["world"] and "world" in args.data or args.safety_data and args.data == ["world"]:
        p.error("--data is either 'world' or a list of files; --safety-data goes with files (an empty --data "
                "trains on --safety-data alone)")
    if args.data == ["world"] and (args.val_data or args.safety_val_data or args.safety_fraction is not None):
        p.error("--val-data, --safety-val-data and --safety-fraction go with files")
    if args.safety_fraction is not None and not 0 < args.safety_fraction <= 1:
        p.error(f"--safety-fraction must be above 0 and at most 1, got {args.safety_fraction}")
    if args.data != ["world"] and args.pairs != "llama2":
        p.error("--pairs picks the world's annotator; with files, --safety-data holds the safety-labelled pairs")
    if not args.label_smoothing < 0.5 or not args.label_noise < 0.5:
        p.error("need --label-smoothing and --label-noise below 0.5")
    if not 2 <= args.styles_per_prompt <= len(world.STYLES):
        p.error(f"--styles-per-prompt must be 2 to {len(world.STYLES)}, got {args.styles_per_prompt}")
    return args


def main(args):
    rt, ckpt_path, resume = runtime.start(args, stage="dpo")
    if resume is not None and os.path.abspath(resume["args"]["init"]) != os.path.abspath(args.init):
        raise runtime.UserError(f"{ckpt_path} was trained against the reference {resume['args']['init']}, not "
                                f"--init {args.init}; pass the same --init to resume")

    # ------------------------------------------------------------------ models: policy and frozen reference
    policy, tok, ckpt = loaders.load_policy(resume if resume is not None else args.init, rt.device)
    ref_model, ref_ckpt = loaders.load_any_model(args.init, rt.device)
    ref_model.eval().requires_grad_(False)
    if ckpt["tokenizer"] != ref_ckpt["tokenizer"]:
        raise runtime.UserError(f"{ckpt_path} and {args.init} use different tokenizers")

    # ------------------------------------------------------------------ data, the reference's log-probs
    train_rows, val_rows = load_pairs(args, tok, policy.config.max_seq_len)
    if not train_rows or not val_rows:
        raise runtime.UserError(f"no usable preference pairs in {args.data + args.safety_data} ({len(train_rows)} "
                                f"train, {len(val_rows)} held out)")
    micro = runtime.micro_batch_size(args.batch_size, args.grad_accum, rt)
    runtime.print0(rt, f"dpo ({args.loss}, beta {args.beta}): {len(train_rows)} train pairs "
                       f"({sum(r['safety'] for r in train_rows)} on safety prompts), {len(val_rows)} held out, "
                       f"{num_params(policy) / 1e6:.2f}M parameters on {rt.device}")
    # the reference never changes: score every pair once (or, with --ref-on-the-fly, inside the loop)
    val_ref = reference_logps(ref_model, val_rows, tok, rt, args.batch_size)
    train_ref = None if args.ref_on_the_fly else reference_logps(ref_model, train_rows, tok, rt, args.batch_size)
    kl_prompts = [prompt_ids(r) for r in val_rows[::max(1, len(val_rows) // args.kl_prompts)][:args.kl_prompts]]
    kl_generator = torch.Generator(device=rt.device)

    def loss_of(logps, ref_logps, lengths):  # the --loss member with this run's numbers
        return pair_loss(args.loss, logps, ref_logps, lengths, args.beta, args.label_smoothing, args.rpo_alpha,
                         args.gamma)

    # ------------------------------------------------------------------ optimizer, resume, run folder
    runtime.distribute(policy, rt, args.fsdp, args.activation_checkpointing)  # before its optimizer is built
    optimizer = runtime.make_optimizer(policy, args.lr, args.weight_decay, freeze=args.freeze_layers)
    step = runtime.resume_training(rt, resume, {"optimizer": optimizer}, ckpt_path, policy)
    train_model = runtime.wrap_ddp(policy, rt, args.compile)
    log = runtime.begin(args, rt, step)

    def save():
        runtime.save_on_rank0(rt, ckpt_path, runtime.checkpoint(policy, tok, step, args, "dpo",
                                                                {"optimizer": optimizer}))

    # ------------------------------------------------------------------ training loop
    metrics = {}
    bar = tqdm(total=args.steps, initial=step, disable=not rt.is_main, desc=f"dpo/{args.loss}")
    with runtime.StopOnSignal() as stop:
        while step < args.steps:
            stop.save_and_exit_if_requested(rt, save, ckpt_path, f"step {step}")  # Ctrl-C, SIGTERM
            lr = runtime.set_lr(optimizer, step, args.steps, args)
            idx = data.step_indices(len(train_rows), args.batch_size, step, args.seed, rt.rank, rt.world_size)
            loss_value, chosen_reward, rejected_reward, accuracy = preference_step(
                train_model, ref_model, [train_rows[i] for i in idx], None if train_ref is None else train_ref[idx],
                loss_of, micro, args.batch_size, tok.pad_id, rt)
            grad_norm = runtime.optimizer_step(policy, optimizer, loss_value, args.grad_clip, f"step {step}",
                                               ckpt_path)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{accuracy:.2f}",
                            margin=f"{chosen_reward - rejected_reward:.2f}")
            metrics = dict(loss=loss_value, chosen_reward=chosen_reward, rejected_reward=rejected_reward,
                           margin=chosen_reward - rejected_reward, accuracy=accuracy, lr=lr, grad_norm=grad_norm.item())

            # ---------------------------------------------------------- eval, KL, samples, checkpoint
            if step % args.eval_every == 0 or step == args.steps:
                metrics.update(eval_pairs(policy, val_rows, val_ref, loss_of, args.batch_size, tok.pad_id, rt))
                kl_generator.manual_seed(args.seed + step)
                metrics["kl"] = sampled_kl(policy, ref_model, kl_prompts, tok, args.max_new_tokens, kl_generator)
                runtime.print0(rt, f"step {step}: loss {loss_value:.4f} val_loss {metrics['val_loss']:.4f} "
                                   f"val_accuracy {metrics['val_accuracy']:.3f} kl {metrics['kl']:.2f}")
                show_samples(policy, kl_prompts[:3], tok, args.max_new_tokens, rt)
            log.log(step, **metrics)
            if step % args.save_every == 0 or step == args.steps:
                save()
            if args.keep_every and step % args.keep_every == 0:
                runtime.save_on_rank0(rt, os.path.join(args.out, f"policy_{step:04d}.pt"),
                                      runtime.checkpoint(policy, tok, step, args, "dpo", optimizers={}))
    bar.close()
    runtime.cleanup(rt)
    check_moved(args, metrics)
    return dict(metrics, step=step)


def check_moved(args, metrics):
    """The stage's own check on its held-out safety pairs (--max-safety-val-loss, --min-safety-val-accuracy)."""
    loss, accuracy = metrics.get("val_loss_safety", math.nan), metrics.get("val_accuracy_safety", math.nan)
    if args.max_safety_val_loss is not None and not loss < args.max_safety_val_loss or \
            args.min_safety_val_accuracy is not None and not accuracy >= args.min_safety_val_accuracy:
        raise runtime.UserError(f"dpo did not move enough: held-out safety pairs' loss {loss:.3f} (asked below "
                                f"{args.max_safety_val_loss}), accuracy {accuracy:.3f} (asked at least "
                                f"{args.min_safety_val_accuracy})")


if __name__ == "__main__":
    runtime.command(main, get_args)
