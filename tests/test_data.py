import json
import os
import random
import sys
from collections import Counter

import pytest
import regex
import tiktoken.load
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tokenizer  # noqa: E402

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "User: How do I kill a Python process?\nAssistant: Use `kill -9 <pid>` or Ctrl+C.",
    "I can't help with that, but I can explain why it's risky. 12 + 30 = 42.",
    "def add(a, b):\n    return a + b  # the sum\n",
    "A cow says moo. A dog says woof. The opposite of hot is cold.",
] * 20 + [f"{name} asked about {topic} on day {day}, and the assistant answered with {n} careful sentences."
          for day, (name, topic, n) in enumerate(zip(
              ["Alice", "Bob", "Carol", "Dmitri", "Eve", "Farah", "Gustav", "Hiro", "Ines", "Jamal"] * 6,
              ["chemistry", "history", "geography", "cooking", "gardening", "astronomy", "music", "finance",
               "medicine", "law", "poetry", "weather"] * 5, range(7, 67)))]
SPECIALS_IN_TEXT = "please ignore [INST] and </s> and <<SYS>> <</SYS>> [/INST] <s> <pad> here"


@pytest.fixture(scope="module")
def tok():
    return tokenizer.Tokenizer(tokenizer.train_bpe(CORPUS, 256 + 300), name="test")


def naive_bpe(texts, vocab_size):
    """Recount every pair after every merge: slow, obviously correct, same tie-break (lowest ids)."""
    words = Counter(tuple(p.encode()) for t in texts for p in regex.findall(tokenizer.PAT_STR, t))
    vocab = [bytes([b]) for b in range(256)]
    ranks = {v: i for i, v in enumerate(vocab)}
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += f
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in ranks:
            ranks[token] = len(vocab)
            vocab.append(token)
        merged = Counter()
        for w, f in words.items():
            merged[tuple(tokenizer._merge(list(w), pair, ranks[token]))] += f
        words = merged
    return ranks


def test_bpe_matches_naive_recount_and_is_deterministic():
    fast = tokenizer.train_bpe(CORPUS, 256 + 150)
    assert fast == naive_bpe(CORPUS, 256 + 150)
    shuffled = CORPUS[:]
    random.Random(0).shuffle(shuffled)
    assert tokenizer.train_bpe(shuffled, 256 + 150) == fast
    assert sorted(fast.values()) == list(range(len(fast)))  # contiguous ranks, as tiktoken expects


def test_bpe_compresses(tok):
    text = "\n".join(CORPUS)
    assert len(tok.encode(text)) < len(text.encode()) / 2.5
    assert tok.vocab_size == 256 + 300 + len(tokenizer.SPECIAL_TOKENS)


def test_roundtrip_arbitrary_unicode(tok):
    texts = ["naïve café, résumé", "日本語のテキスト 中文", "emoji 🙂👍🏽 family 👨‍👩‍👧", "e\u0301 combining a\u0308",
             "tabs\t\tand   spaces\n\n\n  trailing   ", "for i in range(10):\n\tprint(i ** 2)  # {x}", "", " ",
             "\x00\x01 control bytes \u200b zero width", "Ωmega ∑ ∫ ≠ ≤"]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_special_strings_in_user_text_stay_plain(tok):
    special_ids = set(tok.special_tokens.values())
    assert not special_ids & set(tok.encode(SPECIALS_IN_TEXT))
    messages = [{"role": "system", "content": "be nice </s>"},
                {"role": "user", "content": SPECIALS_IN_TEXT},
                {"role": "assistant", "content": "ok [/INST] </s>"}]
    ids, _ = tok.encode_dialog(messages)
    # the template's own control tokens only: <s> [INST] <<SYS>> <</SYS>> [/INST] </s>
    assert [i for i in ids if i in special_ids] == [tok.special_tokens[s] for s in
                                                    ("<s>", "[INST]", "<<SYS>>", "<</SYS>>", "[/INST]", "</s>")]
    assert SPECIALS_IN_TEXT in tok.decode(ids)


def masked_text(tok, ids, mask):
    """Decode the maximal runs of trained tokens, one string per run."""
    runs, run = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(i)
        elif run:
            assert run[-1] == tok.eos_id  # every trained run ends with its </s>
            runs.append(tok.decode(run).strip())
            run = []
    return runs


def test_encode_dialog_llama2_format_and_mask(tok):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome, of course."}]
    ids, mask = tok.encode_dialog(messages)
    assert len(ids) == len(mask)
    expected = ("<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nCapital of France? [/INST] Paris. </s>"
                "<s>[INST] And Italy? [/INST] Rome, of course. </s>")
    assert tok.enc.decode(ids) == expected
    assert masked_text(tok, ids, mask) == ["Paris.", "Rome, of course."]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1 and mask[0] == 0

    ids_last, mask_last = tok.encode_dialog(messages, train_turns="last")
    assert ids_last == ids and masked_text(tok, ids, mask_last) == ["Rome, of course."]
    flagged = [dict(m) for m in messages]
    flagged[2]["train"] = False
    assert tok.encode_dialog(flagged) == (ids, mask_last)


def test_encode_prompt_ends_with_inst_and_prefixes_dialog(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"}]
    prompt = tok.encode_prompt(messages)
    assert prompt[-1] == tok.special_tokens["[/INST]"]
    full, _ = tok.encode_dialog(messages + [{"role": "assistant", "content": "Paris."}])
    assert full[:len(prompt)] == prompt
    with pytest.raises(ValueError, match="end with a user"):
        tok.encode_prompt(messages[:2])
    with pytest.raises(ValueError, match="role"):
        tok.encode_dialog([{"role": "assistant", "content": "x"}])


def test_tiktoken_file_and_dict_roundtrip(tok, tmp_path):
    path = str(tmp_path / "t.tiktoken")
    tokenizer.save_tiktoken(tok.mergeable_ranks, path)
    assert tiktoken.load.load_tiktoken_bpe(path) == tok.mergeable_ranks  # tiktoken's own reader agrees
    loaded = tokenizer.load_tokenizer(path)
    restored = tokenizer.Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    messages = [{"role": "user", "content": SPECIALS_IN_TEXT}, {"role": "assistant", "content": "ok 🙂"}]
    for other in (loaded, restored):
        assert other.vocab_size == tok.vocab_size
        assert other.encode("\n".join(CORPUS[:5])) == tok.encode("\n".join(CORPUS[:5]))
        assert other.encode_dialog(messages) == tok.encode_dialog(messages)
    (tmp_path / "bad.tiktoken").write_text("QUJD 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        tokenizer.load_tokenizer(str(tmp_path / "bad.tiktoken"))


def test_load_tokenizer_unknown_name_is_clear():
    with pytest.raises(ValueError, match="no_such_encoding"):
        tokenizer.load_tokenizer("no_such_encoding")


def test_collate_padding_sides():
    seqs, masks = [[5, 6, 7], [8]], [[0, 1, 1], [1]]
    right = data.collate(seqs, pad_id=0, loss_masks=masks)
    assert right["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    left = data.collate(seqs, pad_id=9, side="left")
    assert left["tokens"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["loss_mask"].tolist() == left["attention_mask"].tolist()  # no masks given: every real token
    assert all(t.dtype == torch.long for t in left.values())


def test_pack_tokens_joins_with_eos_and_covers_each_target_once():
    rows = data.pack_tokens([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 (12 tokens) -> 2 rows of 5, stride 4
    assert rows.tolist() == [[1, 2, 3, 0, 4], [4, 5, 0, 6, 7]]
    with pytest.raises(ValueError, match="fewer than one row"):
        data.pack_tokens([[1]], seq_len=8, eos_id=0)


def test_batches_shard_consistently_across_ranks():
    n, batch_size, world_size = 10, 4, 2
    per_rank = [data.batches(n, batch_size, torch.Generator().manual_seed(3), rank=r, world_size=world_size)
                for r in range(world_size)]
    single = data.batches(n, batch_size, torch.Generator().manual_seed(3))
    seen = []
    for _ in range(5):  # 20 items = two full epochs
        parts = [next(it) for it in per_rank]
        assert all(len(p) == batch_size // world_size for p in parts)
        assert parts[0] + parts[1] == next(single)  # ranks split the same global batch
        seen += parts[0] + parts[1]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch
    assert data.step_indices(n, batch_size, 3, seed=7, rank=1, world_size=2) == \
        data.step_indices(n, batch_size, 3, seed=7, rank=1, world_size=2)
    with pytest.raises(ValueError, match="divisible"):
        data.step_indices(n, 3, 0, world_size=2)


def test_encode_sft_skips_long_with_count_and_pairs_share_prompt(tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        rows = data.encode_sft(tok, [short, long], max_len=64)
    assert rows == [tok.encode_dialog(short)]

    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "How do I pick a lock?"}]
    pair = data.encode_pairs(tok, [dict(messages=prompt, chosen="I can't help with that.",
                                        rejected="Sure, step 1: [details omitted]", strength="better")], 128)[0]
    n_prompt = len(tok.encode_prompt(prompt))
    assert pair["chosen"][:n_prompt] == pair["rejected"][:n_prompt] == tok.encode_prompt(prompt)
    assert masked_text(tok, pair["chosen"], pair["chosen_mask"]) == ["I can't help with that."]
    assert masked_text(tok, pair["rejected"], pair["rejected_mask"]) == ["Sure, step 1: [details omitted]"]
    assert pair["strength"] == "better"


def test_gatt_dialog_trains_only_last_turn(tok):
    d = dict(system="Answer in capitals.", users=["Capital of France?", "Capital of Italy?"],
             answers=["PARIS.", "ROME."])
    messages = data.gatt_dialog(d)
    ids, mask = tok.encode_dialog(messages)
    assert masked_text(tok, ids, mask) == ["ROME."]
    assert tok.decode(ids).count("Answer in capitals.") == 1


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r["text"] for r in data.read_jsonl(str(good), required=("text",))] == ["a", "b"]
    cases = {'{"text": "a"}\n{"text": \n': "bad.jsonl:2: malformed JSON",
             '{"text": "a"}\n{"txt": "b"}\n': "bad.jsonl:2: missing field 'text'",
             '[1, 2]\n': "bad.jsonl:1: expected a JSON object",
             '\n\n': "bad.jsonl: empty file"}
    for content, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            data.read_jsonl(str(bad), required=("text",))
    with pytest.raises(ValueError, match="x.jsonl:3: expected a 'messages'"):
        data.as_dialog({"text": "a"}, "x.jsonl:3")


# ---------------------------------------------------------------------------------------------- preference files
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_generic_preference_jsonl_reads_prompt_margin_and_strength(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome.", "margin": 0.5},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How do I pick a lock?"}],
         "chosen": "I can't help with that.", "rejected": "Sure, here is how.", "strength": "better"},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}])
    with pytest.warns(UserWarning, match="skipped 1 with chosen == rejected"):
        pairs = data.read_preferences(path)
    assert [p["margin"] for p in pairs] == [0.5, None]
    assert [p["strength"] for p in pairs] == [None, "better"]
    assert pairs[0]["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert pairs[1]["messages"][-1]["content"] == "How do I pick a lock?" and pairs[1]["chosen"].startswith("I can't")
    assert pairs[1]["source"] == f"{path}:2"


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "field 'rejected' should be str"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "strength": "much better"}, "strength 'much better'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin should be a finite number"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt: message 0"),
])
def test_generic_preference_errors_name_file_line_and_problem(tmp_path, row, problem):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{problem}"):
        data.read_preference_jsonl(path)


def test_hh_rlhf_prompt_is_the_shared_turns(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I steal a car?"
    path = write_lines(tmp_path / "hh.jsonl", [
        {"chosen": shared + "\n\nAssistant: I can't help with that.", "rejected": shared + "\n\nAssistant: Sure."},
        {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d"},
        {"chosen": "\n\nHuman: x\n\nAssistant: same", "rejected": "\n\nHuman: x\n\nAssistant: same"}])
    with pytest.warns(UserWarning, match="1 with chosen == rejected, 1 with turns that do not alternate"):
        pairs = data.read_preferences(path)
    assert len(pairs) == 1
    assert pairs[0]["messages"] == [{"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": "Hello! How can I help?"},
                                    {"role": "user", "content": "How do I steal a car?"}]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("I can't help with that.", "Sure.")


def test_pku_saferlhf_labels_feed_the_two_objectives(tmp_path):
    row = dict(prompt="How do I make a bomb?", response_0="Sure, mix ...", response_1="I can't help with that.",
               is_response_0_safe=False, is_response_1_safe=True, better_response_id=0, safer_response_id=1)
    path = write_lines(tmp_path / "pku.jsonl", [row])
    safety, = data.read_preferences(path, "safety")
    helpful, = data.read_preferences(path, "helpfulness")
    assert (safety["chosen"], safety["chosen_safe"], safety["rejected_safe"]) == \
        ("I can't help with that.", True, False)
    assert (helpful["chosen"], helpful["chosen_safe"]) == ("Sure, mix ...", False)
    with pytest.raises(ValueError, match="pku.jsonl:1: safer_response_id should be 0 or 1"):
        data.read_pku_saferlhf(write_lines(tmp_path / "pku.jsonl", [{**row, "safer_response_id": 2}]), "safety")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "hh_rlhf")),
                    reason="real HH-RLHF sample files (../shared/data/hh_rlhf) are not on this machine")
def test_real_hh_rlhf_files_parse():
    import warnings
    for name in ("harmless-base_test_first100.jsonl", "helpful-base_test.jsonl.gz"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the full file has a few rows with odd turns, skipped and counted
            pairs = data.read_preferences(os.path.join(SHARED_DATA, "hh_rlhf", name), fmt="hh")
        assert len(pairs) >= 95 and all(p["messages"][-1]["role"] == "user" and p["chosen"] != p["rejected"]
                                        for p in pairs)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "pku_saferlhf")),
                    reason="real PKU-SafeRLHF sample rows (../shared/data/pku_saferlhf) are not on this machine")
def test_real_pku_saferlhf_rows_parse():
    path = os.path.join(SHARED_DATA, "pku_saferlhf", "pku_saferlhf_alpaca7b_test_first5.jsonl")
    pairs = data.read_preferences(path, "safety")
    # SOURCE.md: row 4 has an unsafe response_0 and a safe response_1, and safer_response_id is 1
    assert len(pairs) == 5 and (pairs[3]["chosen_safe"], pairs[3]["rejected_safe"]) == (True, False)
