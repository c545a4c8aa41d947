"""Reward models (Llama 2, section 3.2.2): the SFT model with a scalar head, trained on preference pairs.

This first part holds the scoring interface the later stages use; training follows.
"""
import warnings

import torch

import data
from model import last_token_values, load_model


# ---------------------------------------------------------------------------------------------- scoring
def load_reward_model(path, device="cpu"):
    """(model, tok) of a trained reward model: frozen (no gradients), in eval mode, scalar head."""
    model, ckpt = load_model(path, device)
    if model.config.head != "scalar":
        raise ValueError(f"{path} has a {model.config.head!r} head, not a reward model's scalar head; "
                         f"train one with train_rm.py --init {path}")
    model.eval()
    model.requires_grad_(False)
    return model, data.Tokenizer.from_dict(ckpt["tokenizer"])


def encode_scored(tok, conversation, response):
    """Token ids of prompt + response in the chat template, ending with the response's </s>: the RM reads its
    score at that last token."""
    return tok.encode_dialog(conversation + [{"role": "assistant", "content": response}], "last")[0]


@torch.no_grad()
def score(reward_model, tok, conversations, responses, batch_size=64):
    """Raw reward r(x, y) for each (conversation, response): float32 CPU tensor (N,); sigmoid(r) is the RM's
    probability-like output (Llama 2, section 3.2.2).

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
