"""Everything between text and token tensors: tokenizer, chat template, datasets, collation.

- A byte-level BPE trainer (Sennrich et al. 2016, in GPT-2's byte-level form) whose merges become a tiktoken
  Encoding, saved in tiktoken's own `.tiktoken` format (base64 token, space, rank; one per line).
- The Llama 2 chat template (the `[INST]` format of Meta's reference code) and the loss mask of Llama 2
  section 3.1: during SFT the loss is on answer tokens only, prompt tokens are masked.
- Pre-training packing, a DDP-sharded batch order, SFT and preference-pair encoding, collation with padding
  on either side, and a JSONL reader whose errors name file:line.
"""
import base64
import functools
import hashlib
import heapq
import itertools
import json
import os
import warnings
from collections import Counter, defaultdict, namedtuple

import regex  # installed with tiktoken; the same \p{L} classes and possessive quantifiers tiktoken's regex uses
import tiktoken
import torch

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


def _split_turns(messages, last_role):
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
        system, turns = _split_turns(messages, "assistant")
        if train_turns == "last":
            turns = [(u, a, t and k == len(turns) - 1) for k, (u, a, t) in enumerate(turns)]
        return self._encode_segments(TEMPLATES[self.template](system, turns))

    def encode_prompt(self, messages):
        """Ids of a conversation ending with a user turn, up to and including its [/INST]: ready to generate."""
        system, turns = _split_turns(messages, "user")
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


# ---------------------------------------------------------------------------------------------- batching
def collate(seqs, pad_id, loss_masks=None, side="right"):
    """Pad token lists into LongTensors tokens, attention_mask, loss_mask, each (B, T).

    attention_mask is 1 on real tokens; loss_mask is the given per-token mask (1 = trained), or 1 on every real
    token when none is given. side="left" right-aligns the rows, as generation and last-token scoring want.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("collate got no sequences")
    B, T = len(seqs), max(len(s) for s in seqs)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.long)
    for i, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(T - len(seq), T)
        tokens[i, cols] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[i, cols] = 1
        if loss_masks is None:
            loss_mask[i, cols] = 1
        elif len(loss_masks[i]) != len(seq):
            raise ValueError(f"row {i}: loss mask has {len(loss_masks[i])} entries for {len(seq)} tokens")
        else:
            loss_mask[i, cols] = torch.as_tensor(loss_masks[i], dtype=torch.long)
    return dict(tokens=tokens, attention_mask=attention_mask, loss_mask=loss_mask)


def pack_tokens(token_lists, seq_len, eos_id):
    """Pre-training rows: documents joined by </s>, cut into (N, seq_len + 1) windows; loss on every token.

    Windows overlap by one token (stride seq_len), so each token is a target exactly once; the tail shorter
    than a window is dropped.
    """
    stream = [t for toks in token_lists for t in (*toks, eos_id)]
    n_rows = (len(stream) - 1) // seq_len
    if n_rows < 1:
        raise ValueError(f"{len(stream)} tokens are fewer than one row of seq_len + 1 = {seq_len + 1}")
    return torch.tensor(stream[:n_rows * seq_len + 1]).unfold(0, seq_len + 1, seq_len).contiguous()


def step_indices(n_items, batch_size, step, seed=0, rank=0, world_size=1):
    """This rank's item indices for global batch `step`, computed from (seed, step) alone so a resumed run
    continues the same order.

    The global order is a fresh permutation of the items per epoch; global batch `step` is positions
    [step * batch_size, (step + 1) * batch_size) of that stream, and rank r takes the r-th of world_size
    equal slices. Every rank computes the same global batch.
    """
    if n_items < 1:
        raise ValueError("no items to batch")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    per_rank = batch_size // world_size
    start = step * batch_size + rank * per_rank
    perms = {}
    indices = []
    for pos in range(start, start + per_rank):
        epoch, j = divmod(pos, n_items)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_items, generator=g).tolist()
        indices.append(perms[epoch][j])
    return indices


def batches(n_items, batch_size, generator, rank=0, world_size=1):
    """Endless iterator of this rank's index lists; ranks whose generators share a seed agree on the order."""
    seed = int(torch.randint(0, 2**40, (1,), generator=generator))
    for step in itertools.count():
        yield step_indices(n_items, batch_size, step, seed, rank, world_size)


# ---------------------------------------------------------------------------------------------- datasets
def encode_sft(tok, dialogs, max_len):
    """[(ids, loss_mask)] for dialogues ending with an assistant turn.

    A dialogue longer than max_len tokens is skipped, with one warning counting them: cutting it would drop the
    end of an answer and its </s>, teaching the model to stop nowhere.
    """
    rows = [tok.encode_dialog(messages) for messages in dialogs]
    kept = [r for r in rows if len(r[0]) <= max_len]
    if len(kept) < len(rows):
        warnings.warn(f"encode_sft: skipped {len(rows) - len(kept)} of {len(rows)} dialogs longer than "
                      f"{max_len} tokens")
    return kept


def encode_pairs(tok, pairs, max_len):
    """Preference pairs as token rows sharing the prompt.

    Each pair is a dict with the prompt as "messages" (ending with a user turn) or as "example" (an object with
    .messages), plus "chosen" and "rejected" response texts and an optional "strength". Returns dicts with
    chosen, chosen_mask, rejected, rejected_mask (masks 1 on the final response and its </s> only) and
    strength. Pairs where either side exceeds max_len tokens are skipped with a counted warning.
    """
    rows, skipped = [], 0
    for pair in pairs:
        prompt = pair["messages"] if "messages" in pair else pair["example"].messages
        chosen, chosen_mask = tok.encode_dialog(prompt + [{"role": "assistant", "content": pair["chosen"]}], "last")
        rejected, rejected_mask = tok.encode_dialog(prompt + [{"role": "assistant", "content": pair["rejected"]}],
                                                    "last")
        if max(len(chosen), len(rejected)) > max_len:
            skipped += 1
            continue
        rows.append(dict(chosen=chosen, chosen_mask=chosen_mask, rejected=rejected, rejected_mask=rejected_mask,
                         strength=pair.get("strength")))
    if skipped:
        warnings.warn(f"encode_pairs: skipped {skipped} of {len(pairs)} pairs longer than {max_len} tokens")
    return rows


def gatt_dialog(d):
    """A Ghost Attention training dialogue (Llama 2 section 3.3) from the world's {system, users, answers}: the
    instruction stays only as the first turn's system prompt, and the loss is zeroed on all earlier turns."""
    messages = [{"role": "system", "content": d["system"]}]
    for k, (user, answer) in enumerate(zip(d["users"], d["answers"])):
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": answer, "train": k == len(d["users"]) - 1}]
    return messages


def as_dialog(row, where):
    """A JSONL row as chat messages: {"messages": [{role, content}, ...]} or {"prompt", "response"}.
    `where` (file:line) names the row in errors."""
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise ValueError(f"{where}: expected a 'messages' field or 'prompt' and 'response', got {sorted(row)}")
    try:
        _split_turns(messages, "assistant")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return messages


def read_jsonl(path, required=(), with_lines=False):
    """Rows of a JSONL file (blank lines skipped); malformed JSON, a non-object row or a missing required field
    raises ValueError naming path:line, and so does a file without rows. with_lines: (line number, row) pairs,
    so that later checks can name the line too."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field {', '.join(map(repr, missing))}")
            rows.append((lineno, row) if with_lines else row)
    if not rows:
        raise ValueError(f"{path}: empty file, no JSON rows")
    return rows


# ---------------------------------------------------------------------------------------------- preference files
# Readers for real preference data. Each returns pairs as dicts: messages (the prompt, ending with a user turn),
# chosen and rejected (response texts), strength (a Llama 2 preference-strength label or None), margin (a number
# given by the file, or None), source ("file:line"); train_rm.py and train_dpo.py take them as they take the
# world's pairs. Rows that cannot form a pair are skipped with one warning counting each reason; a malformed
# row (bad JSON, a missing field, a wrong type) raises an error naming file and line.
PREFERENCE_STRENGTHS = ("significantly better", "better", "slightly better", "negligibly better", "unsure")


def _jsonl_lines(path):
    """(line number, parsed object) of a JSONL file, plain or gzip-compressed (.gz), blank lines skipped."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _field(row, name, kind, where):
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], kind):
        raise ValueError(f"{where}: field {name!r} should be {getattr(kind, '__name__', kind)}, "
                         f"got {type(row[name]).__name__}")
    return row[name]


def _finish_pairs(pairs, skipped, path):
    if skipped:
        warnings.warn(f"{path}: skipped " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs")
    return pairs


def read_preference_jsonl(path):
    """Generic preference JSONL, one pair per line:
    {"prompt": text or [{role, content}, ...] ending with a user turn, "chosen": text, "rejected": text,
     optional "margin": number (the ranking loss's m, used as given), optional "strength": one of
     PREFERENCE_STRENGTHS (m from train_rm's margin table)}."""
    pairs, skipped = [], Counter()
    for lineno, row in _jsonl_lines(path):
        where = f"{path}:{lineno}"
        prompt = _field(row, "prompt", (str, list), where)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            _split_turns(messages, "user")
        except ValueError as e:
            raise ValueError(f"{where}: prompt: {e}") from None
        chosen, rejected = _field(row, "chosen", str, where), _field(row, "rejected", str, where)
        strength, margin = row.get("strength"), row.get("margin")
        if strength is not None and strength not in PREFERENCE_STRENGTHS:
            raise ValueError(f"{where}: strength {strength!r} is not one of {PREFERENCE_STRENGTHS}")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not abs(margin) < float("inf")):
            raise ValueError(f"{where}: margin should be a finite number, got {margin!r}")
        if chosen.strip() == rejected.strip():
            skipped["with chosen == rejected"] += 1
            continue
        pairs.append(dict(messages=messages, chosen=chosen.strip(), rejected=rejected.strip(), strength=strength,
                          margin=None if margin is None else float(margin), source=where))
    return _finish_pairs(pairs, skipped, path)


HH_TURN = regex.compile(r"\n\n(Human|Assistant):")


def hh_transcript(text):
    """An Anthropic HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as chat messages, or None when its
    turns do not alternate Human, Assistant, ... (a few rows of the released files)."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        return None
    roles = parts[1::2]
    if not roles or any(r != ("Human" if i % 2 == 0 else "Assistant") for i, r in enumerate(roles)):
        return None
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(roles, parts[2::2])]


def read_hh_rlhf(path):
    """Anthropic HH-RLHF (Bai et al., 2022), .jsonl or .jsonl.gz: {"chosen": transcript, "rejected": transcript}.

    Both transcripts share every turn but the last Assistant reply; the shared turns are the prompt. In
    harmless-base the chosen reply is the less harmful one (a safety pair), in helpful-base the more helpful one.
    Rows whose transcripts differ before the last reply, do not alternate turns, end with an empty reply or have
    chosen == rejected are skipped with a counted warning.
    """
    pairs, skipped = [], Counter()
    for lineno, row in _jsonl_lines(path):
        where = f"{path}:{lineno}"
        chosen, rejected = hh_transcript(_field(row, "chosen", str, where)), \
            hh_transcript(_field(row, "rejected", str, where))
        if chosen is None or rejected is None or chosen[-1]["role"] != "assistant" \
                or rejected[-1]["role"] != "assistant":
            skipped["with turns that do not alternate Human/Assistant"] += 1
        elif chosen[:-1] != rejected[:-1]:
            skipped["whose transcripts differ before the last reply"] += 1
        elif not chosen[-1]["content"] or not rejected[-1]["content"]:
            skipped["with an empty last reply"] += 1
        elif chosen[-1]["content"] == rejected[-1]["content"]:
            skipped["with chosen == rejected"] += 1
        else:
            pairs.append(dict(messages=chosen[:-1], chosen=chosen[-1]["content"], rejected=rejected[-1]["content"],
                              strength=None, margin=None, source=where))
    return _finish_pairs(pairs, skipped, path)


def read_pku_saferlhf(path, objective):
    """PKU-SafeRLHF (Ji et al., 2023): a prompt, response_0 and response_1, and two labels: better_response_id
    (the more helpful one) feeds objective "helpfulness", safer_response_id (the more harmless one) feeds
    "safety". When the rows carry is_response_{0,1}_safe, the pairs record chosen_safe and rejected_safe."""
    if objective not in ("safety", "helpfulness"):
        raise ValueError(f"objective must be 'safety' or 'helpfulness', got {objective!r}")
    label = "safer_response_id" if objective == "safety" else "better_response_id"
    pairs, skipped = [], Counter()
    for lineno, row in _jsonl_lines(path):
        where = f"{path}:{lineno}"
        prompt = _field(row, "prompt", str, where)
        responses = [_field(row, "response_0", str, where), _field(row, "response_1", str, where)]
        best = _field(row, label, int, where)
        if best not in (0, 1):
            raise ValueError(f"{where}: {label} should be 0 or 1, got {best!r}")
        if responses[0].strip() == responses[1].strip():
            skipped["with response_0 == response_1"] += 1
            continue
        pair = dict(messages=[{"role": "user", "content": prompt}], chosen=responses[best].strip(),
                    rejected=responses[1 - best].strip(), strength=None, margin=None, source=where)
        if f"is_response_{best}_safe" in row and f"is_response_{1 - best}_safe" in row:
            pair.update(chosen_safe=bool(row[f"is_response_{best}_safe"]),
                        rejected_safe=bool(row[f"is_response_{1 - best}_safe"]))
        pairs.append(pair)
    return _finish_pairs(pairs, skipped, path)


def read_preferences(path, objective="helpfulness", fmt="auto"):
    """Preference pairs from a file in format "jsonl" (generic), "hh" (HH-RLHF) or "pku" (PKU-SafeRLHF, labels
    for `objective`); "auto" looks at the first row: response_0 -> pku, prompt -> jsonl, else hh."""
    if fmt == "auto":
        _, first = next(_jsonl_lines(path), (0, {}))
        fmt = "pku" if "response_0" in first else "jsonl" if "prompt" in first else "hh"
    readers = {"jsonl": read_preference_jsonl, "hh": read_hh_rlhf,
               "pku": lambda p: read_pku_saferlhf(p, objective)}
    if fmt not in readers:
        raise ValueError(f"unknown preference format {fmt!r}; choose from auto, {', '.join(readers)}")
    return readers[fmt](path)


# ---------------------------------------------------------------------------------------------- pre-training data audit
# Llama 2, section 4.1: personal data is kept out of the pre-training corpus, and the corpus is described by how
# often it uses gendered pronouns and mentions identity terms along five demographic axes (Table 9). Counting is
# lexical (a word matched anywhere in a document), so "white" in "snow is white" counts as a race term, as it
# does in the paper's count. The term lists are short and illustrative, not the HolisticBias lists.
PERSONAL_DATA_PATTERNS = {  # applied in this order, each match replaced by "[name]"
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "card_number": r"(?<!\d)(?:\d{4}[ -]){3}\d{4}(?!\d)",
    "id_number": r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)",                # the shape of a US social security number
    "ip_address": r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]\d{4}(?!\d)",
}
PRONOUNS = {  # Llama 2 Table 9a groups
    "she": ("she", "her", "hers", "herself"),
    "he": ("he", "him", "his", "himself"),
    "unspecified": ("they", "them", "their", "theirs", "themself", "themselves"),
    "first_person": ("i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves"),
    "second_person": ("you", "your", "yours", "yourself", "yourselves"),
}
IDENTITY_TERMS = {  # Llama 2 Table 9b axes
    "gender_and_sex": ("woman", "women", "man", "men", "female", "male", "girl", "boy", "mother", "father",
                       "transgender", "nonbinary"),
    "sexual_orientation": ("gay", "lesbian", "bisexual", "straight", "heterosexual", "homosexual", "queer",
                           "asexual"),
    "nationality": ("american", "british", "chinese", "indian", "mexican", "french", "german", "japanese",
                    "russian", "canadian", "italian", "immigrant", "immigrants"),
    "race_and_ethnicity": ("black", "white", "asian", "african", "hispanic", "latino", "indigenous", "arab",
                           "european", "caucasian"),
    "religion": ("christian", "muslim", "jewish", "hindu", "buddhist", "catholic", "atheist", "sikh", "religious",
                 "religion"),
}


def scrub_personal_data(text):
    """(text with every personal-data match replaced by "[pattern name]", Counter of matches per pattern)."""
    removed = Counter()
    for name, pattern in PERSONAL_DATA_PATTERNS.items():
        text, n = regex.subn(pattern, f"[{name}]", text)
        removed[name] += n
    return text, removed


def audit_corpus(texts):
    """The pre-training data audit of Llama 2 section 4.1 over a list of documents (a pure function).

    Personal data is scrubbed first and counted per pattern; then, over the scrubbed documents:
    pronouns[group] = documents using the group, share of the documents that use any listed pronoun, mentions;
    identity_terms[axis] = documents mentioning the axis, their share of all documents, and per term the
    documents mentioning it and their share of the axis's documents (the percentages of Table 9).
    """
    removed = Counter({name: 0 for name in PERSONAL_DATA_PATTERNS})
    pronoun_docs, pronoun_mentions, any_pronoun = Counter(), Counter(), 0
    term_docs, axis_docs = Counter(), Counter()
    for text in texts:
        text, found = scrub_personal_data(text)
        removed.update(found)
        words = Counter(regex.findall(r"\p{L}+", text.lower()))
        any_pronoun += any(words[w] for ws in PRONOUNS.values() for w in ws)
        for group, ws in PRONOUNS.items():
            n = sum(words[w] for w in ws)
            pronoun_docs[group] += n > 0
            pronoun_mentions[group] += n
        for axis, terms in IDENTITY_TERMS.items():
            present = [t for t in terms if words[t]]
            axis_docs[axis] += bool(present)
            term_docs.update((axis, t) for t in present)
    share = lambda n, d: n / d if d else 0.0
    return dict(
        n_documents=len(texts),
        personal_data_removed=dict(removed),
        documents_with_pronouns=any_pronoun,
        pronouns={g: dict(documents=pronoun_docs[g], share=share(pronoun_docs[g], any_pronoun),
                          mentions=pronoun_mentions[g]) for g in PRONOUNS},
        identity_terms={axis: dict(documents=axis_docs[axis], share=share(axis_docs[axis], len(texts)),
                                   terms={t: dict(documents=term_docs[axis, t],
                                                  share=share(term_docs[axis, t], axis_docs[axis]))
                                          for t in terms})
                        for axis, terms in IDENTITY_TERMS.items()},
    )
