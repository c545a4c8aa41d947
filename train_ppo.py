"""PPO against two frozen reward models with a KL penalty to the SFT model (Llama 2, section 3.2.3).

One iteration of the RLHF loop, as main() writes it out; every quantity is a field of the iteration's Rollout:
1. Rollout: a batch of RL prompts, one response each, sampled from the policy (temperature 1, KV cache) and read
   by the policy (old_logp), the frozen reference (ref_logp) and the value model (old_values).
2. Reward: the safety and helpfulness RMs score every (prompt, response), raw scores r_s and r_h; Llama 2's
   piecewise combination and its whitening
       R_c = R_s  if is_safety(prompt) or R_s < 0.15  else R_h        (R_s, R_h = sigmoid(r_s), sigmoid(r_h))
       R~  = whiten(logit(R_c))                                     (mean 0, std 1 over the rollout batch)
   --reward safety|helpfulness trains on one RM alone (R_c = R_s or R_h) to show what the gate resolves.
3. KL penalty: the per-token reward R_t = -beta (log pi(y_t) - log pi_ref(y_t)) on every response token, R~ added
   at the last one, so the return is R(g|p) = R~_c(g|p) - beta KL(pi || pi_ref) of the paper's equation.
4. GAE(gamma, lambda) on the value model's estimates, advantages whitened over the batch's response tokens.
5. Several epochs of minibatches: clipped surrogate loss for the policy, clipped value loss for the value
   model, gradient clipping; optionally the adaptive KL controller of Ziegler et al. (2019) moves beta.
Logged each iteration (metrics.jsonl, means over the rollout): reward (what PPO maximises: R summed over each
response, R~ - beta KL), R_tilde, R_c, logit_R_c (the RMs' reward on their logit scale), r_s, r_h, kl (per
response), entropy, the losses, clip fractions, approx_kl, explained_variance and the gold judge's marks.

Variants, in a section of their own that a reader of the Llama 2 path can skip, each called from one place:
Safe RLHF's PPO-Lagrangian (--reward lagrangian) and ensembles of reward models (several paths after --rm-safety
or --rm-helpful, combined by --ensemble).

Responses that never emit </s> (cut at --max-new-tokens): as in OpenAI's lm-human-preferences and the PPO
implementations that follow it, their R~ is replaced by a fixed low value (--missing-eos-score, in whitened
units) instead of the RM's, so rambling is never rewarded; the last generated token is then the terminal step.

Deviations from the paper: Llama 2 takes one gradient step per minibatch (one epoch), batch 512, constant
lr 1e-6, beta 0.01 (7B/13B); the tiny preset uses 2 epochs, a larger lr and a batch of 128 so a 1M-parameter
model moves within a few CPU minutes, and a larger beta (0.2) because its small RMs are easier to exploit.
The value model is a separate network (initialised from an RM or from the policy, --value-init); Llama 2 does
not say how it initialised its value model.

PPO maximises what the RMs score, not what the gold judge grades: RMs trained only on the placeholder
compliance ("Step 1: [details omitted]") score "Sure, here is how to ..." followed by ordinary how-to text as
harmless, and the policy learns to answer wrapped harmful requests that way (violations rise). The world's
preference data therefore holds the compliances the SFT model actually samples (world.UNSAFE_FORMS), as Llama 2's
annotators rated samples of its own models (section 3.2.1).

Training-time evaluation (--eval-prompts, --eval-every): the gold judge on greedy answers to the world's validation
prompts, the split every tuning choice reads; the test split is evaluate.py's alone. --kl-range and --min-score-rise
check after training that the run moved: its last KL inside a declared range, its mean R_c risen from the first
quarter of the iterations to the last.

Tiny CPU run (minutes), after train_sft.py and train_rm.py:
    python train_ppo.py --preset tiny --init out/sft/model.pt --rm-safety out/rm_safety/model.pt \\
        --rm-helpful out/rm_helpful/model.pt --out out/ppo
Data parallel (each rank samples its share of the prompts; whitening, means and the KL controller read the whole
batch, and each response's sampling stream is set by its place in it, so N ranks compute what one process does):
    torchrun --nproc_per_node=2 train_ppo.py --preset tiny --init out/sft/model.pt \\
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/ppo
"""
import math
import os
import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
import judge
import loaders
import runtime
import world
from model import generate, num_params, respond, target_logprobs, token_logprobs
from reward import ENSEMBLES, REWARDS, combined_reward, load_reward_model


# ---------------------------------------------------------------------------------------------- the equations
# The Llama 2 gate R_c and the single-RM alternatives (--reward) live in reward.py (rejection sampling shares them)
def masked_mean(x, mask, total=None):
    """Mean of x where mask is 1. total, when the batch is split over ranks, completes a sum over all of them
    (runtime.sum_over_ranks): the mean is then the whole batch's."""
    total = total or (lambda s: s)
    return total((x * mask).sum()) / total(mask.sum()).clamp(min=1)


def whiten(x, mask=None, shift_mean=True, total=None):
    """(x - mean) / std over the entries where mask is 1 (all if None); shift_mean=False keeps the mean. total: mean
    and std of the whole batch when it is split over ranks (masked_mean)."""
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    mean = masked_mean(x, mask, total)
    var = masked_mean((x - mean) ** 2, mask, total)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalized_rewards(R_tilde, logp, ref_logp, response_mask, beta):
    """Per-token reward r_t = -beta (log pi(y_t) - log pi_ref(y_t)), plus the sequence's R~ at the last token
    (Llama 2 eq. 3 split over tokens as in Ziegler et al. 2019). R_tilde (B,); logp, ref_logp, response_mask (B, L),
    responses right-padded. Returns (rewards (B, L), per-token kl (B, L))."""
    kl = (logp - ref_logp) * response_mask
    rewards = -beta * kl
    last = response_mask.sum(1).long() - 1                                 # index of each response's last token
    rewards[torch.arange(len(R_tilde)), last] += R_tilde
    return rewards, kl


def gae(rewards, values, response_mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16):
    A_t = sum_l (gamma lam)^l delta_{t+l},  delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last token.
    rewards, values, response_mask (B, L) right-padded. Returns (advantages, returns = A + V), each (B, L)."""
    values = values * response_mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running                            # stays 0 through the right padding
        advantages[:, t] = running
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def policy_loss(logp, old_logp, adv, response_mask, clip):
    """Clipped surrogate (Schulman et al. 2017, eq. 7): L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)),
    rho_t = pi(y_t) / pi_old(y_t); mean over response tokens. All inputs (B, L)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask)
    with torch.no_grad():
        stats = dict(clip_frac=masked_mean((clipped > unclipped).float(), response_mask),
                     # k3 estimator of KL(pi_old || pi): (rho - 1) - log rho, unbiased and >= 0 (Schulman, 2020)
                     approx_kl=masked_mean(ratio - 1 - log_ratio, response_mask))
    return loss, stats


def value_loss(values, old_values, returns, response_mask, clip):
    """Clipped value loss (as in OpenAI baselines' PPO2): L_V = 1/2 mean_t max((V_t - R_t)^2,
    (V_old_t + clip(V_t - V_old_t, -eps, eps) - R_t)^2); mean over response tokens. All inputs (B, L)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(losses, response_mask)
    with torch.no_grad():
        stats = dict(value_clip_frac=masked_mean(((clipped_values - returns) ** 2 > (values - returns) ** 2).float(),
                                                 response_mask))
    return loss, stats


def explained_variance(values, returns, response_mask, total=None):
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect value model, 0 no better than the mean. total:
    over the whole batch when it is split over ranks (masked_mean)."""
    var_returns = masked_mean((returns - masked_mean(returns, response_mask, total)) ** 2, response_mask, total)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, response_mask, total)) ** 2, response_mask, total)
    return 1 - var_residual / var_returns.clamp(min=1e-8)


def adaptive_beta(beta, kl, target, gain=0.1):
    """Adaptive KL controller (Ziegler et al. 2019, section 2.2): beta <- beta (1 + K_beta e),
    e = clip((KL - KL_target) / KL_target, -0.2, 0.2); kl is the mean per-sequence KL of this rollout."""
    return beta * (1 + gain * min(max((kl - target) / target, -0.2), 0.2))


# ---------------------------------------------------------------------------------------------- the rollout
@dataclass
class Prompt:
    """An RL prompt: its token ids, its messages, the is_safety tag the gate reads, and the world's Example it asks
    (for the gold judge; None for prompts from a file)."""
    ids: list
    messages: list
    safety: bool
    example: object = None


@dataclass
class Rollout:
    """This rank's share of one iteration's batch: B prompts, one sampled response each, and every quantity PPO
    computes from them. A row is its prompt left-padded to P tokens, then its response right-padded to L tokens,
    so response token j sits at position P + j of every row; (B, L) fields cover the response, 0 on padding.
    Step 1 (rollout) fills the fields down to entropy, main's steps 2 to 4 the rest, in their order."""
    prompts: list                   # B Prompts
    texts: list                     # B decoded responses
    has_eos: torch.Tensor           # (B,) bool: the response ended with </s> (was not cut at --max-new-tokens)
    tokens: torch.Tensor            # (B, P + L)
    attention_mask: torch.Tensor    # (B, P + L), 1 on real tokens
    response_mask: torch.Tensor     # (B, L) float, 1 on response tokens
    P: int
    old_logp: torch.Tensor          # (B, L) log pi_old(y_j): the sampling policy's, before this iteration's update
    ref_logp: torch.Tensor          # (B, L) log pi_ref(y_j): the frozen SFT model's
    old_values: torch.Tensor        # (B, L) V_old of the state before y_j
    entropy: torch.Tensor           # (B, L) of the policy's next-token distribution, for the log
    # 2. reward, each (B,): raw RM scores (logit scale), their gate R_c (a probability), R~ = whiten(logit(R_c))
    r_s: torch.Tensor = None
    r_h: torch.Tensor = None
    R_c: torch.Tensor = None
    R_tilde: torch.Tensor = None
    # 3. KL penalty, (B, L): KL_t = log pi_old(y_t) - log pi_ref(y_t) and the reward R_t = -beta KL_t (+ R~ at the end)
    kl: torch.Tensor = None
    R: torch.Tensor = None
    # 4. GAE, (B, L): whitened advantages and returns A + V_old
    advantages: torch.Tensor = None
    returns: torch.Tensor = None


def rollout_batch(prompts, responses, pad_id):
    """Prompts left-padded to P, responses right-padded to L, joined: tokens and attention_mask (B, P + L),
    response_mask (B, L), and P. Response token j of a row sits at position P + j in every row."""
    P, L = max(len(p) for p in prompts), max(1, max(len(r) for r in responses))
    B = len(prompts)
    tokens = torch.full((B, P + L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + L, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, P - len(p):P + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
    return tokens, attention_mask, attention_mask[:, P:].float(), P


def response_logprobs(model, tokens, attention_mask, P):
    """(B, L): log pi(y_j | prompt, y_<j) of each response token (0 on padding)."""
    return token_logprobs(model, tokens, attention_mask)[:, P - 1:]        # target t+1 is predicted at t


def response_values(value_model, tokens, attention_mask, P):
    """(B, L): V of the state before each response token, read at the position that predicts it."""
    return value_model(tokens, attention_mask)[:, P - 1:-1].float() * attention_mask[:, P:]


@torch.no_grad()
def response_logprobs_and_entropy(model, tokens, attention_mask, P):
    """One forward pass of the policy, two readings: (B, L) response_logprobs (the same numbers) and (B, L) entropy
    of its next-token distribution at each response position (for logging)."""
    logits = model(tokens, attention_mask)[:, P - 1:-1].float()                 # (B, L, V): predicts token P + j
    mask = attention_mask[:, P:]
    all_logp = logits.log_softmax(-1)
    return target_logprobs(logits, tokens[:, P:]) * mask, -(all_logp.exp() * all_logp).sum(-1) * mask


def rollout(policy, ref_model, value_model, tok, prompts, iteration, sampler, args, rt):
    """Step 1: this rank's share of global batch `iteration`, one response sampled per prompt, read by the policy
    (old_logp, entropy), the reference (ref_logp) and the value model (old_values): a Rollout."""
    batch = [prompts[i] for i in data.step_indices(len(prompts), args.batch_size, iteration, args.seed,
                                                   rt.rank, rt.world_size)]
    policy.eval()
    responses = generate(policy, [p.ids for p in batch], args.max_new_tokens, tok.eos_id, tok.pad_id,
                         temperature=args.temperature, generator=sampler)
    tokens, attention_mask, response_mask, P = rollout_batch([p.ids for p in batch], responses, tok.pad_id)
    tokens, attention_mask, response_mask = (t.to(rt.device) for t in (tokens, attention_mask, response_mask))
    with torch.no_grad(), runtime.autocast(rt):
        old_logp, entropy = response_logprobs_and_entropy(policy, tokens, attention_mask, P)
        ref_logp = response_logprobs(ref_model, tokens, attention_mask, P)
        old_values = response_values(value_model, tokens, attention_mask, P)
    return Rollout(prompts=batch, texts=[tok.decode(r) for r in responses],
                   has_eos=torch.tensor([tok.eos_id in r for r in responses], device=rt.device), tokens=tokens,
                   attention_mask=attention_mask, response_mask=response_mask, P=P, old_logp=old_logp,
                   ref_logp=ref_logp, old_values=old_values, entropy=entropy)


# ---------------------------------------------------------------------------------------------- the reward
def gated_reward(batch, reward_models, gate, args, rt):
    """Step 2, the reward models: the raw scores r_s, r_h of every (prompt, response) of the rollout and their
    combination R_c = gate(R_s, R_h) of the sigmoid scores (reward.REWARDS: the Llama 2 gate, or one RM alone),
    a probability. Returns (r_s, r_h, R_c), each (B,)."""
    safety_prompt = torch.tensor([p.safety for p in batch.prompts], device=rt.device)
    R_c, raw = combined_reward(reward_models, [p.messages for p in batch.prompts], batch.texts, safety_prompt, gate,
                               args.safety_threshold, ensemble=args.ensemble)
    return raw["safety"].to(rt.device), raw["helpfulness"].to(rt.device), R_c.to(rt.device)


def whitened_reward(reward, has_eos, missing_eos_score, rt):
    """Step 2, the whitening: R~ = whiten(reward) (B,), mean 0 and std 1 over the rollout, with reward = logit(R_c);
    a response cut without </s> gets missing_eos_score instead (see the module docstring; None keeps its R~)."""
    R_tilde = whiten(reward, total=runtime.sum_over_ranks(rt))             # the whole rollout's, over every rank
    if missing_eos_score is not None:
        R_tilde = torch.where(has_eos, R_tilde, torch.full_like(R_tilde, missing_eos_score))
    return R_tilde


# ---------------------------------------------------------------------------------------------- the update
def ppo_epochs(train_policy, train_value, policy, value_model, optimizers, batch, shuffler, args, rt, where,
               ckpt_path):
    """Step 5: --ppo-epochs passes over the rollout in shuffled minibatches, each one guarded update of the policy
    and the value model together (separate networks and optimizers: each gets its own gradient). Under torchrun a
    minibatch takes minibatch_size / world_size of each rank's rows, shuffled by that rank. Returns the minibatches'
    {name: (sum, count)} of the losses, the policy's gradient norm and the loss diagnostics."""
    per_rank, mb = args.batch_size // rt.world_size, args.minibatch_size // rt.world_size
    P, stats = batch.P, {}
    policy.train()
    for _ in range(args.ppo_epochs):
        order = torch.randperm(per_rank, generator=shuffler)
        for start in range(0, per_rank, mb):
            idx = order[start:start + mb].to(rt.device)
            tokens, attention_mask, mask = batch.tokens[idx], batch.attention_mask[idx], batch.response_mask[idx]
            with runtime.autocast(rt):
                logp = response_logprobs(train_policy, tokens, attention_mask, P)
                values = response_values(train_value, tokens, attention_mask, P)
            pg_loss, pg_stats = policy_loss(logp, batch.old_logp[idx], batch.advantages[idx], mask, args.clip)
            vf_loss, vf_stats = value_loss(values, batch.old_values[idx], batch.returns[idx], mask, args.value_clip)
            # the losses are means over this rank's response tokens: weighted by the rank's share of the minibatch's
            # tokens (times world_size, which DDP's average divides out) they make the mean over all its tokens
            share = mask.sum() / runtime.all_reduce_sum(mask.sum(), rt).clamp(min=1) * rt.world_size
            loss = (pg_loss + vf_loss) * share
            loss.backward()
            grad_norm, _ = runtime.optimizer_step([policy, value_model], optimizers, loss.item(), args.grad_clip,
                                                  where, ckpt_path)
            token_means = dict(policy_loss=pg_loss, value_loss=vf_loss, **pg_stats, **vf_stats)
            for name, value in dict({k: v * share for k, v in token_means.items()}, grad_norm=grad_norm).items():
                s, n = stats.get(name, (0.0, 0))
                stats[name] = (s + value.item(), n + 1)
    return stats


# ---------------------------------------------------------------------------------------------- variants
# Off the Llama 2 path: each variant is called from one place (main's steps 2 and 6, load_models).

# Safe RLHF (Dai et al. 2023, section 3.3): maximise E[r_h] subject to E[C] <= d through the Lagrangian
# min_lambda>=0 max_theta E[r_h] - lambda (E[C] - d), solved by alternating PPO steps on theta and dual steps on lambda.
def lagrangian_reward(helpful, cost, lagrange_lambda):
    """Safe RLHF's per-sequence reward for a fixed multiplier: (r_h - lambda C) / (1 + lambda), the 1 / (1 + lambda)
    keeping its scale as lambda grows (Dai et al. 2023, section 3.3). helpful r_h, cost C (B,); lagrange_lambda >= 0."""
    return (helpful - lagrange_lambda * cost) / (1 + lagrange_lambda)


def lambda_update(log_lagrange, mean_cost, threshold, lr, max_lambda=math.inf):
    """One dual step (Dai et al. 2023, section 3.3): gradient ascent on lambda (E[C] - d) in log lambda, whose
    gradient is lambda (E[C] - d): ln lambda <- min(ln lambda + lr lambda (E[C] - d), ln lambda_max). lambda =
    exp(ln lambda) stays positive, grows while the batch's mean cost E[C] exceeds the threshold d and shrinks while
    it is below; the step grows with lambda, so the cap (as Safe RLHF's lambda_max) stops a runaway."""
    return min(log_lagrange + lr * math.exp(log_lagrange) * (mean_cost - threshold), math.log(max_lambda))


def lagrangian_rollout_reward(batch, reward_models, args, rt, lagrange_lambda):
    """--reward lagrangian, step 2: R~ = whiten(lagrangian_reward(r_h, C, lambda)) in place of whiten(logit(R_c)),
    on the raw scores, the cost C = -r_s (the safety RM's raw score, negated: high when it judges the answer unsafe).
    Fills the rollout's reward fields as step 2 does (R_c = R_h: no gate)."""
    batch.r_s, batch.r_h, batch.R_c = gated_reward(batch, reward_models, "helpfulness", args, rt)
    batch.R_tilde = whitened_reward(lagrangian_reward(batch.r_h, -batch.r_s, lagrange_lambda), batch.has_eos,
                                    args.missing_eos_score, rt)


def lagrangian_dual_step(batch, metrics, log_lagrange, args, rt):
    """--reward lagrangian, after the update: log the rollout's mean cost, its mean Lagrangian reward and the
    multiplier it was scored with (as "lambda"), then return ln lambda after one dual step on the mean cost."""
    lagrange_lambda, cost, n = math.exp(log_lagrange), -batch.r_s, len(batch.r_s)
    reward = lagrangian_reward(batch.r_h, cost, lagrange_lambda)
    metrics.update(reduce_means(dict(cost=(cost.sum().item(), n), lagrangian_reward=(reward.sum().item(), n)), rt))
    metrics["lambda"] = lagrange_lambda
    return lambda_update(log_lagrange, metrics["cost"], args.cost_threshold, args.lambda_lr, args.lambda_max)


# Reward-model ensembles (Coste et al. 2023): several reward models of one kind read as one.
def reward_model_or_ensemble(paths, device):
    """The frozen reward model (model, tok) at one path; at several, the list of them, which reward.combined_reward
    reads as one reward model whose raw score is their --ensemble combination (reward.ENSEMBLES)."""
    if len(paths) == 1:
        return load_reward_model(paths[0], device)
    return [load_reward_model(path, device) for path in paths]


# ---------------------------------------------------------------------------------------------- prompts and models
def encode_prompts(spec, tok, max_prompt_len, world_seed):
    """The RL prompts, encoded: a list of Prompt. spec: "world" (its RL prompts) or a JSONL file that
    data.read_prompts reads. Prompts longer than max_prompt_len tokens are skipped with a counted warning."""
    if spec == "world":
        rows = [dict(messages=ex.messages, safety=world.is_safety(ex), example=ex)
                for ex in world.build_world(world_seed).rl_prompts]
    else:
        rows = [dict(row, example=None) for row in data.read_prompts(spec)]
    prompts = []
    for row in rows:
        try:
            prompts.append(Prompt(tok.encode_prompt(row["messages"]), row["messages"], row["safety"], row["example"]))
        except ValueError as e:
            raise ValueError(f"{row.get('where', spec)}: {e} (expected 'messages' ending with a user turn, or "
                             f"'prompt')") from None
    kept = [p for p in prompts if len(p.ids) <= max_prompt_len]
    if len(kept) < len(prompts):
        tqdm.write(f"warning: skipped {len(prompts) - len(kept)} of {len(prompts)} prompts longer than "
                   f"{max_prompt_len} tokens (the context must also hold --max-new-tokens)")
    if not kept:
        raise runtime.UserError(f"no usable prompts in {spec}")
    return kept


def load_models(args, rt, resume):
    """policy (trained; the SFT model, or the resumed one) and its tokenizer, ref_model (the SFT model, frozen: it
    anchors the KL penalty), the two frozen reward models {"safety", "helpfulness"}: (model, tok), and the value
    model (a scalar-head network reading the policy's tokens, trained); checks that --max-new-tokens leaves room
    for a prompt. Built in this order: each Transformer draws its initial weights from the global RNG."""
    policy, tok, policy_ckpt = loaders.load_policy(resume if resume is not None else args.init, rt.device)
    ref_model, _ = loaders.load_any_model(args.init, rt.device)
    ref_model.eval().requires_grad_(False)
    # the two frozen reward models score text, so each reads it with its own tokenizer
    reward_models = {name: reward_model_or_ensemble(paths, rt.device)
                     for name, paths in (("safety", args.rm_safety), ("helpfulness", args.rm_helpful))}
    if resume is not None:
        value_model, _ = loaders.load_any_model(dict(model=resume["value_model"],
                                                     model_config=resume["value_model_config"]), rt.device)
    elif args.value_init == "policy":
        value_model, _ = loaders.load_any_model(args.init, rt.device, head="scalar")
    else:
        value_path = (args.rm_safety if args.value_init == "safety" else args.rm_helpful)[0]
        value_model, value_ckpt = loaders.load_any_model(value_path, rt.device, head="scalar")
        if value_ckpt["tokenizer"] != policy_ckpt["tokenizer"]:
            raise runtime.UserError(f"--value-init {args.value_init}: {value_path} has another tokenizer than "
                                    f"{args.init}; use --value-init policy")
    value_model.train()
    if policy.config.max_seq_len - args.max_new_tokens < 1:
        raise runtime.UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                                f"context of {policy.config.max_seq_len} tokens")
    return policy, tok, ref_model, reward_models, value_model


def keep_policy(rt, policy, tok, iteration, args):
    """--keep-every: the policy's weights at this iteration as OUT/policy_<iteration>.pt, a language-model
    checkpoint that evaluate.py reads, for studies of the policy along training (overopt.py)."""
    runtime.save_on_rank0(rt, os.path.join(args.out, f"policy_{iteration:04d}.pt"),
                          runtime.checkpoint(policy, tok, iteration, args, "ppo", optimizers={}))


# ---------------------------------------------------------------------------------------------- the gold judge
def held_out_examples(world_seed, n):
    """The world's validation examples the policy answers greedily for the gold judge: the headline rung's held-out
    phrasings, requests, items and facts (the test split is evaluate.py's). n of them spread evenly over the kinds,
    attacks and categories (-1: all)."""
    return world.build_world(world_seed).headline("validation", n if n > 0 else None) if n != 0 else []


def gold_eval(policy, tok, examples, rt):
    """judge.gold_metrics of the policy's greedy answers to examples, each rank answering its share."""
    answers = respond(policy, tok, [ex.messages for ex in runtime.shard(examples, rt)], desc="eval")
    return judge.gold_metrics(examples, runtime.gather_shards([a.text for a in answers], rt))


def key_rates(metrics):
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in ("violation_rate", "false_refusal_rate", "benign_accuracy"))


# ---------------------------------------------------------------------------------------------- the log
def rollout_stats(batch, rt):
    """{name: (sum, count)} of the rollout: the reward PPO maximises (R summed over each response: R~ - beta KL),
    R~, R_c and logit(R_c), the raw RM scores r_s and r_h, KL, entropy, value fit, lengths and the gold judge's
    marks. Entropy is a mean over response tokens and the explained variance the whole batch's, however the batch
    is split over ranks."""
    n, mask = len(batch.prompts), batch.response_mask
    fit = explained_variance(batch.old_values, batch.returns, mask, total=runtime.sum_over_ranks(rt)).item()
    return dict(
        reward=(batch.R.sum().item(), n), R_tilde=(batch.R_tilde.sum().item(), n), R_c=(batch.R_c.sum().item(), n),
        logit_R_c=(torch.logit(batch.R_c, eps=1e-6).sum().item(), n),
        r_s=(batch.r_s.sum().item(), n), r_h=(batch.r_h.sum().item(), n), kl=(batch.kl.sum(1).sum().item(), n),
        entropy=(batch.entropy.sum().item(), mask.sum().item()), explained_variance=(fit * n, n),
        response_length=(mask.sum().item(), n), no_eos=((~batch.has_eos).sum().item(), n),
        **judge.gold_counts([p.example for p in batch.prompts], batch.texts))


def reduce_means(sums_counts, rt):
    """{name: (sum, count)}, the same names on every rank -> {name: mean over all ranks}; names counted 0 times
    are left out."""
    names = sorted(sums_counts)
    totals = runtime.all_reduce_sum(torch.tensor([sums_counts[n] for n in names], dtype=torch.float64,
                                                 device=rt.device), rt)
    return {n: (s / c).item() for n, (s, c) in zip(names, totals) if c > 0}


def log_iteration(rt, args, iteration, batch, metrics, bar, log, samples_log):
    """The bar, one metrics.jsonl row, three samples.jsonl rows, and every --sample-every iterations a printout."""
    if "eval" in metrics:
        runtime.print0(rt, f"eval at iteration {iteration}: {key_rates(metrics['eval'])}")
    bar.update(1)
    bar.set_postfix(logit_R_c=f"{metrics['logit_R_c']:.2f}", kl=f"{metrics['kl']:.2f}",
                    viol=f"{metrics.get('violation_rate', float('nan')):.2f}")
    log.log(iteration, **metrics)
    shown = range(min(3, len(batch.prompts)))
    prompts = [batch.prompts[i].messages[-1]["content"] for i in shown]
    for i in shown:
        samples_log.log(iteration, prompt=prompts[i], response=batch.texts[i], R_tilde=batch.R_tilde[i].item(),
                        r_s=batch.r_s[i].item(), r_h=batch.r_h[i].item())
    if iteration % args.sample_every == 0 or iteration == args.iterations:
        runtime.print0(rt, f"iteration {iteration}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())
                                                                 if k != "eval"))
        for i in shown:
            runtime.print0(rt, f"  > {prompts[i]}\n    {batch.texts[i]}  [R~ {batch.R_tilde[i].item():+.2f}]")


# ---------------------------------------------------------------------------------------------- arguments
PRESETS = {
    # tiny: a few CPU minutes on the 1M-parameter SFT model, chosen by watching the gold metrics (--eval-every):
    # minibatches of 16 (4 epochs) made the greedy answers to benign prompts drift (accuracy -5 to -10 points),
    # minibatches of 64 (2 epochs, as Llama 2's 64) keep them; beta 0.02-0.05 drifted to 4-10 nats of KL. On the
    # validation split (seed 0, from an SFT model leaving 12.8% violations): beta 0.2 lowered them to 7.2%, beta 0.1
    # to 4.4% at 0.9 nats of KL, 25 iterations at beta 0.2 to 2.8% (70 s more per run); false refusals alike.
    "tiny": dict(iterations=15, batch_size=128, minibatch_size=64, ppo_epochs=2, lr=5e-5, value_lr=3e-4,
                 beta=0.1, max_new_tokens=64),
    "small": dict(iterations=200, batch_size=256, minibatch_size=64, ppo_epochs=2, lr=1e-5, value_lr=3e-5,
                  beta=0.01, max_new_tokens=128),
    # Llama 2 (section 3.2.3): batch 512, minibatch 64, one gradient step per minibatch, lr 1e-6, beta 0.01
    "1b": dict(iterations=300, batch_size=512, minibatch_size=64, ppo_epochs=1, lr=1e-6, value_lr=1e-5,
               beta=0.01, max_new_tokens=256),
}


def optional_float(text):
    return None if text.lower() == "none" else float(text)


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="default schedule and batch sizes")
    runtime.add_run_arguments(p, outputs="model.pt, config.json, metrics.jsonl, samples.jsonl",
                              seed_help="random seed (rollout sampling, prompt order)")
    # models
    p.add_argument("--init", required=True, help="SFT checkpoint: the policy's start and the frozen reference")
    p.add_argument("--rm-safety", required=True, nargs="+", help="safety reward model (train_rm.py); several "
                   "paths: an ensemble of k reward models, combined by --ensemble")
    p.add_argument("--rm-helpful", required=True, nargs="+", help="helpfulness reward model (train_rm.py); "
                   "several paths: an ensemble")
    p.add_argument("--ensemble", choices=sorted(ENSEMBLES), default="mean", help="how an ensemble's raw scores "
                   "combine (Coste et al. 2023): their mean, or their minimum (worst case)")
    p.add_argument("--value-init", choices=("safety", "helpful", "policy"), default="safety",
                   help="value model starts from that RM, or from the SFT model with a fresh scalar head")
    # reward
    p.add_argument("--reward", choices=sorted(REWARDS) + ["lagrangian"], default="llama2",
                   help="llama2: the safety/helpfulness gate; safety or helpfulness: that RM alone; lagrangian: "
                   "Safe RLHF's PPO-Lagrangian, the helpfulness RM's score subject to E[cost] <= --cost-threshold, "
                   "cost = minus the safety RM's raw score")
    p.add_argument("--cost-threshold", type=float, default=-0.3, help="lagrangian: the threshold d on the mean "
                   "cost -r_s over a rollout (raw safety-RM units; -0.3: a mean safety score of at least 0.3). With "
                   "--lambda-lr 0.1, chosen for the tiny preset among d 0.2, 0 and -0.3 by the lowest violation + "
                   "false-refusal rate on the validation split (seed 0); -1.5 drives lambda to its cap")
    p.add_argument("--lambda-init", type=runtime.positive_float, default=1.0,
                   help="lagrangian: the multiplier's starting value (Safe RLHF: 1)")
    p.add_argument("--lambda-lr", type=runtime.nonnegative_float, default=0.1,
                   help="lagrangian: step size of the dual ascent on ln lambda, per iteration")
    p.add_argument("--lambda-max", type=runtime.positive_float, default=20.0,
                   help="lagrangian: cap on the multiplier (20: the cost's weight at most 20/21 of the reward)")
    p.add_argument("--safety-threshold", type=runtime.nonnegative_float, default=0.15,
                   help="gate: use R_s on any prompt whose safety probability is below this (Llama 2: 0.15)")
    p.add_argument("--beta", type=runtime.nonnegative_float,
                   help="KL penalty coefficient per token (Llama 2: 0.01 for 7B/13B)")
    p.add_argument("--kl-target", type=runtime.positive_float, default=None, help="adaptive KL: steer beta so the "
                   "mean per-sequence KL (nats) approaches this (none: beta stays fixed)")
    p.add_argument("--kl-gain", type=runtime.nonnegative_float, default=0.1,
                   help="adaptive KL: K_beta (Ziegler et al.: 0.1)")
    p.add_argument("--missing-eos-score", type=optional_float, default=-1.0, help="R~ (whitened units) given to "
                   "responses cut at the length cap (--max-new-tokens) without </s>; 'none' keeps the RM's")
    # data and sampling
    p.add_argument("--prompts", default="world", help="'world' (its RL prompts) or a JSONL file of {'messages'} or "
                   "{'prompt'} rows with an optional boolean 'safety'")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the embedded world (the SFT model's world)")
    p.add_argument("--max-new-tokens", type=runtime.positive_int, help="response length cap in tokens")
    p.add_argument("--temperature", type=runtime.nonnegative_float, default=1.0,
                   help="rollout sampling temperature (0: greedy)")
    # PPO
    p.add_argument("--iterations", type=runtime.positive_int, help="rollout + update iterations")
    p.add_argument("--batch-size", type=runtime.positive_int, help="prompts per rollout, over all ranks")
    p.add_argument("--minibatch-size", type=runtime.positive_int, help="responses per gradient step, over all ranks")
    p.add_argument("--ppo-epochs", type=runtime.positive_int, help="passes over each rollout (Llama 2: 1)")
    p.add_argument("--lr", type=runtime.positive_float, help="policy learning rate, constant (Llama 2: 1e-6)")
    p.add_argument("--value-lr", type=runtime.positive_float, help="value model learning rate, constant")
    p.add_argument("--weight-decay", type=runtime.nonnegative_float, default=0.1,
                   help="AdamW decay on matrices (Llama 2: 0.1)")
    p.add_argument("--grad-clip", type=runtime.positive_float, default=1.0,
                   help="max gradient norm per model (Llama 2: 1.0)")
    p.add_argument("--clip", type=runtime.positive_float, default=0.2, help="PPO ratio clip epsilon (Llama 2: 0.2)")
    p.add_argument("--value-clip", type=runtime.positive_float, default=0.2,
                   help="value clip, in whitened reward units")
    p.add_argument("--gamma", type=runtime.nonnegative_float, default=1.0,
                   help="discount per token (1: the score is not discounted)")
    p.add_argument("--lam", type=runtime.nonnegative_float, default=0.95, help="GAE lambda")
    # bookkeeping
    # the stage's own check (pipeline.sh sets it for the real model)
    p.add_argument("--kl-range", type=runtime.nonnegative_float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="after training (and saving), fail unless the last iteration's KL to the reference (nats "
                   "per response) lies in [LOW, HIGH] (default: no check)")
    p.add_argument("--min-score-rise", type=float, default=None, help="after training, fail unless the mean "
                   "gated RM score R_c of the last quarter of the iterations exceeds the first quarter's by this "
                   "much and by more than 1.96 standard errors of that difference (default: no check)")
    p.add_argument("--sample-every", type=runtime.positive_int, default=5,
                   help="iterations between printed sample rollouts")
    p.add_argument("--save-every", type=runtime.positive_int, default=10, help="iterations between checkpoints")
    p.add_argument("--keep-every", type=runtime.nonnegative_int, default=0, help="also keep the policy's weights "
                   "every this many iterations as OUT/policy_<iteration>.pt (0: none)")
    p.add_argument("--eval-prompts", type=int, default=-1, help="held-out validation prompts of the world judged "
                   "greedily at the end (-1: all, 0: none, as for a real model)")
    p.add_argument("--eval-every", type=runtime.nonnegative_int, default=0, help="iterations between gold "
                   "evaluations on those prompts during training, logged under 'eval' (0: only at the end)")
    args = runtime.parse_args(p, PRESETS, argv)
    if args.batch_size % args.minibatch_size:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --minibatch-size {args.minibatch_size}")
    if args.eval_prompts < -1:
        p.error(f"--eval-prompts: must be -1 (all), 0 (none) or a count, got {args.eval_prompts}")
    return args


def main(args):
    # ------------------------------------------------------------------ setup, models, prompts (nothing written yet)
    rt, ckpt_path, resume = runtime.start(args, stage="ppo")
    if args.minibatch_size % rt.world_size:
        raise runtime.UserError(f"--minibatch-size {args.minibatch_size} does not split over {rt.world_size} ranks")
    # policy: trained, starts as the SFT model; ref_model: the SFT model, frozen; value_model: trained
    policy, tok, ref_model, reward_models, value_model = load_models(args, rt, resume)
    prompts = encode_prompts(args.prompts, tok, policy.config.max_seq_len - args.max_new_tokens, args.world_seed)
    eval_examples = held_out_examples(args.world_seed, args.eval_prompts)
    runtime.print0(rt, f"ppo: {len(prompts)} prompts ({sum(p.safety for p in prompts)} safety-tagged), reward "
                       f"{args.reward}, {num_params(policy) / 1e6:.2f}M-parameter policy on {rt.device}")

    # ------------------------------------------------------------------ optimizers, resume, run folder
    # Llama 2 (section 3.2.3): AdamW, constant learning rate, weight decay 0.1, gradient clipping 1.0
    policy_opt = runtime.make_optimizer(policy, args.lr, args.weight_decay, freeze=args.freeze_layers)
    value_opt = runtime.make_optimizer(value_model, args.value_lr, args.weight_decay, freeze=args.freeze_layers)
    optimizers = {"optimizer": policy_opt, "value_optimizer": value_opt}
    iteration = runtime.resume_training(rt, resume, optimizers, ckpt_path)
    beta = resume["beta"] if resume is not None else args.beta
    log_lagrange = resume.get("log_lambda", math.log(args.lambda_init)) if resume else math.log(args.lambda_init)
    log, samples_log = runtime.begin(args, rt, iteration, "metrics.jsonl", "samples.jsonl")
    train_policy = runtime.wrap_ddp(policy, rt, args.compile)
    train_value = runtime.wrap_ddp(value_model, rt, args.compile)

    def save():
        runtime.save_on_rank0(rt, ckpt_path, runtime.checkpoint(
            policy, tok, iteration, args, "ppo", optimizers, value_model=value_model.state_dict(),
            value_model_config=vars(value_model.config), beta=beta, log_lambda=log_lagrange))

    # ------------------------------------------------------------------ the RLHF loop
    metrics, scores = {}, []  # scores: each iteration's mean R_c, for --min-score-rise
    bar = tqdm(total=args.iterations, initial=iteration, disable=not rt.is_main, desc="ppo")
    with runtime.StopOnSignal() as stop:
        while iteration < args.iterations:
            stop.save_and_exit_if_requested(rt, save, ckpt_path, f"iteration {iteration}")  # Ctrl-C, SIGTERM
            # Every random draw of an iteration comes from (seed, iteration): a resumed run repeats it exactly; each
            # response is sampled from its own stream, set by its place in the global batch, whatever rank draws it
            stream, per_rank = args.seed * 1_000_003 + iteration * 1_009, args.batch_size // rt.world_size
            sampler = runtime.row_generators(stream, range(rt.rank * per_rank, (rt.rank + 1) * per_rank), rt.device)
            shuffler = torch.Generator().manual_seed(stream + rt.rank)
            # 1. rollout: one sampled response per prompt, read by the policy, the reference and the value model
            batch = rollout(policy, ref_model, value_model, tok, prompts, iteration, sampler, args, rt)
            # 2. reward: R_c, the gate of the two reward models, then R~ = whiten(logit(R_c)), each (B,)
            if args.reward == "lagrangian":  # a variant: Safe RLHF's reward in place of logit(R_c)
                lagrangian_rollout_reward(batch, reward_models, args, rt, math.exp(log_lagrange))
            else:
                batch.r_s, batch.r_h, batch.R_c = gated_reward(batch, reward_models, args.reward, args, rt)
                batch.R_tilde = whitened_reward(torch.logit(batch.R_c, eps=1e-6), batch.has_eos,
                                                args.missing_eos_score, rt)
            # 3. KL penalty: R = -beta KL on every response token, R~ added at the last one, each (B, L)
            batch.R, batch.kl = kl_penalized_rewards(batch.R_tilde, batch.old_logp, batch.ref_logp,
                                                     batch.response_mask, beta)
            # 4. advantages: GAE on the value model's estimates, whitened over the response tokens
            advantages, batch.returns = gae(batch.R, batch.old_values, batch.response_mask, args.gamma, args.lam)
            batch.advantages = whiten(advantages, batch.response_mask, total=runtime.sum_over_ranks(rt))
            # 5. PPO epochs over minibatches: the clipped policy and value losses
            stats = ppo_epochs(train_policy, train_value, policy, value_model, [policy_opt, value_opt], batch,
                               shuffler, args, rt, f"iteration {iteration}", ckpt_path)
            # 6. KL controller, log, checkpoint
            metrics = dict(reduce_means({**stats, **rollout_stats(batch, rt)}, rt), beta=beta)
            scores.append(metrics["R_c"])
            if args.kl_target is not None:
                beta = adaptive_beta(beta, metrics["kl"], args.kl_target, args.kl_gain)
            if args.reward == "lagrangian":  # a variant: the dual step on the multiplier
                log_lagrange = lagrangian_dual_step(batch, metrics, log_lagrange, args, rt)
            iteration += 1
            if eval_examples and args.eval_every and iteration % args.eval_every == 0 \
                    and iteration < args.iterations:  # the last iteration's is the final eval below
                metrics["eval"] = gold_eval(policy, tok, eval_examples, rt)
            log_iteration(rt, args, iteration, batch, metrics, bar, log, samples_log)
            if iteration % args.save_every == 0 or iteration == args.iterations:
                save()
            if args.keep_every and iteration % args.keep_every == 0:
                keep_policy(rt, policy, tok, iteration, args)
    bar.close()

    # ------------------------------------------------------------------ eval: the gold judge on held-out prompts
    result = dict(step=iteration, reward=metrics.get("reward"), kl=metrics.get("kl"))
    if eval_examples:
        result["eval"] = gold_eval(policy, tok, eval_examples, rt)
        log.log(iteration, eval=result["eval"])
        runtime.print0(rt, f"ppo, gold judge on {len(eval_examples)} held-out prompts: {key_rates(result['eval'])}")
    runtime.cleanup(rt)
    check_moved(args, metrics.get("kl"), scores)
    return result


def score_quarters(scores):
    """(quarter, mean of the first quarter, mean of the last quarter, noise) of the iterations' mean R_c: what
    --min-score-rise compares (nan means without scores). noise: 1.96 standard errors of the difference of the two
    means, from the spread of the iterations within each quarter (0 with one iteration a quarter)."""
    quarter = max(1, len(scores) // 4)
    if not scores:
        return quarter, math.nan, math.nan, math.nan
    first, last = scores[:quarter], scores[-quarter:]
    noise = 1.96 * math.sqrt((statistics.variance(first) + statistics.variance(last)) / quarter) if quarter > 1 else 0.0
    return quarter, sum(first) / quarter, sum(last) / quarter, noise


def score_rose(first, last, noise, min_rise):
    """--min-score-rise's rule: the last quarter's mean R_c above the first's by min_rise and by more than noise."""
    return last - first >= min_rise and last - first > noise


def check_moved(args, kl, scores):
    """The stage's own check: the last KL inside --kl-range, the mean R_c of the last quarter of the iterations
    above the first quarter's by --min-score-rise and by more than the noise of that difference (a resumed run
    counts the iterations since its resume)."""
    _, first, last, noise = score_quarters(scores)
    rise = last - first
    if args.kl_range is not None and kl is not None and not args.kl_range[0] <= kl <= args.kl_range[1]:
        raise runtime.UserError(f"ppo: KL to the reference {kl:.4f} nats, outside --kl-range {args.kl_range[0]} "
                                f"{args.kl_range[1]} (R_c rose {rise:+.4f})")
    if args.min_score_rise is not None and not score_rose(first, last, noise, args.min_score_rise):
        raise runtime.UserError(f"ppo did not move: mean R_c rose {rise:+.4f} from the first quarter of the "
                                f"iterations to the last, asked at least --min-score-rise {args.min_score_rise} and "
                                f"more than its noise {noise:.4f} (1.96 standard errors)")


if __name__ == "__main__":
    runtime.command(main, get_args)
