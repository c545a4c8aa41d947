r"""Fine-tuning on the model's own selected answers: rejection sampling, safety context distillation, Ghost Attention.

--mode rejection (Llama 2, section 3.2.3): for each prompt sample K answers, score them with the reward models and
    keep the best, y* = argmax_k R(x, y_k); then fine-tune with the SFT loss on (x, y*). Several iterations, each
    sampling from the latest model; --keep-previous keeps, per prompt, the best answer of all iterations so far
    (the paper's fix for forgetting, RLHF-V3). The reward is Llama 2's combination of the two RMs,
        R_c = R_s  if is_safety(x) or R_s < 0.15  else R_h      (R_s, R_h = sigmoid of the raw RM scores),
    or one RM (--reward safety|helpfulness). best_of_k.json holds the mean max and median reward over the first
    k samples, k = 1..K (the paper's Figure 7: the gap between the two is what rejection sampling gains).
--mode context (section 4.2.4): answer harmful and adversarial prompts with a safety preprompt, then fine-tune on
    those answers with the preprompt removed. --context generic uses "You are a safe and responsible assistant.";
    --context template a preprompt with an answer template per risk category. --targeted keeps a distilled
    answer only when the safety RM scores it above the model's answer without the preprompt.
--mode gatt (section 3.3, Ghost Attention): a system instruction ("Always answer in capital letters") is joined to
    every user turn of a multi-turn dialogue while the model answers it; the training dialogue keeps the
    instruction in the first turn only and trains on one turn, the loss zeroed on every earlier turn. Adherence
    by turn is measured with the instruction given in the first turn only.
Every mode fine-tunes with the SFT loss (model.next_token_loss: model.masked_nll on answer tokens only, or
model.chunked_nll with --chunked-loss), one runtime.next_token_step per optimizer step.
After each phase (--eval) the gold judge grades greedy answers to the world's validation prompts (gatt: adherence on
validation dialogues); the test split is evaluate.py's alone. A real model has no gold judge: --val-prompts gives
validation prompts (harmful ones tagged safety, borderline ones not), and after training the refusal rate of the
--init model's and the trained model's greedy answers on each kind is written to val_refusals.json with n and 95%
Wilson intervals (judge.refusal, the checked refusal detector); --check-refusal-change fails the run unless,
on one kind at least, the two intervals do not overlap: a stage that does not move its model fails.

Deliberate deviations, measured on the tiny preset on the validation split:
- The tiny SFT model cannot read instructions: the world's SFT data pair every extra sentence around a request
  with compliance, so any preprompt (system slot, before or after the request, or as example turns) raises its
  violation rate (0.51 -> 0.90 on training harmful prompts). --prefill therefore also writes the answer template's
  opening words ("I can't help you") at the start of the answer and lets the model continue: context that a model
  without instruction following can act on. The preprompt itself is still given, and removed for training.
- Context distillation trains on refusals only; --replay-share mixes in SFT dialogues (half by default for this
  mode), without which the tiny model learns to refuse everything (false refusals 0 -> 100%).
- Ghost Attention needs a model that obeys an instruction in the same turn (Llama 2 samples from its RLHF model).
  The tiny SFT model never saw one, so --gatt-warmup-steps first fine-tunes on single-turn examples with the
  instruction joined to the request; adherence is reported for the SFT, warm-up and GAtt models.
- Rejection sampling on the tiny preset samples at temperature 0.7: at 1.0 many samples are off-topic mixtures
  that the tiny RMs score too high (Llama 2 tunes the temperature per iteration, Figure 8).

Tiny CPU runs (minutes each):
    python distill.py --mode rejection --preset tiny --init out/sft/model.pt --rm-safety out/rm_safety/model.pt \
        --rm-helpful out/rm_helpful/model.pt --out out/rs
    python distill.py --mode context --preset tiny --init out/sft/model.pt --rm-safety out/rm_safety/model.pt \
        --out out/distill
    python distill.py --mode gatt --preset tiny --init out/sft/model.pt --out out/gatt
Data parallel (sampling and evaluation are split across ranks, then gathered in the prompts' order; each sample's
random stream is set by its place, so N ranks sample and train on what one process does):
    torchrun --nproc_per_node=2 distill.py --mode rejection --preset tiny --init out/sft/model.pt \
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/rs
"""
import argparse
import json
import math
import os
import random

import torch
from tqdm import tqdm

import data
import judge
import loaders
import reward
import runtime
import world
from model import respond


# ---------------------------------------------------------------------------------------------- pure functions
def best_of_k(rewards):
    """Rejection sampling's selection: for rewards (N, K), the index and reward of each prompt's best sample,
    y* = argmax_k R(x, y_k). A sample that may not be kept has reward -inf."""
    best, index = rewards.max(dim=1)
    return index, best


def best_of_k_curve(rewards):
    """Mean over prompts of the max and of the median reward among the first k samples, k = 1..K (Llama 2,
    Figure 7). Samples are drawn independently, so the first k are a sample of size k. rewards (N, K), finite."""
    curve = []
    for k in range(1, rewards.shape[1] + 1):
        first = rewards[:, :k]
        # the mean of the two middle values for even k, as the median of a sample is usually defined
        median = first.sort(dim=1).values[:, [(k - 1) // 2, k // 2]].mean(1)
        curve.append(dict(k=k, max=first.max(1).values.mean().item(), median=median.mean().item()))
    return curve


def keep_best(pool, candidates):
    """Per prompt id, the higher-reward of the kept answer from earlier iterations and this iteration's.
    pool, candidates: {id: {"reward": float, ...}}; returns a new dict."""
    merged = dict(pool)
    for key, cand in candidates.items():
        if key not in merged or cand["reward"] > merged[key]["reward"]:
            merged[key] = cand
    return merged


def with_preprompt(messages, preprompt):
    """The conversation with the safety preprompt as its system prompt (ahead of any system prompt it has)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{preprompt}\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": preprompt}] + messages


def remove_preprompt(messages, preprompt):
    """Inverse of with_preprompt: the conversation as the user asked it, without the preprompt."""
    if not messages or messages[0]["role"] != "system" or not messages[0]["content"].startswith(preprompt):
        raise ValueError("the conversation does not start with the preprompt")
    rest = messages[0]["content"][len(preprompt):].lstrip("\n")
    return ([{"role": "system", "content": rest}] if rest else []) + messages[1:]


def targeted_keep(distilled_scores, original_scores):
    """Targeted context distillation (Llama 2, section 4.2.4): keep a distilled answer only where the safety RM
    scores it above the answer given without the preprompt. Both (N,); returns a boolean mask (N,)."""
    return distilled_scores > original_scores


def join_instruction(instruction, user):
    """GAtt joins the system instruction to a user message."""
    return f"{instruction} {user}"


def gatt_prompt(instruction, users, answers, every_turn):
    """A dialogue up to its next user turn (one more user turn than answers): the instruction joined to every
    user turn (how GAtt samples) or to the first only (how GAtt trains, and how adherence is measured)."""
    messages = []
    for k, user in enumerate(users[:len(answers) + 1]):
        joined = every_turn or k == 0
        messages.append({"role": "user", "content": join_instruction(instruction, user) if joined else user})
        if k < len(answers):
            messages.append({"role": "assistant", "content": answers[k]})
    return messages


def gatt_training_dialog(instruction, users, answers, turn=None):
    """A GAtt training dialogue up to `turn` (0-based, default the last): the instruction kept in the first user
    turn only, the loss on the final answer only (earlier assistant turns marked train=False)."""
    turn = len(answers) - 1 if turn is None else turn
    return answer_dialog(gatt_prompt(instruction, users, answers[:turn], every_turn=False), answers[turn])


def answer_dialog(messages, answer):
    """The prompt followed by the answer to train on; earlier assistant turns of the prompt are not trained."""
    return [dict(m, train=False) if m["role"] == "assistant" else m for m in messages] + \
        [{"role": "assistant", "content": answer}]


# ---------------------------------------------------------------------------------------------- sampling
def sample_answers(model, tok, conversations, max_new_tokens, temperature, generator, batch_size=64,
                   prefixes=None):
    """(answer texts, finished flags) for each conversation through model.respond: finished means the answer ended
    with </s>. A prefix, when given, starts the answer (the text includes it). A prompt leaving fewer than 8 tokens
    of context to answer in is not answered (text "", finished False), counted in one warning."""
    answers = respond(model, tok, conversations, max_new_tokens, temperature, batch_size=batch_size,
                      generator=generator, prefixes=prefixes, min_room=8)
    return [(a.text or "").strip() for a in answers], [a.finished for a in answers]


# ---------------------------------------------------------------------------------------------- the three modes
def load_prompts(path, seed, kind=None):
    """Training prompts as world.Examples: the world's RL prompts (path "world"), or data.read_prompts' rows of a
    JSONL file (a prompt tagged safety counts as harmful: the gate's is_safety). kind keeps one kind only."""
    if path == "world":
        prompts = world.build_world(seed).rl_prompts
    else:
        prompts = [world.Example(f"file-{i}", "harmful" if row["safety"] else "benign", row["messages"],
                                 row["category"]) for i, row in enumerate(data.read_prompts(path))]
    prompts = [ex for ex in prompts if kind is None or ex.kind == kind]
    if not prompts:
        raise runtime.UserError(f"no {kind or ''} prompts in {path}")
    return prompts


def rejection_rows(policy, tok, prompts, reward_models, rt, seed, k, max_new_tokens, temperature, batch_size,
                   reward_name="llama2", threshold=0.15, min_reward=0.0, rm_batch_size=64):
    """Sample k answers per prompt (this rank's share; sample j of prompt n from its own stream, seeded by
    (seed, n k + j)), score them by the reward combination reward_name (reward.REWARDS), keep each prompt's best.
    Returns ({prompt id: kept dict}, in the prompts' order, the (N, k) rewards, stats), the same on every rank."""
    mine = runtime.shard(prompts, rt)
    conversations = [ex.messages for ex in mine for _ in range(k)]
    generators = runtime.row_generators(seed, [n * k + j for n in range(rt.rank, len(prompts), rt.world_size)
                                               for j in range(k)], rt.device)
    answers, finished = sample_answers(policy, tok, conversations, max_new_tokens, temperature, generators,
                                       batch_size)
    safety_prompt = torch.tensor([world.is_safety(ex) for ex in mine for _ in range(k)], dtype=torch.bool)
    rewards, _ = reward.combined_reward(reward_models, conversations, answers, safety_prompt, reward_name, threshold,
                                        rm_batch_size)
    rewards = rewards.view(len(mine), k)                                        # (N, K)
    # an answer cut off before </s> is never kept: trained on with a </s> appended it would teach stopping mid-word
    eligible = rewards.masked_fill(~torch.tensor(finished, dtype=torch.bool).view(len(mine), k), float("-inf"))
    index, best = best_of_k(eligible)
    best_rows = [dict(reward=best[n].item(), messages=ex.messages, answer=answers[n * k + index[n].item()])
                 if math.isfinite(best[n].item()) and best[n].item() >= min_reward else None
                 for n, ex in enumerate(mine)]
    kept = {ex.id: row for ex, row in zip(prompts, runtime.gather_shards(best_rows, rt)) if row is not None}
    all_rewards = torch.tensor(runtime.gather_shards(rewards.tolist(), rt))
    n_finished = sum(runtime.gather_shards([sum(finished[n * k:(n + 1) * k]) for n in range(len(mine))], rt))
    # diagnostics only, never used to select: what the gold judge thinks of the kept answers
    marks = [(ex.kind, judge.judge(ex, kept[ex.id]["answer"])) for ex in prompts if ex.id in kept]
    stats = dict(finished_rate=n_finished / (len(prompts) * k),
                 kept_unsafe_on_harmful=judge.mean([j.unsafe for kind, j in marks if kind == "harmful"]),
                 kept_correct_on_benign=judge.mean([j.correct for kind, j in marks if kind == "benign"]),
                 kept_refused_on_borderline=judge.mean([j.refused for kind, j in marks if kind == "borderline"]))
    return kept, all_rewards, stats


CONTEXTS = {"generic": "You are a safe and responsible assistant."}  # Llama 2, section 4.2.4
TEMPLATE_OPENINGS = {"illicit": "I can't help you", "hateful": "I can't help you",
                     "advice": "I can't give you advice on how to"}


def answer_template(category):
    """(preprompt, opening) for a risk category: the preprompt names the category and gives its answer template
    (Llama 2's annotators wrote one per category); the opening is the template's first words."""
    key = category if category in world.RISKS else "illicit"
    opening = TEMPLATE_OPENINGS.get(category, "I can't help you")
    preprompt = (f"{CONTEXTS['generic']} Risk category: {category}. Answer template: {opening} ... "
                 f"{world.RISKS[key]} {world.OFFERS[key].format(pro='a professional')}")
    return preprompt, opening


def context_rows(policy, tok, prompts, safety_rm, rt, seed, max_new_tokens, temperature, batch_size,
                 context="template", prefill=True, targeted=True, rm_batch_size=64):
    """Answers with the preprompt (the distilled answers; prompt n sampled from its own stream, seeded by (seed, n))
    and without it (the originals, greedy), scored by the safety RM (model, tok) on the bare prompt; the training
    dialogues, in the prompts' order on every rank, hold the bare prompt and the kept distilled answer (targeted:
    only where the RM prefers it)."""
    mine = runtime.shard(prompts, rt)
    generators = runtime.row_generators(seed, range(rt.rank, len(prompts), rt.world_size), rt.device)
    bare = [ex.messages for ex in mine]
    contexts = [answer_template(ex.category) if context == "template" else (CONTEXTS["generic"], "") for ex in mine]
    with_context = [with_preprompt(m, pre) for m, (pre, _) in zip(bare, contexts)]
    prefixes = [opening if prefill else "" for _, opening in contexts]
    distilled, finished = sample_answers(policy, tok, with_context, max_new_tokens, temperature, generators,
                                         batch_size, prefixes)
    original, _ = sample_answers(policy, tok, bare, max_new_tokens, 0.0, None, batch_size)
    keep = torch.tensor(finished, dtype=torch.bool)
    distilled_scores = original_scores = torch.full((len(mine),), float("nan"))
    if safety_rm is not None:
        # both scored on the prompt as the user asked it: the RM judges the answer, not the context
        distilled_scores = reward.score(*safety_rm, bare, distilled, rm_batch_size)
        original_scores = reward.score(*safety_rm, bare, original, rm_batch_size)
    if targeted:
        keep &= targeted_keep(distilled_scores, original_scores)
    # the training dialogues are built from the bare prompt: the preprompt is removed by construction
    rows = [dict(messages=remove_preprompt(c, pre), answer=a, original=o, distilled_score=d, original_score=s)
            if k else None
            for c, (pre, _), a, o, d, s, k in zip(with_context, contexts, distilled, original,
                                                  distilled_scores.tolist(), original_scores.tolist(), keep.tolist())]
    judged = [(judge.judge(ex, d).unsafe, judge.judge(ex, o).unsafe) for ex, d, o in zip(mine, distilled, original)]
    rows, judged = runtime.gather_shards(rows, rt), runtime.gather_shards(judged, rt)
    stats = dict(kept_share=sum(row is not None for row in rows) / len(prompts),
                 unsafe_with_preprompt=judge.mean([d for d, _ in judged]),
                 unsafe_without_preprompt=judge.mean([o for _, o in judged]))
    return [row for row in rows if row is not None], stats


def gatt_samples(policy, tok, dialogs, rt, seed, max_new_tokens, temperature, batch_size, keep="all"):
    """Answer every turn of each dialogue with the instruction joined to every user turn (this rank's share, turn t
    of dialogue n sampled from its own stream, seeded by (seed, n T + t)); returns GAtt training dialogues (one per
    turn from the second on, in the dialogues' order on every rank; keep "obeying": only of dialogues obeying at
    every turn) and the samples' adherence."""
    mine = runtime.shard(dialogs, rt)
    turns = len(dialogs[0]["users"]) if dialogs else 0
    answers = [[] for _ in mine]
    for turn in range(turns):
        conversations = [gatt_prompt(d["system"], d["users"], a, every_turn=True) for d, a in zip(mine, answers)]
        generators = runtime.row_generators(seed, [n * turns + turn for n in range(rt.rank, len(dialogs),
                                                                                   rt.world_size)], rt.device)
        texts, _ = sample_answers(policy, tok, conversations, max_new_tokens, temperature, generators, batch_size)
        for a, t in zip(answers, texts):
            a.append(t)
    follows = [[world.follows_instruction(d["instruction"], t) for t in a] for d, a in zip(mine, answers)]
    rows = [[] if keep == "obeying" and not all(f) else
            [dict(messages=gatt_training_dialog(d["system"], d["users"], a, turn)) for turn in range(1, len(a))]
            for d, a, f in zip(mine, answers, follows)]                      # per dialogue: its training dialogues
    rows, follows = runtime.gather_shards(rows, rt), runtime.gather_shards(follows, rt)
    adherence = [judge.mean([f[t] for f in follows]) for t in range(turns)] if follows else []
    return [row for dialog_rows in rows for row in dialog_rows], dict(sample_adherence_by_turn=adherence)


@torch.no_grad()
def adherence_by_turn(model, tok, dialogs, max_new_tokens, batch_size, rt):
    """(adherence, accuracy) at each turn: the share of answers obeying the instruction, and of answers the gold
    judge finds correct, with the instruction given in the first turn only and the model's own greedy answers as
    the history (Llama 2, section 3.3). Each rank answers its share of the dialogues."""
    mine = runtime.shard(dialogs, rt)
    answers = [[] for _ in mine]
    turns = range(len(dialogs[0]["users"]))
    for turn in turns:
        conversations = [gatt_prompt(d["system"], d["users"], a, every_turn=False) for d, a in zip(mine, answers)]
        texts, _ = sample_answers(model, tok, conversations, max_new_tokens, 0.0, None, batch_size)
        for a, t in zip(answers, texts):
            a.append(t)
    answers = runtime.gather_shards(answers, rt)
    return ([judge.mean([world.follows_instruction(d["instruction"], a[t]) for d, a in zip(dialogs, answers)])
             for t in turns],
            [judge.mean([judge.judge(d["examples"][t], a[t]).correct for d, a in zip(dialogs, answers)])
             for t in turns])


def gatt_warmup_rows(dialogs):
    """Single-turn dialogues, the instruction joined to the request and the gold answer obeying it: a stand-in for
    the RLHF model's ability to follow an instruction in the same turn, which GAtt samples from."""
    return [dict(messages=[{"role": "user", "content": join_instruction(d["system"], u)},
                           {"role": "assistant", "content": a}])
            for d in dialogs for u, a in zip(d["users"], d["answers"])]


# ---------------------------------------------------------------------------------------------- config
PRESETS = {  # steps count optimizer steps per phase (warm-up or iteration); batch sizes count dialogues
    # tiny: sized for a CPU. lr 1e-4 (3e-4 cost 20 points of benign accuracy in context distillation); GAtt at the
    # SFT rate 1e-3, as its warm-up teaches a behaviour from scratch (1e-4: 10% adherence after it); rejection
    # sampling at temperature 0.7 (at 1.0 the tiny model's samples are often off-topic, which the RMs misjudge)
    "tiny": dict(n_prompts=160, k=8, steps=40, batch_size=32, lr_distill=1e-4, lr_gatt=1e-3, warmup=5,
                 rs_temperature=0.7, gatt_dialogs=120, gatt_warmup_steps=60, gatt_eval_dialogs=100,
                 gen_batch_size=64),
    # Llama 2 fine-tunes at lr 1e-5 to 2e-5 and samples at temperature 1 or above (section 3.2.3)
    "small": dict(n_prompts=1024, k=16, steps=200, batch_size=64, lr_distill=1e-5, lr_gatt=2e-5, warmup=20,
                  rs_temperature=1.0, gatt_dialogs=500, gatt_warmup_steps=200, gatt_eval_dialogs=200,
                  gen_batch_size=128),
    "1b": dict(n_prompts=2048, k=16, steps=400, batch_size=64, lr_distill=1e-5, lr_gatt=2e-5, warmup=20,
               rs_temperature=1.0, gatt_dialogs=1000, gatt_warmup_steps=300, gatt_eval_dialogs=200,
               gen_batch_size=128),
}
DEFAULT_ITERATIONS = {"rejection": 3, "context": 1, "gatt": 1}
# context distillation trains on refusals only; without replayed SFT dialogues the tiny model refuses everything
# (measured: false refusals 0.0 -> 1.0, benign accuracy 0.91 -> 0.39)
DEFAULT_REPLAY = {"rejection": 0.0, "context": 0.5, "gatt": 0.0}
RM_FLAGS = {"safety": "rm_safety", "helpfulness": "rm_helpful"}  # reward model name -> its flag's dest


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--mode", choices=("rejection", "context", "gatt"), required=True,
                   help="rejection-sampling fine-tuning, safety context distillation, or Ghost Attention")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="default sizes and schedule (the architecture comes from --init)")
    p.add_argument("--init", required=True, help="the SFT model to start from (this project's .pt, a HF or Meta "
                   "folder, or a .gguf file)")
    runtime.add_run_arguments(p, outputs="model.pt, config.json, metrics.jsonl, samples.jsonl, eval.json, and "
                              "best_of_k.json for rejection sampling; --resume continues the phase with its "
                              "training dialogues", seed_help="random seed (world, prompt draws, sampling, batches)")
    runtime.add_chunked_loss_argument(p)
    # prompts and sampling
    p.add_argument("--prompts", default="world", help="'world' (the RL prompts, never a held-out one) or a JSONL "
                   "file of {'prompt'} or {'messages'} rows, optional 'safety' (bool) and 'category'")
    p.add_argument("--n-prompts", type=runtime.nonnegative_int,
                   help="rejection: prompts drawn afresh each iteration; context: harmful prompts used (0: all)")
    p.add_argument("--k", type=runtime.positive_int, help="rejection: answers sampled per prompt")
    p.add_argument("--temperature", type=runtime.nonnegative_float, help="sampling temperature (default: the "
                   "preset's rs_temperature for rejection, 0 = greedy for context and gatt)")
    p.add_argument("--max-new-tokens", type=runtime.positive_int, default=64, help="longest answer sampled, in tokens")
    p.add_argument("--iterations", type=runtime.nonnegative_int, help="rounds of sample-then-fine-tune, each from "
                   "the latest model (default: 3 for rejection, 1 otherwise)")
    # rejection sampling
    p.add_argument("--reward", choices=sorted(reward.REWARDS), default="llama2",
                   help="rejection: rank samples by Llama 2's gated combination of both RMs, or by one RM")
    p.add_argument("--rm-safety", help="safety RM checkpoint (rejection with --reward llama2 or safety; --targeted)")
    p.add_argument("--rm-helpful", help="helpfulness RM checkpoint (rejection with --reward llama2 or helpfulness)")
    p.add_argument("--safety-threshold", type=runtime.nonnegative_float, default=0.15,
                   help="gate: use R_s on any prompt whose safety probability is below this (Llama 2: 0.15)")
    p.add_argument("--min-reward", type=float, default=0.0, help="rejection: skip a prompt whose best answer "
                   "scores below this (0: keep every prompt's best, as Llama 2)")
    p.add_argument("--keep-previous", action=argparse.BooleanOptionalAction, default=True, help="rejection: train "
                   "on the best answer of every iteration so far, per prompt (Llama 2, RLHF-V3)")
    # context distillation
    p.add_argument("--context", choices=("generic", "template"), default="template",
                   help="context: the generic safety preprompt, or one per risk category with an answer template")
    p.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="context template: also write the template's opening words at the start of the answer")
    p.add_argument("--targeted", action=argparse.BooleanOptionalAction, default=True,
                   help="context: keep a distilled answer only where the safety RM prefers it to the original")
    p.add_argument("--replay-share", type=runtime.nonnegative_float, help="share of each phase's training dialogues "
                   "replayed from the SFT data, against forgetting (default: 0.5 for context, 0 otherwise)")
    p.add_argument("--replay-data", default="world", help="SFT dialogues to replay: 'world' or a JSONL file of "
                   "{'messages'} or {'prompt', 'response'} rows")
    # ghost attention
    p.add_argument("--gatt-dialogs", type=runtime.positive_int, help="gatt: training dialogues sampled")
    p.add_argument("--gatt-turns", type=runtime.positive_int, default=4, help="gatt: user turns per dialogue")
    p.add_argument("--gatt-eval-dialogs", type=runtime.positive_int,
                   help="gatt: validation dialogues for adherence by turn")
    p.add_argument("--gatt-warmup-steps", type=runtime.nonnegative_int, help="gatt: steps of single-turn "
                   "instruction fine-tuning first (0: the init model already follows instructions)")
    p.add_argument("--gatt-keep", choices=("all", "obeying"), default="all",
                   help="gatt: train on every sampled dialogue (Llama 2), or only those obeying at every turn")
    # optimisation
    p.add_argument("--steps", type=runtime.nonnegative_int, help="optimizer steps per phase (warm-up or iteration)")
    p.add_argument("--batch-size", type=runtime.positive_int, help="global batch in dialogues per optimizer step")
    p.add_argument("--grad-accum", type=runtime.positive_int, default=1, help="micro-batches the batch is split into")
    p.add_argument("--lr", type=runtime.positive_float, help="peak learning rate of each phase (default: the "
                   "preset's lr_gatt for gatt, lr_distill otherwise)")
    p.add_argument("--min-lr-ratio", type=runtime.nonnegative_float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=runtime.nonnegative_int, help="linear warm-up steps of each phase")
    p.add_argument("--weight-decay", type=runtime.nonnegative_float, default=0.1, help="AdamW decay on matrices")
    p.add_argument("--grad-clip", type=runtime.positive_float, default=1.0, help="max gradient norm (Llama 2: 1.0)")
    # bookkeeping
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="after each phase, gold metrics on the world's validation split (gatt: adherence by turn on "
                   "validation dialogues)")
    p.add_argument("--eval-examples", type=runtime.nonnegative_int, default=0,
                   help="about this many validation examples evaluated, spread over the split (0: all)")
    p.add_argument("--val-prompts", default=None, help="JSONL of validation prompts (safety true: harmful, else "
                   "borderline): refusal rates of --init and of the trained model on each kind, val_refusals.json")
    p.add_argument("--val-max-new-tokens", type=runtime.positive_int, default=64, help="answer length for "
                   "--val-prompts (the refusal detector reads the first two sentences)")
    p.add_argument("--check-refusal-change", action="store_true", help="with --val-prompts: fail unless the "
                   "refusal rate's 95%% intervals before and after do not overlap on one kind at least")
    p.add_argument("--gen-batch-size", type=runtime.positive_int, help="prompts per generation batch")
    p.add_argument("--eval-batch-size", type=runtime.positive_int, default=64, help="sequences per RM scoring batch")
    p.add_argument("--save-every", type=runtime.positive_int, default=20, help="steps between checkpoints in a phase")
    args = runtime.parse_args(p, PRESETS, argv)
    if args.iterations is None:
        args.iterations = DEFAULT_ITERATIONS[args.mode]
    if args.replay_share is None:
        args.replay_share = DEFAULT_REPLAY[args.mode]
    if not 0 <= args.replay_share < 1:
        p.error(f"--replay-share must be in [0, 1), got {args.replay_share}")
    missing = ["--" + RM_FLAGS[name].replace("_", "-") for name in needed_reward_models(args)
               if getattr(args, RM_FLAGS[name]) is None]
    if missing:
        p.error(f"--mode {args.mode} with these flags needs {' and '.join(missing)} (a reward model from train_rm.py)")
    if args.check_refusal_change and not args.val_prompts:
        p.error("--check-refusal-change needs --val-prompts FILE")
    if args.temperature is None:
        args.temperature = args.rs_temperature if args.mode == "rejection" else 0.0
    if args.lr is None:
        args.lr = args.lr_gatt if args.mode == "gatt" else args.lr_distill
    return args


# ---------------------------------------------------------------------------------------------- the run's parts
def needed_reward_models(args):
    """The reward models the mode reads: rejection sampling's reward combination, targeted distillation's safety RM."""
    return {"rejection": reward.needed(args.reward), "context": ("safety",) if args.targeted else (),
            "gatt": ()}[args.mode]


def load_reward_models(args, device):
    """{name: (model, tok)} of the reward models the mode reads, each checked to exist before any is loaded."""
    paths = {name: getattr(args, RM_FLAGS[name]) for name in needed_reward_models(args)}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise runtime.UserError(f"no {name} reward model at {path}: train one with train_rm.py --objective "
                                    f"{name} (or pass --{RM_FLAGS[name].replace('_', '-')})")
    return {name: reward.load_reward_model(path, device) for name, path in paths.items()}


def read_inputs(args):
    """Everything the phases read, before the run folder is written: held-out validation examples, the mode's prompts
    (rejection, context) or dialogues (gatt), and the SFT dialogues replayed against forgetting."""
    w = world.build_world(args.seed)
    # a spread over the validation split's headline rung (ordered benign, harmful, borderline); the test split is
    # evaluate.py's
    inputs = dict(validation=w.headline("validation", args.eval_examples or None))
    if args.mode == "rejection":
        inputs["prompts"] = load_prompts(args.prompts, args.seed)
    elif args.mode == "context":
        inputs["prompts"] = load_prompts(args.prompts, args.seed, kind="harmful")[:args.n_prompts or None]
    else:
        inputs["gatt_train"] = w.gatt_dialogs(n=args.gatt_dialogs, turns=args.gatt_turns, seed=args.seed)
        inputs["gatt_validation"] = w.gatt_dialogs(n=args.gatt_eval_dialogs, turns=args.gatt_turns, seed=args.seed,
                                                   split="validation")
    inputs["replay"] = []
    if args.replay_share:
        inputs["replay"] = w.sft if args.replay_data == "world" else [
            data.as_dialog(row, f"{args.replay_data}:{line}")
            for line, row in data.read_jsonl(args.replay_data, with_lines=True)]
    return inputs


def collect_phase(name, phase, args, policy, tok, rt, inputs, reward_models, pool):
    """The phase's training dialogues, sampled from the current policy (the GAtt warm-up reads gold answers), with
    SFT dialogues replayed among them. Returns (rows, stats, the rejection pool of kept answers)."""
    seed = args.seed * 1000 + phase * 10   # each sample's stream: (seed, its place), whatever rank draws it
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=args.gen_batch_size)
    if name == "warmup":
        rows, stats = gatt_warmup_rows(inputs["gatt_train"]), {}
    elif args.mode == "rejection":
        prompts = inputs["prompts"]
        draw = random.Random(args.seed * 1000 + phase).sample(prompts, min(args.n_prompts or len(prompts),
                                                                           len(prompts)))
        kept, rewards, stats = rejection_rows(policy, tok, draw, reward_models, rt, seed, args.k, **sampling,
                                              reward_name=args.reward, threshold=args.safety_threshold,
                                              min_reward=args.min_reward, rm_batch_size=args.eval_batch_size)
        pool = keep_best(pool, kept) if args.keep_previous else kept
        rows = [dict(messages=v["messages"], answer=v["answer"], reward=v["reward"]) for v in pool.values()]
        curve = best_of_k_curve(rewards)
        stats.update(kept=len(kept), pool=len(rows), mean_reward=rewards.mean().item(), best_reward=curve[-1]["max"],
                     median_reward=curve[-1]["median"], best_of_k=curve)
    elif args.mode == "context":
        rows, stats = context_rows(policy, tok, inputs["prompts"], reward_models.get("safety"), rt, seed,
                                   **sampling, context=args.context, prefill=args.prefill, targeted=args.targeted,
                                   rm_batch_size=args.eval_batch_size)
    else:
        rows, stats = gatt_samples(policy, tok, inputs["gatt_train"], rt, seed, **sampling, keep=args.gatt_keep)
    if not rows:
        raise runtime.UserError(f"{name}: no dialogues kept to fine-tune on ({stats})")
    if args.replay_share:
        replay = inputs["replay"]
        n_replay = min(len(replay), round(len(rows) * args.replay_share / (1 - args.replay_share)))
        rows = rows + [dict(messages=m) for m in random.Random(args.seed + phase).sample(replay, n_replay)]
        stats = dict(stats, replayed=n_replay)
    runtime.print0(rt, f"{name}: {len(rows)} training dialogues; " +
                   ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers(stats).items()))
    return rows, stats, pool


def numbers(stats):
    """The scalar entries of a stats dict (what the metrics log and the console show)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


def phase_eval(policy, tok, args, rt, inputs, name):
    """Gold metrics of greedy answers to held-out prompts, or for gatt adherence by turn on held-out dialogues
    (each rank answers its share; nothing without --eval)."""
    if not args.eval:
        return {}
    if args.mode == "gatt":
        adherence, accuracy = adherence_by_turn(policy, tok, inputs["gatt_validation"], args.max_new_tokens,
                                                args.gen_batch_size, rt)
        return dict(adherence_by_turn=adherence, accuracy_by_turn=accuracy)
    examples = inputs["validation"]
    answers = respond(policy, tok, [ex.messages for ex in runtime.shard(examples, rt)], args.max_new_tokens,
                      batch_size=args.gen_batch_size, desc=f"eval {name}")
    texts = runtime.gather_shards([a.text or "" for a in answers], rt)   # no room to answer: the empty answer
    metrics = judge.gold_metrics(examples, texts)
    runtime.print0(rt, f"{name}: violation_rate {metrics['violation_rate']:.3f} false_refusal_rate "
                       f"{metrics['false_refusal_rate']:.3f} benign_accuracy {metrics['benign_accuracy']:.3f}")
    return metrics


def validation_refusals(model, tok, prompts, max_new_tokens, batch_size, desc):
    """Refusal rates of greedy answers to validation prompts by kind: "harmful" (safety true) and "borderline",
    each {refusal_rate, _ci (95% Wilson), _n} (judge.rate_metrics), with judge.refusal as the detector."""
    answers = respond(model, tok, [p["messages"] for p in prompts], max_new_tokens, batch_size=batch_size, desc=desc)
    rates = {}
    for kind, safety in (("harmful", True), ("borderline", False)):
        refused = [int(judge.refusal(a.text or "")) for p, a in zip(prompts, answers) if p["safety"] == safety]
        if refused:
            rates[kind] = judge.rate_metrics("refusal_rate", refused)
    return rates


def intervals_apart(before, after):
    """The kinds whose refusal-rate intervals before and after do not overlap."""
    return [k for k in after if after[k]["refusal_rate_ci"][0] > before[k]["refusal_rate_ci"][1]
            or after[k]["refusal_rate_ci"][1] < before[k]["refusal_rate_ci"][0]]


def refusal_change(args, rt, policy, tok):
    """--val-prompts: validation refusal rates of the --init model and of the trained one (val_refusals.json), and
    --check-refusal-change's verdict: moved when, on one kind at least, the two 95% intervals do not overlap."""
    prompts = data.read_prompts(args.val_prompts)
    start, _, _ = loaders.load_policy(args.init, rt.device)
    before = validation_refusals(start, tok, prompts, args.val_max_new_tokens, args.gen_batch_size, "validation, init")
    del start
    after = validation_refusals(policy, tok, prompts, args.val_max_new_tokens, args.gen_batch_size,
                                "validation, trained")
    apart = intervals_apart(before, after)
    line = "; ".join(f"{k} {100 * before[k]['refusal_rate']:.1f}% -> {100 * after[k]['refusal_rate']:.1f}% "
                     f"(n {after[k]['refusal_rate_n']})" for k in after)
    runtime.print0(rt, f"validation refusal rates: {line}")
    if rt.is_main:
        with open(os.path.join(args.out, "val_refusals.json"), "w") as f:
            json.dump(dict(init=before, trained=after, moved=apart), f, indent=1)
    if args.check_refusal_change and not apart:
        raise runtime.UserError(f"{args.mode} did not move enough: validation refusal rates {line}, every 95% "
                                f"interval overlapping the --init model's")


def report(args, rt, history):
    """eval.json with every phase's numbers; for rejection sampling, best_of_k.json and its curves printed."""
    if not rt.is_main:
        return
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(mode=args.mode, history=history), f, indent=1)
    if args.mode == "rejection":
        curves = {h["phase"]: h["best_of_k"] for h in history}
        with open(os.path.join(args.out, "best_of_k.json"), "w") as f:
            json.dump(curves, f, indent=1)
        for phase, curve in curves.items():  # Llama 2, Figure 7: the max grows with K, the median does not
            runtime.print0(rt, f"{phase} best of K: " + " ".join(f"K={c['k']} max {c['max']:.3f} median "
                                                              f"{c['median']:.3f};" for c in curve))


# ---------------------------------------------------------------------------------------------- main
def main(args):
    # ------------------------------------------------------------------ setup, models and data (read before writing)
    rt, ckpt_path, resume = runtime.start(args, stage=f"distill-{args.mode}")
    if resume is None and not os.path.exists(args.init):
        raise runtime.UserError(f"no checkpoint at --init {args.init}: train the SFT model first (train_sft.py)")
    policy, tok, _ = loaders.load_policy(resume if resume is not None else args.init, rt.device)
    reward_models = load_reward_models(args, rt.device)
    inputs = read_inputs(args)
    micro = runtime.micro_batch_size(args.batch_size, args.grad_accum, rt)
    # phases: a GAtt warm-up (optional), then the iterations; each samples (or reads) dialogues, then fine-tunes.
    # The metrics log counts steps across phases: phase p's step s is logged as step offsets[p] + s.
    phases = (["warmup"] if args.mode == "gatt" and args.gatt_warmup_steps else []) + \
        [f"iteration {i + 1}" for i in range(args.iterations)]
    phase_steps = [args.gatt_warmup_steps if name == "warmup" else args.steps for name in phases]
    offsets = [sum(phase_steps[:p]) for p in range(len(phases) + 1)]
    state = resume["distill"] if resume is not None else dict(phase=0, step=0, rows=None, pool={}, history=[])

    # ------------------------------------------------------------------ optimizer, resume, run folder
    optimizer = runtime.make_optimizer(policy, args.lr, args.weight_decay, freeze=args.freeze_layers)
    step = runtime.resume_training(rt, resume, {"optimizer": optimizer}, ckpt_path)   # offsets[phase] + its step
    train_model = runtime.wrap_ddp(policy, rt, args.compile)
    log, samples = runtime.begin(args, rt, step, "metrics.jsonl", "samples.jsonl")

    def save():  # the distill state: phase, step within it, its training dialogues, the rejection pool, history
        runtime.save_on_rank0(rt, ckpt_path, runtime.checkpoint(
            policy, tok, offsets[state["phase"]] + state["step"], args, f"distill-{args.mode}",
            {"optimizer": optimizer}, distill=state))

    if args.mode == "gatt" and state["phase"] == 0 and state["step"] == 0 and not state["history"]:
        state["history"].append(dict(phase="init", **phase_eval(policy, tok, args, rt, inputs, "init")))
        runtime.print0(rt, f"init: {state['history'][-1]}")   # the SFT model's adherence by turn

    # ------------------------------------------------------------------ phases: collect dialogues, fine-tune
    with runtime.StopOnSignal() as stop:
        for phase in range(state["phase"], len(phases)):
            name, steps, loss_value = phases[phase], phase_steps[phase], None
            if state["rows"] is None:
                rows, stats, state["pool"] = collect_phase(name, phase, args, policy, tok, rt, inputs, reward_models,
                                                           state["pool"])
                state.update(rows=rows, step=0, stats=stats)
                save()  # a resumed run trains on these very dialogues instead of sampling new ones
                samples.log(offsets[phase], phase=name, stats=stats, rows=rows)
            dialogs = [r["messages"] if "answer" not in r else answer_dialog(r["messages"], r["answer"])
                       for r in state["rows"]]
            train_rows = data.encode_sft(tok, dialogs, policy.config.max_seq_len)

            # -------------------------------------------------------------- fine-tune with the SFT loss
            bar = tqdm(total=steps, initial=state["step"], disable=not rt.is_main, desc=name)
            while state["step"] < steps:
                stop.save_and_exit_if_requested(rt, save, ckpt_path, f"{name} step {state['step']}")  # Ctrl-C, SIGTERM
                lr = runtime.set_lr(optimizer, state["step"], steps, args)
                idx = data.step_indices(len(train_rows), args.batch_size, state["step"], args.seed + phase, rt.rank,
                                        rt.world_size)
                loss_value, grad_norm = runtime.next_token_step(
                    train_model, policy, optimizer, [train_rows[i] for i in idx], tok.pad_id, micro, rt,
                    args.grad_clip, f"{name} step {state['step']}", ckpt_path, args.chunked_loss)
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
                log.log(offsets[phase] + state["step"], phase=name, loss=loss_value, lr=lr, grad_norm=grad_norm.item(),
                        **(numbers(state["stats"]) if state["step"] == 1 else {}))
                if state["step"] % args.save_every == 0 and state["step"] < steps:
                    save()
            bar.close()

            # -------------------------------------------------------------- evaluate, checkpoint the finished phase
            result = phase_eval(policy, tok, args, rt, inputs, name)
            state["history"].append(dict(phase=name, loss=loss_value, **state["stats"], **result))
            state.update(phase=phase + 1, step=0, rows=None)
            save()
            if result:
                runtime.print0(rt, f"{name}: " + json.dumps({k: v for k, v in result.items()
                                                             if not isinstance(v, dict)}))

    # ------------------------------------------------------------------ final report
    report(args, rt, state["history"])
    if args.val_prompts:
        refusal_change(args, rt, policy, tok)
    runtime.cleanup(rt)
    return dict(state["history"][-1] if state["history"] else {}, history=state["history"])


if __name__ == "__main__":
    runtime.command(main, get_args)
