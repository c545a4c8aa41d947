"""Everything between text and token tensors that is not the tokenizer itself (tokenizer.py).

- Pre-training packing, a DDP-sharded batch order, SFT and preference-pair encoding, collation with padding
  on either side.
- Readers whose errors name file:line: generic JSONL (dialogues, prompts), and real preference formats
  (Anthropic HH-RLHF, PKU-SafeRLHF).
- The pre-training data audit of Llama 2 section 4.1.
"""
import gzip
import itertools
import json
import warnings
from collections import Counter

import regex  # installed with tiktoken
import torch

from tokenizer import split_turns


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
        split_turns(messages, "assistant")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return messages


def jsonl_lines(path):
    """(line number, parsed object) of a JSONL file, plain or gzip-compressed (.gz), blank lines skipped;
    malformed JSON or a row that is not an object raises ValueError naming path:line."""
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


def read_jsonl(path, required=(), with_lines=False):
    """Rows of a JSONL file (blank lines skipped); malformed JSON, a non-object row or a missing required field
    raises ValueError naming path:line, and so does a file without rows. with_lines: (line number, row) pairs,
    so that later checks can name the line too."""
    rows = []
    for lineno, row in jsonl_lines(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field {', '.join(map(repr, missing))}")
        rows.append((lineno, row) if with_lines else row)
    if not rows:
        raise ValueError(f"{path}: empty file, no JSON rows")
    return rows


def write_jsonl(path, rows):
    """One JSON object per line, UTF-8: the form read_jsonl reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_prompts(path):
    """Prompts from a JSONL file, one per line: {"messages": [..., a user turn]} or {"prompt": text}, each with an
    optional boolean "safety" (the is_safety tag the Llama 2 reward gate reads; default false) and "category" (a
    risk category, for answer templates). Returns dicts: messages, safety, category, where ("file:line")."""
    prompts = []
    for line, row in read_jsonl(path, with_lines=True):
        where = f"{path}:{line}"
        if "messages" in row:
            messages = row["messages"]
        elif "prompt" in row:
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError(f"{where}: expected a 'prompt' or 'messages' field, got {sorted(row)}")
        try:
            split_turns(messages, "user")
        except ValueError as e:
            raise ValueError(f"{where}: {e} (expected 'messages' ending with a user turn, or 'prompt')") from None
        if not isinstance(row.get("safety", False), bool):
            raise ValueError(f"{where}: field 'safety' should be true or false, got {row['safety']!r}")
        prompts.append(dict(messages=messages, safety=row.get("safety", False),
                            category=row.get("category", "generic"), where=where))
    return prompts


# ---------------------------------------------------------------------------------------------- preference files
# Readers for real preference data. Each returns pairs as dicts: messages (the prompt, ending with a user turn),
# chosen and rejected (response texts), strength (a Llama 2 preference-strength label or None), margin (a number
# given by the file, or None), source ("file:line"); train_rm.py and train_dpo.py take them as they take the
# world's pairs. Rows that cannot form a pair are skipped with one warning counting each reason; a malformed
# row (bad JSON, a missing field, a wrong type) raises an error naming file and line.
PREFERENCE_STRENGTHS = ("significantly better", "better", "slightly better", "negligibly better", "unsure")


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
     PREFERENCE_STRENGTHS (m from train_rm's margin table), optional "category": a label the held-out accuracy
     is reported by}."""
    pairs, skipped = [], Counter()
    for lineno, row in jsonl_lines(path):
        where = f"{path}:{lineno}"
        prompt = _field(row, "prompt", (str, list), where)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            split_turns(messages, "user")
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
                          margin=None if margin is None else float(margin), category=row.get("category"),
                          source=where))
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
    for lineno, row in jsonl_lines(path):
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
    for lineno, row in jsonl_lines(path):
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
        _, first = next(jsonl_lines(path), (0, {}))
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
