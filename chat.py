"""Chat with a checkpoint in the terminal, its answers streamed token by token, each scored by the safety RM.

The conversation is in the model's chat template; after each answer the safety reward model gives its score
sigmoid(R_s) of it (Llama 2, section 3.2.2): a live gauge of what the safety RM, and so PPO's reward, makes of it.

/reset starts the conversation over; /quit or the end of input ends it. The context keeps room for an answer of
min(--max-new-tokens, half the context) tokens: the oldest exchanges are forgotten first, then a message too long on
its own is cut to its last tokens, with a notice.

    python chat.py out/ppo/model.pt --rm-safety out/rm_safety/model.pt
    python chat.py out/sft/model.pt --system "Answer in one sentence."
"""
import sys
import warnings

import torch

import loaders
import reward
import runtime
from model import KVCache, sample_next


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
    logits = model(torch.tensor([prompt_ids], device=device), None, cache, last_only=True)[:, -1]  # (1, V)
    for _ in range(max_new_tokens):
        next_tok = sample_next(logits.float(), temperature, top_p=top_p, generator=generator)  # (1,)
        yield int(next_tok)
        if int(next_tok) == eos_id:
            return
        logits = model(next_tok[:, None], None, cache)[:, -1]


# ---------------------------------------------------------------------------------------------- the chat
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
def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("checkpoint", help="the model to talk to: a .pt checkpoint, a .gguf file, a HF or Meta folder")
    p.add_argument("--rm-safety", default=None, help="safety reward model checkpoint (train_rm.py) whose score "
                   "follows each answer (default: none, no score)")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    p.add_argument("--max-new-tokens", type=runtime.positive_int, default=64, help="tokens generated per answer")
    p.add_argument("--temperature", type=runtime.nonnegative_float, default=0.0, help="0 is greedy; 1 samples the "
                   "policy itself")
    p.add_argument("--top-p", type=runtime.positive_float, default=1.0, help="nucleus sampling mass, at most 1 "
                   "(with temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    args = runtime.parse_args(p, {}, argv)
    if args.top_p > 1:
        p.error(f"--top-p must be <= 1, got {args.top_p}")
    return args


def main(args):
    device = runtime.pick_device(args.device)
    model, tok, _ = loaders.load_policy(args.checkpoint, device)
    safety_rm = reward.load_reward_model(args.rm_safety, device) if args.rm_safety else None
    return chat(model, tok, safety_rm, args.system, args.max_new_tokens, args.temperature, args.top_p, args.seed)


if __name__ == "__main__":
    runtime.command(main, get_args)
