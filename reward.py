"""Reward models as the later stages use them (Llama 2, sections 3.2.2 and 3.2.3): load a trained one, score
(prompt, response) pairs, and combine the safety and helpfulness scores with the Llama 2 gate.

A reward model is a language model whose next-token head is replaced by a scalar head (train_rm.py trains it);
r(x, y) is its value at the last token of the prompt x followed by the response y (the response's end-of-turn
token), and sigmoid(r) its probability-like output. Llama 2 combines its two reward models piecewise:

    R_c = R_s  if is_safety(x) or R_s < 0.15  else R_h        (R_s, R_h = sigmoid of the raw scores)

    reward_model, tok = load_reward_model("out/rm_safety/model.pt", device)
    r = score(reward_model, tok, conversations, responses)   # float32 (N,), CPU
"""
import warnings

import torch

import data
import loaders
import tokenizer
from model import last_token_values


def load_reward_model(path, device="cpu"):
    """(model, tok) of a trained reward model: frozen (no gradients), in eval mode, scalar head."""
    model, ckpt = loaders.load_any_model(path, device)
    if model.config.head != "scalar":
        raise ValueError(f"{path} has a {model.config.head!r} head, not a reward model's scalar head; "
                         f"train one with train_rm.py --init {path}")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])


def encode_scored(tok, conversation, response):
    """Token ids of prompt + response in the chat template, ending with the response's </s>: the RM reads its
    score at that last token. Training and score() both encode through here, so they read the same token."""
    return tok.encode_dialog(conversation + [{"role": "assistant", "content": response}], "last")[0]


@torch.no_grad()
def score(reward_model, tok, conversations, responses, batch_size=64):
    """Raw reward r(x, y) for each (conversation, response): float32 CPU tensor (N,).

    conversations are message lists ending with the user turn (the prompt), responses answer strings. Rows are
    left-padded in batches of similar length; a row longer than the context keeps its last max_seq_len tokens
    (the end of the answer, where the score is read), with one counted warning.
    """
    if len(conversations) != len(responses):
        raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
    if not responses:
        return torch.zeros(0)
    max_len = reward_model.config.max_seq_len
    rows = [encode_scored(tok, c, r) for c, r in zip(conversations, responses)]
    too_long = sum(len(r) > max_len for r in rows)
    if too_long:
        warnings.warn(f"score: {too_long} of {len(rows)} prompt+response rows exceed {max_len} tokens; "
                      f"their first tokens were cut")
        rows = [r[-max_len:] for r in rows]
    was_training = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths pad less
    scores = torch.zeros(len(rows))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = data.collate([rows[i] for i in idx], tok.pad_id, side="left")
        attention_mask = batch["attention_mask"].to(device)
        values = reward_model(batch["tokens"].to(device), attention_mask)         # (B, T)
        scores[idx] = last_token_values(values, attention_mask).float().cpu()
    reward_model.train(was_training)
    return scores


def probabilities(reward, conversations, responses, batch_size=64):
    """sigmoid(r) of a (model, tokenizer) reward model for each (conversation, response), or None without one."""
    if reward is None:
        return None
    return torch.sigmoid(score(*reward, conversations, responses, batch_size))


# ---------------------------------------------------------------------------------------------- combining the two
def llama2_gate(safety_prob, helpful_prob, safety_prompt, threshold=0.15):
    """How Llama 2 combines its two reward models (section 3.2.3), used by PPO and rejection sampling:
    R_c = R_s if is_safety(x) or R_s < threshold else R_h, with R_s, R_h the sigmoid scores; all (B,) tensors,
    safety_prompt boolean."""
    return torch.where(safety_prompt | (safety_prob < threshold), safety_prob, helpful_prob)


def safety_only(safety_prob, helpful_prob, safety_prompt, threshold=0.15):
    """R_c = R_s on every prompt: the safety RM alone."""
    return safety_prob


def helpfulness_only(safety_prob, helpful_prob, safety_prompt, threshold=0.15):
    """R_c = R_h on every prompt: the helpfulness RM alone."""
    return helpful_prob


REWARDS = {"llama2": llama2_gate, "safety": safety_only, "helpfulness": helpfulness_only}


def needed(reward):
    """The reward models a reward combination reads."""
    return ("safety", "helpfulness") if reward == "llama2" else (reward,)


# ---------------------------------------------------------------------------------------------- ensembles
def ensemble_mean(scores):
    """Mean ensemble (Coste et al. 2023, section 4): r(x, y) = 1/k sum_i r_i(x, y). scores (k, N) raw -> (N,)."""
    return scores.mean(0)


def ensemble_min(scores):
    """Worst-case optimisation (Coste et al. 2023, section 4): r(x, y) = min_i r_i(x, y), the most pessimistic
    member decides. scores (k, N) raw -> (N,)."""
    return scores.min(0).values


ENSEMBLES = {"mean": ensemble_mean, "min": ensemble_min}


def ensemble_score(reward_models, conversations, responses, ensemble="mean", batch_size=64):
    """Raw score (N,) of one reward model (a (model, tok) tuple), or of a list of k of them combined by
    ENSEMBLES[ensemble] on the raw (logit) scale."""
    if isinstance(reward_models, tuple):
        return score(*reward_models, conversations, responses, batch_size)
    return ENSEMBLES[ensemble](torch.stack([score(*rm, conversations, responses, batch_size)
                                            for rm in reward_models]))


def combined_reward(reward_models, conversations, responses, safety_prompt, reward="llama2", threshold=0.15,
                    batch_size=64, ensemble="mean"):
    """R_c of each response (float32 CPU (N,), a probability) under the combination `reward` (REWARDS), and the
    raw score of every reward model given. reward_models: {"safety": (model, tok), "helpfulness": (model, tok)},
    at least the ones the combination reads, each value also a list of (model, tok) read as one ensemble
    (ENSEMBLES[ensemble]); safety_prompt: boolean (N,), the prompt's is_safety tag."""
    raw = {name: ensemble_score(rm, conversations, responses, ensemble, batch_size)
           for name, rm in reward_models.items()}
    probs = {name: r.sigmoid() for name, r in raw.items()}
    combined = REWARDS[reward](probs.get("safety"), probs.get("helpfulness"), safety_prompt.cpu(), threshold)
    return combined, raw
