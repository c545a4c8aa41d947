"""Text to token ids: a byte-level BPE trained here, tiktoken Encodings, and the chat templates.

- A byte-level BPE trainer (Sennrich et al. 2016, in GPT-2's byte-level form) whose merges become a tiktoken
  Encoding, saved in tiktoken's own `.tiktoken` format (base64 token, space, rank; one per line).
- The chat templates (Llama 2's `[INST]` format of Meta's reference code, Llama 3, ChatML) as segments of
  special tokens and plain text, and the loss mask of Llama 2 section 3.1: during SFT the loss is on answer tokens
  only, prompt tokens are masked. User text is encoded as plain text, so it can never forge a control token.
"""
import base64
import functools
import hashlib
import heapq
import os
from collections import Counter, defaultdict, namedtuple

import regex  # installed with tiktoken; the same \p{L} classes and possessive quantifiers tiktoken's regex uses
import tiktoken
# GPT-4's (cl100k_base) split pattern: words with their leading space, digit runs of at most 3, punctuation
# runs, newlines, other whitespace. Training pre-splits with it and the Encoding uses it as pat_str, so a
# learned token never spans two pieces.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s""")
# Control tokens, ids right after the mergeable ranks. A template that needs other markers appends them here;
# old checkpoints keep working because to_dict stores the ids it was built with.
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


# ---------------------------------------------------------------------------------------------- BPE training
def _merge(word, pair, new_id):
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(texts, vocab_size, pat_str=PAT_STR, min_frequency=1):
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair.

    Returns mergeable_ranks {token bytes: rank} for tiktoken, rank = merge order (bytes are ranks 0-255).
    Pairs are counted over the unique pre-split pieces weighted by their frequency; a merge rewrites only the
    pieces that hold the pair and updates the pair counts by difference. Ties go to the pair of lowest token
    ids, so the result does not depend on the order of `texts`. Stops early when no pair occurs
    `min_frequency` times (with the default 1: when every piece is one token). A merge whose bytes already
    form a token (reached by another split) reuses that token.
    """
    pieces = Counter(p for text in texts for p in regex.findall(pat_str, text))
    words = [list(p.encode("utf-8")) for p in pieces]
    freqs = list(pieces.values())
    vocab = [bytes([b]) for b in range(256)]  # token id -> bytes; the id is the tiktoken rank
    ranks = {token: i for i, token in enumerate(vocab)}
    pair_counts, where = Counter(), defaultdict(set)  # pair -> weighted count, pair -> indices of words holding it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]  # max-heap on count; stale entries skipped on pop
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue
        if -neg_count < min_frequency:
            break
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in ranks:
            ranks[token] = len(vocab)
            vocab.append(token)
        new_id = ranks[token]
        delta = Counter()
        for i in where.pop(pair):
            word = words[i]
            merged = _merge(word, pair, new_id)
            if len(merged) == len(word):
                continue
            for p in zip(word, word[1:]):
                delta[p] -= freqs[i]
            for p in zip(merged, merged[1:]):
                delta[p] += freqs[i]
                where[p].add(i)
            words[i] = merged
        for p, d in delta.items():
            if d:
                pair_counts[p] += d
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
                else:
                    del pair_counts[p]
    return ranks


def _ranks_to_text(ranks):
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def _ranks_from_text(text, where):
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{where}:{lineno}: expected 'BASE64TOKEN RANK', got {line[:60]!r}") from e
    if not ranks:
        raise ValueError(f"{where}: no BPE ranks in it")
    return ranks


def save_tiktoken(ranks, path):
    """Write ranks as a .tiktoken file (tiktoken.load.load_tiktoken_bpe reads it), atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(_ranks_to_text(ranks))
    os.replace(tmp, path)


def load_tiktoken(path):
    with open(path) as f:
        return _ranks_from_text(f.read(), path)


# ---------------------------------------------------------------------------------------------- chat template
# A template turns (system, turns) into segments; each segment is a special token or plain text, and says
# whether its tokens are trained on. A turn is (user, answer, train) with answer None for the turn to complete.
Segment = namedtuple("Segment", "text special train")


def _special(name, train=False):
    return Segment(name, True, train)


def _text(text, train=False):
    return Segment(text, False, train)


def llama2_template(system, turns):
    """Llama 2 chat (Meta's reference chat_completion), one <s>...</s> block per exchange:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user2} [/INST] {answer2} </s>
    The system prompt is folded into the first user turn; a trained answer covers " {answer} " and its </s>.
    """
    segments = []
    for i, (user, answer, train) in enumerate(turns):
        segments += [_special("<s>"), _special("[INST]")]
        if i == 0 and system is not None:
            segments += [_text(" "), _special("<<SYS>>"), _text(f"\n{system}\n"), _special("<</SYS>>"),
                         _text(f"\n\n{user} ")]
        else:
            segments.append(_text(f" {user} "))
        segments.append(_special("[/INST]"))
        if answer is not None:
            segments += [_text(f" {answer} ", train), _special("</s>", train)]
    return segments


def chatml_template(system, turns, default_system=None):
    """ChatML (SmolLM2, Qwen, ...): every message is <|im_start|>{role}\\n{content}<|im_end|>\\n.

    The turn to complete ends with <|im_start|>assistant\\n; a trained answer covers {answer} and its <|im_end|>.
    Text between two control tokens is one segment, so it is split into tokens as the model's own template is.
    """
    segments = []
    system = default_system if system is None else system
    if system is not None:
        segments += [_special("<|im_start|>"), _text(f"system\n{system}"), _special("<|im_end|>"), _text("\n")]
    for user, answer, train in turns:
        segments += [_special("<|im_start|>"), _text(f"user\n{user}"), _special("<|im_end|>"), _text("\n"),
                     _special("<|im_start|>"), _text("assistant\n")]
        if answer is not None:
            segments += [_text(answer, train), _special("<|im_end|>", train), _text("\n")]
    return segments


# SmolLM2-Instruct's chat template puts this system prompt first when a conversation has none
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def llama3_template(system, turns):
    """Llama 3 (Meta's chat format): <|begin_of_text|>, then per message
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>; the turn to complete ends with the
    assistant header and \\n\\n; a trained answer covers {answer} and its <|eot_id|>."""
    def header(role):
        return [_special("<|start_header_id|>"), _text(role), _special("<|end_header_id|>")]
    segments = [_special("<|begin_of_text|>")]
    if system is not None:
        segments += header("system") + [_text(f"\n\n{system}"), _special("<|eot_id|>")]
    for user, answer, train in turns:
        segments += header("user") + [_text(f"\n\n{user}"), _special("<|eot_id|>")] + header("assistant")
        segments.append(_text("\n\n"))
        if answer is not None:
            segments += [_text(answer, train), _special("<|eot_id|>", train)]
    return segments


# A real model's template is chosen from its checkpoint (loaders.chat_template_name), never by the script
TEMPLATES = {"llama2": llama2_template, "chatml": chatml_template, "llama3": llama3_template,
             "smollm2": functools.partial(chatml_template, default_system=SMOLLM2_SYSTEM)}


def split_turns(messages, last_role):
    """Validate [system?, user, assistant, user, ...] ending with `last_role`; return (system, turns)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    system = None
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0].get("content", "").strip(), messages[1:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: expected role {expected!r} with string content, got {m!r:.80}")
    if not messages or messages[-1]["role"] != last_role:
        raise ValueError(f"messages must end with a {last_role} turn")
    turns = [(m["content"].strip(), None, False) for m in messages[::2]]
    for k, m in enumerate(messages[1::2]):
        turns[k] = (turns[k][0], m["content"].strip(), bool(m.get("train", True)))
    return system, turns


# ---------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """tiktoken Encoding + special ids + chat template."""

    def __init__(self, mergeable_ranks, pat_str=PAT_STR, template="llama2", name="bpe", special_tokens=None):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
        if special_tokens is None:
            first = max(mergeable_ranks.values()) + 1
            special_tokens = {s: first + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.mergeable_ranks, self.pat_str, self.template, self.name = mergeable_ranks, pat_str, template, name
        self.special_tokens = dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id, self.eos_id, self.pad_id = (self.special_tokens[s] for s in ("<s>", "</s>", "<pad>"))
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        # encode_ordinary: "[INST]" or "</s>" typed by a user is plain text, never a control token
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        drop = (self.bos_id, self.eos_id, self.pad_id)
        return self.enc.decode([int(i) for i in ids if int(i) not in drop])

    def _encode_segments(self, segments):
        ids, loss_mask = [], []
        for seg in segments:
            toks = [self.special_tokens[seg.text]] if seg.special else self.enc.encode_ordinary(seg.text)
            ids += toks
            loss_mask += [int(seg.train)] * len(toks)
        return ids, loss_mask

    def encode_dialog(self, messages, train_turns="all"):
        """(ids, loss_mask) of a dialogue ending with an assistant turn.

        loss_mask is 1 on each trained answer's tokens and its </s>. train_turns="last" trains only the final
        answer; an assistant message with "train": False is never trained (Ghost Attention zeroes the loss
        on earlier turns, Llama 2 section 3.3).
        """
        if train_turns not in ("all", "last"):
            raise ValueError(f"train_turns must be 'all' or 'last', got {train_turns!r}")
        system, turns = split_turns(messages, "assistant")
        if train_turns == "last":
            turns = [(u, a, t and k == len(turns) - 1) for k, (u, a, t) in enumerate(turns)]
        return self._encode_segments(TEMPLATES[self.template](system, turns))

    def encode_prompt(self, messages):
        """Ids of a conversation ending with a user turn, up to and including its [/INST]: ready to generate."""
        system, turns = split_turns(messages, "user")
        return self._encode_segments(TEMPLATES[self.template](system, turns))[0]

    def to_dict(self):
        return dict(name=self.name, pat_str=self.pat_str, template=self.template,
                    special_tokens=dict(self.special_tokens), ranks=_ranks_to_text(self.mergeable_ranks))

    @classmethod
    def from_dict(cls, d):
        missing = {"name", "pat_str", "template", "special_tokens", "ranks"} - set(d)
        if missing:
            raise ValueError(f"tokenizer dict lacks {sorted(missing)}: not saved by Tokenizer.to_dict?")
        return cls(_ranks_from_text(d["ranks"], "checkpoint tokenizer"), d["pat_str"], d["template"], d["name"],
                   d["special_tokens"])


def world_tokenizer(vocab_size=2048, cache_dir=".cache"):
    """BPE trained on every string of the embedded world; vocab_size counts the special tokens too.

    Cached as {cache_dir}/world_{vocab_size}_{hash}.tiktoken, the hash over the training text, so a changed
    world retrains. A corpus too small for the requested merges gives a smaller vocabulary.
    """
    import world  # lazily: the tokenizer code needs no world unless asked for this one
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 bytes and {len(SPECIAL_TOKENS)} specials")
    texts = world.build_world(seed=0).texts()
    digest = hashlib.sha256("\0".join([PAT_STR, *texts]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"world_{vocab_size}_{digest}.tiktoken")
    if not os.path.exists(path):
        save_tiktoken(train_bpe(texts, n_ranks), path)
    return Tokenizer(load_tiktoken(path), name=f"world_{vocab_size}")


def load_tokenizer(spec, vocab_size=2048, cache_dir=".cache"):
    """"world" (trained here), a .tiktoken file, or a tiktoken encoding name such as "cl100k_base"."""
    if spec == "world":
        return world_tokenizer(vocab_size, cache_dir)
    if spec.endswith(".tiktoken") or os.path.exists(spec):
        return Tokenizer(load_tiktoken(spec), name=os.path.basename(spec).removesuffix(".tiktoken"))
    try:
        base = tiktoken.get_encoding(spec)
    except Exception as e:
        raise ValueError(f"could not load tokenizer {spec!r}: not 'world', not a file, and tiktoken.get_encoding "
                         f"failed ({type(e).__name__}: {str(e)[:200]}). Named encodings are downloaded on first "
                         f"use, which needs network; pass a .tiktoken file instead.") from None
    # the base encoding's own specials (<|endoftext|>...) are dropped; ours follow its last id
    return Tokenizer(base._mergeable_ranks, base._pat_str, name=spec)
