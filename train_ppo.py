"""PPO against two frozen reward models with a KL penalty to the SFT model (Llama 2, section 3.2.3).

One iteration of the RLHF loop:
1. Rollout: a batch of RL prompts, one response each, sampled from the policy (temperature 1, KV cache).
2. Reward: the safety and helpfulness RMs score every (prompt, response); Llama 2's piecewise combination
       R_c = R_s  if is_safety(prompt) or R_s < 0.15  else R_h        (R_s, R_h = sigmoid of the raw scores)
       R~  = whiten(logit(R_c))                                     (mean 0, std 1 over the rollout batch)
   then a per-token penalty r_t = -beta (log pi(y_t) - log pi_ref(y_t)) on every response token, R~ added at
   the last one, so the return is R(g|p) = R~_c(g|p) - beta KL(pi || pi_ref) of the paper's equation.
   --reward safety|helpfulness trains on one RM alone (R_c = R_s or R_h) to show what the gate resolves.
3. GAE(gamma, lambda) on the value model's estimates, advantages whitened over the batch's response tokens.
4. Several epochs of minibatches: clipped surrogate loss for the policy, clipped value loss for the value
   model, gradient clipping; optionally the adaptive KL controller of Ziegler et al. (2019) moves beta.

Responses that never emit </s> (cut at --max-new-tokens): as in OpenAI's lm-human-preferences and the PPO
implementations that follow it, their score is replaced by a fixed low value (--missing-eos-score, in whitened
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
prompts, the split every tuning choice reads; the test split is evaluate.py's alone.

Tiny CPU run (minutes), after train_sft.py and train_rm.py:
    python train_ppo.py --preset tiny --init out/sft/model.pt --rm-safety out/rm_safety/model.pt \\
        --rm-helpful out/rm_helpful/model.pt --out out/ppo
Data parallel (each rank samples its share of the prompts; whitening, means and the KL controller read the whole
batch, and each response's sampling stream is set by its place in it, so N ranks compute what one process does):
    torchrun --nproc_per_node=2 train_ppo.py --preset tiny --init out/sft/model.pt \\
        --rm-safety out/rm_safety/model.pt --rm-helpful out/rm_helpful/model.pt --out out/ppo
"""
import functools
import math
import os

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
    (runtime.all_reduce_sum): the mean is then the whole batch's."""
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


def kl_penalized_rewards(score, logp, ref_logp, response_mask, beta):
    """Per-token reward r_t = -beta (log pi(y_t) - log pi_ref(y_t)), plus the sequence score at the last token
    (Llama 2 eq. 3 split over tokens as in Ziegler et al. 2019). score (B,); logp, ref_logp, response_mask (B, L),
    responses right-padded. Returns (rewards (B, L), per-token kl (B, L))."""
    kl = (logp - ref_logp) * response_mask
    rewards = -beta * kl
    last = response_mask.sum(1).long() - 1                                 # index of each response's last token
    rewards[torch.arange(len(score)), last] += score
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


# Safe RLHF (Dai et al. 2023, section 3.3): maximise E[R_h] subject to E[C] <= d through the Lagrangian
# min_lambda>=0 max_theta E[R_h] - lambda (E[C] - d), solved by alternating PPO steps on theta and dual steps on lambda.
def lagrangian_reward(helpful, cost, lam):
    """Safe RLHF's per-sequence reward for a fixed multiplier: R = (R_h - lambda C) / (1 + lambda), the 1 / (1 + lambda)
    keeping its scale as lambda grows (Dai et al. 2023, section 3.3). helpful, cost (B,); lam >= 0 a number."""
    return (helpful - lam * cost) / (1 + lam)


def lambda_update(log_lambda, mean_cost, threshold, lr, max_lambda=math.inf):
    """One dual step (Dai et al. 2023, section 3.3): gradient ascent on lambda (E[C] - d) in log lambda, whose
    gradient is lambda (E[C] - d): ln lambda <- min(ln lambda + lr lambda (E[C] - d), ln lambda_max). lambda =
    exp(ln lambda) stays positive, grows while the batch's mean cost E[C] exceeds the threshold d and shrinks while
    it is below; the step grows with lambda, so the cap (as Safe RLHF's lambda_max) stops a runaway."""
    return min(log_lambda + lr * math.exp(log_lambda) * (mean_cost - threshold), math.log(max_lambda))


# ---------------------------------------------------------------------------------------------- sequences
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


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(spec, tok, max_prompt_len, world_seed):
    """Prompts as dicts: ids, messages, safety (the is_safety tag the gate reads) and example (the world's
    Example, for the gold judge; None for file prompts). spec: "world" (its RL prompts) or a JSONL file that
    data.read_prompts reads. Prompts longer than max_prompt_len tokens are skipped with a counted warning."""
    if spec == "world":
        rows = [dict(messages=ex.messages, safety=world.is_safety(ex), example=ex)
                for ex in world.build_world(world_seed).rl_prompts]
    else:
        rows = [dict(row, example=None) for row in data.read_prompts(spec)]
    for row in rows:
        try:
            row["ids"] = tok.encode_prompt(row["messages"])
        except ValueError as e:
            raise ValueError(f"{row.get('where', spec)}: {e} (expected 'messages' ending with a user turn, or "
                             f"'prompt')") from None
    kept = [r for r in rows if len(r["ids"]) <= max_prompt_len]
    if len(kept) < len(rows):
        tqdm.write(f"warning: skipped {len(rows) - len(kept)} of {len(rows)} prompts longer than {max_prompt_len} "
                   f"tokens (the context must also hold --max-new-tokens)")
    if not kept:
        raise runtime.UserError(f"no usable prompts in {spec}")
    return kept


def held_out_examples(world_seed, n):
    """The world's validation examples the policy answers greedily for the gold judge: templates, entities and
    borderline items never seen in training (the test split is evaluate.py's). n of them spread evenly over the
    kinds, attacks and categories (-1: all)."""
    examples = world.build_world(world_seed).validation if n != 0 else []
    if 0 < n < len(examples):
        examples = examples[::len(examples) // n][:n]
    return examples


def gold_eval(policy, tok, examples, rt):
    """judge.gold_metrics of the policy's greedy answers to examples, each rank answering its share."""
    answers = respond(policy, tok, [ex.messages for ex in runtime.shard(examples, rt)], desc="eval")
    return judge.gold_metrics(examples, runtime.gather_shards([a.text for a in answers], rt))


def key_rates(metrics):
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in ("violation_rate", "false_refusal_rate", "benign_accuracy"))


# ---------------------------------------------------------------------------------------------- models
def load_models(args, rt, resume):
    """policy (trained; the SFT model, or the resumed one) and its tokenizer, ref_model (the SFT model, frozen: it
    anchors the KL penalty), the two frozen reward models {"safety", "helpfulness"}: (model, tok), and the value
    model (a scalar-head network reading the policy's tokens, trained); checks that --max-new-tokens leaves room
    for a prompt. Built in this order: each Transformer draws its initial weights from the global RNG."""
    policy, tok, policy_ckpt = loaders.load_policy(resume if resume is not None else args.init, rt.device)
    ref_model, _ = loaders.load_model(args.init, rt.device)
    ref_model.eval().requires_grad_(False)
    # the two frozen reward models score text, so each reads it with its own tokenizer
    # (a list of several paths is an ensemble, combined by --ensemble)
    reward_models = {name: [load_reward_model(path, rt.device) for path in paths] if len(paths) > 1
                     else load_reward_model(paths[0], rt.device)
                     for name, paths in (("safety", args.rm_safety), ("helpfulness", args.rm_helpful))}
    if resume is not None:
        value_model, _ = loaders.load_model(dict(model=resume["value_model"],
                                                 model_config=resume["value_model_config"]), rt.device)
    elif args.value_init == "policy":
        value_model, _ = loaders.load_model(args.init, rt.device, head="scalar")
    else:
        value_path = (args.rm_safety if args.value_init == "safety" else args.rm_helpful)[0]
        value_model, value_ckpt = loaders.load_model(value_path, rt.device, head="scalar")
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
    runtime.save_checkpoint(rt, os.path.join(args.out, f"policy_{iteration:04d}.pt"),
                            runtime.checkpoint(policy, tok, iteration, args, "ppo", optimizers={}))


# ---------------------------------------------------------------------------------------------- one iteration
def rollout(policy, ref_model, value_model, tok, prompts, iteration, sampler, args, rt):
    """Step 1: this rank's share of global batch `iteration`, one response sampled per prompt, and what PPO reads
    of it: tokens, attention_mask (B, P + L), response_mask, old_logp, ref_logp, old_values, entropy (B, L), P."""
    batch = [prompts[i] for i in data.step_indices(len(prompts), args.batch_size, iteration, args.seed,
                                                   rt.rank, rt.world_size)]
    policy.eval()
    responses = generate(policy, [p["ids"] for p in batch], args.max_new_tokens, tok.eos_id, tok.pad_id,
                         temperature=args.temperature, generator=sampler)
    tokens, attention_mask, response_mask, P = rollout_batch([p["ids"] for p in batch], responses, tok.pad_id)
    out = dict(prompts=batch, texts=[tok.decode(r) for r in responses], P=P,
               has_eos=torch.tensor([tok.eos_id in r for r in responses], device=rt.device),
               tokens=tokens.to(rt.device), attention_mask=attention_mask.to(rt.device),
               response_mask=response_mask.to(rt.device))
    tokens, attention_mask = out["tokens"], out["attention_mask"]
    with torch.no_grad(), runtime.autocast(rt):
        out["old_logp"], out["entropy"] = response_logprobs_and_entropy(policy, tokens, attention_mask, P)
        out["ref_logp"] = response_logprobs(ref_model, tokens, attention_mask, P)     # (B, L)
        out["old_values"] = response_values(value_model, tokens, attention_mask, P)   # (B, L)
    return out


def sequence_scores(batch, reward_models, args, rt, lam=0.0):
    """Step 2: each response's score R~ = whiten(logit(R_c)) (B,), R_c the reward models' scores combined by
    --reward; --reward lagrangian: R~ = whiten(lagrangian_reward(r_h, C, lam)) on the raw scores, the cost
    C = -r_s (the safety RM's raw score, negated: high when it judges the answer unsafe). A response cut without
    </s> gets --missing-eos-score instead (see the module docstring). Also the unwhitened score, R_c, the cost and
    the raw RM scores, for the log."""
    safety_prompt = torch.tensor([p["safety"] for p in batch["prompts"]], device=rt.device)
    lagrangian = args.reward == "lagrangian"
    combined, raw = combined_reward(reward_models, [p["messages"] for p in batch["prompts"]], batch["texts"],
                                    safety_prompt, "helpfulness" if lagrangian else args.reward,
                                    args.safety_threshold, ensemble=args.ensemble)  # R_c, a probability
    cost = -raw["safety"].to(rt.device)
    rm_score = lagrangian_reward(raw["helpfulness"].to(rt.device), cost, lam) if lagrangian \
        else torch.logit(combined.to(rt.device), eps=1e-6)                   # back to the RM's logit scale
    score = whiten(rm_score, total=functools.partial(runtime.all_reduce_sum, rt=rt))   # over the global batch
    if args.missing_eos_score is not None:
        score = torch.where(batch["has_eos"], score, torch.full_like(score, args.missing_eos_score))
    return dict(score=score, rm_score=rm_score, combined=combined.to(rt.device), cost=cost,
                safety_raw=raw["safety"].to(rt.device), helpful_raw=raw["helpfulness"].to(rt.device))


def ppo_epochs(train_policy, train_value, policy, value_model, optimizers, batch, shuffler, args, rt, where,
               ckpt_path):
    """Step 4: --ppo-epochs passes over the rollout in shuffled minibatches, each one guarded update of the policy
    and the value model together (separate networks and optimizers: each gets its own gradient). Under torchrun a
    minibatch takes minibatch_size / world_size of each rank's rows, shuffled by that rank. Returns the minibatches'
    {name: (sum, count)} of the losses, the policy's gradient norm and the loss diagnostics."""
    per_rank, mb = args.batch_size // rt.world_size, args.minibatch_size // rt.world_size
    P, stats = batch["P"], {}
    policy.train()
    for _ in range(args.ppo_epochs):
        order = torch.randperm(per_rank, generator=shuffler)
        for start in range(0, per_rank, mb):
            idx = order[start:start + mb].to(rt.device)
            mb_tokens, mb_attention, mask = (batch[k][idx] for k in ("tokens", "attention_mask", "response_mask"))
            with runtime.autocast(rt):
                logp = response_logprobs(train_policy, mb_tokens, mb_attention, P)
                values = response_values(train_value, mb_tokens, mb_attention, P)
            pg_loss, pg_stats = policy_loss(logp, batch["old_logp"][idx], batch["advantages"][idx], mask, args.clip)
            vf_loss, vf_stats = value_loss(values, batch["old_values"][idx], batch["returns"][idx], mask,
                                           args.value_clip)
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


def rollout_stats(batch, rt):
    """{name: (sum, count)} of the rollout's reward, KL, entropy, value fit and the gold judge's marks; entropy is a
    mean over response tokens and the explained variance the whole batch's, whatever its split over ranks."""
    n, mask = len(batch["prompts"]), batch["response_mask"]
    total = functools.partial(runtime.all_reduce_sum, rt=rt)
    return dict(
        reward=(batch["rm_score"].sum().item(), n), rm_safety_mean=(batch["safety_raw"].sum().item(), n),
        rm_helpfulness_mean=(batch["helpful_raw"].sum().item(), n), final_score=(batch["score"].sum().item(), n),
        combined_reward=(batch["combined"].sum().item(), n), cost=(batch["cost"].sum().item(), n),
        kl=(batch["kl"].sum(1).sum().item(), n),
        entropy=(batch["entropy"].sum().item(), mask.sum().item()),
        explained_variance=(explained_variance(batch["old_values"], batch["returns"], mask, total).item() * n, n),
        response_length=(mask.sum().item(), n), no_eos=((~batch["has_eos"]).sum().item(), n),
        **judge.gold_counts([p["example"] for p in batch["prompts"]], batch["texts"]))


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
    bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['kl']:.2f}",
                    viol=f"{metrics.get('violation_rate', float('nan')):.2f}")
    log.log(iteration, **metrics)
    shown = range(min(3, len(batch["prompts"])))
    prompts = [batch["prompts"][i]["messages"][-1]["content"] for i in shown]
    for i in shown:
        samples_log.log(iteration, prompt=prompts[i], response=batch["texts"][i], score=batch["score"][i].item(),
                        rm_safety=batch["safety_raw"][i].item(), rm_helpful=batch["helpful_raw"][i].item())
    if iteration % args.sample_every == 0 or iteration == args.iterations:
        runtime.print0(rt, f"iteration {iteration}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())
                                                                 if k != "eval"))
        for i in shown:
            runtime.print0(rt, f"  > {prompts[i]}\n    {batch['texts'][i]}  [score {batch['score'][i].item():+.2f}]")


# ---------------------------------------------------------------------------------------------- arguments
PRESETS = {
    # tiny: a few CPU minutes on the 1M-parameter SFT model, chosen by watching the gold metrics (--eval-every):
    # minibatches of 16 (4 epochs) made the greedy answers to benign prompts drift (accuracy -5 to -10 points),
    # minibatches of 64 (2 epochs, as Llama 2's 64) keep them; beta 0.02-0.05 drifted to 4-10 nats of KL.
    "tiny": dict(iterations=15, batch_size=128, minibatch_size=64, ppo_epochs=2, lr=5e-5, value_lr=3e-4,
                 beta=0.2, max_new_tokens=64),
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
    p.add_argument("--cost-threshold", type=float, default=-1.5, help="lagrangian: the threshold d on the mean "
                   "cost -r_s over a rollout (raw safety-RM units; -1.5: a mean safety score of at least 1.5). With "
                   "--lambda-lr 0.1, chosen for the tiny preset among d -1.5, -2 and lr 0.1, 0.5 by the lowest "
                   "violation + false-refusal rate on the validation split")
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
    p.add_argument("--missing-eos-score", type=optional_float, default=-1.0, help="whitened score given to "
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
    prompts = load_prompts(args.prompts, tok, policy.config.max_seq_len - args.max_new_tokens, args.world_seed)
    eval_examples = held_out_examples(args.world_seed, args.eval_prompts)
    runtime.print0(rt, f"ppo: {len(prompts)} prompts ({sum(p['safety'] for p in prompts)} safety-tagged), reward "
                       f"{args.reward}, {num_params(policy) / 1e6:.2f}M-parameter policy on {rt.device}")

    # ------------------------------------------------------------------ optimizers, resume, run folder
    # Llama 2 (section 3.2.3): AdamW, constant learning rate, weight decay 0.1, gradient clipping 1.0
    policy_opt = runtime.make_optimizer(policy, args.lr, args.weight_decay, freeze=args.freeze_layers)
    value_opt = runtime.make_optimizer(value_model, args.value_lr, args.weight_decay, freeze=args.freeze_layers)
    optimizers = {"optimizer": policy_opt, "value_optimizer": value_opt}
    iteration = runtime.resume_training(rt, resume, optimizers, ckpt_path)
    beta = resume["beta"] if resume is not None else args.beta
    log_lambda = resume.get("log_lambda", math.log(args.lambda_init)) if resume else math.log(args.lambda_init)
    log, samples_log = runtime.begin(args, rt, iteration, "metrics.jsonl", "samples.jsonl")
    train_policy = runtime.wrap_ddp(policy, rt, args.compile)
    train_value = runtime.wrap_ddp(value_model, rt, args.compile)

    def save():
        runtime.save_checkpoint(rt, ckpt_path, runtime.checkpoint(
            policy, tok, iteration, args, "ppo", optimizers, value_model=value_model.state_dict(),
            value_model_config=vars(value_model.config), beta=beta, log_lambda=log_lambda))

    # ------------------------------------------------------------------ the RLHF loop
    metrics = {}
    bar = tqdm(total=args.iterations, initial=iteration, disable=not rt.is_main, desc="ppo")
    with runtime.StopOnSignal() as stop:
        while iteration < args.iterations:
            stop.save_and_exit_if_requested(rt, save, ckpt_path, f"iteration {iteration}")  # Ctrl-C, SIGTERM
            # Every random draw of an iteration comes from (seed, iteration): a resumed run repeats it exactly. Each
            # response is sampled from its own stream, set by its place in the global batch, so that N ranks sample
            # what one process samples; each rank shuffles its own rows into minibatches
            stream, per_rank = args.seed * 1_000_003 + iteration * 1_009, args.batch_size // rt.world_size
            sampler = runtime.row_generators(stream, range(rt.rank * per_rank, (rt.rank + 1) * per_rank), rt.device)
            shuffler = torch.Generator().manual_seed(stream + rt.rank)
            # 1. rollout: one sampled response per prompt, read by the policy, the reference and the value model
            batch = rollout(policy, ref_model, value_model, tok, prompts, iteration, sampler, args, rt)
            # 2. reward: R~ at the last token, -beta KL per token
            batch.update(sequence_scores(batch, reward_models, args, rt, math.exp(log_lambda)))
            rewards, batch["kl"] = kl_penalized_rewards(batch["score"], batch["old_logp"], batch["ref_logp"],
                                                        batch["response_mask"], beta)
            # 3. advantages: GAE on the value model's estimates, whitened over the response tokens
            advantages, batch["returns"] = gae(rewards, batch["old_values"], batch["response_mask"], args.gamma,
                                               args.lam)
            batch["advantages"] = whiten(advantages, batch["response_mask"],
                                         total=functools.partial(runtime.all_reduce_sum, rt=rt))
            # 4. PPO epochs over minibatches
            stats = ppo_epochs(train_policy, train_value, policy, value_model, [policy_opt, value_opt], batch,
                               shuffler, args, rt, f"iteration {iteration}", ckpt_path)
            # 5. KL controller, log, checkpoint
            metrics = dict(reduce_means({**stats, **rollout_stats(batch, rt)}, rt), beta=beta)
            if args.kl_target is not None:
                beta = adaptive_beta(beta, metrics["kl"], args.kl_target, args.kl_gain)
            if args.reward == "lagrangian":  # the multiplier this rollout was scored with, then its dual step
                metrics["lambda"] = math.exp(log_lambda)
                log_lambda = lambda_update(log_lambda, metrics["cost"], args.cost_threshold, args.lambda_lr,
                                           args.lambda_max)
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
    return result


if __name__ == "__main__":
    runtime.command(main, get_args)
