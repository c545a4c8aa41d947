"""loaders.py: HF, Meta and GGUF layouts load into the same Transformer; SmolLM2 agrees with references.

The synthetic tests write a micro model in each layout (HF's rotary permutation applied by the test, as HF's
conversion script does) and check the loaded model gives the original's logits. The SmolLM2 tests need the GGUF
(`python loaders.py --fetch-smollm2`) and the optional gguf package, and skip without them.
"""
import json
import os

import numpy as np
import pytest
import regex
import torch

import loaders
import tokenizer
from loaders import load_any_model
from model import ModelConfig, Transformer, apply_rope, generate, rope_tables

SMOLLM2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), loaders.SMOLLM2_GGUF)
needs_smollm2 = pytest.mark.skipif(not os.path.exists(SMOLLM2),
                                   reason=f"{loaders.SMOLLM2_GGUF} absent; get it with: {loaders.FETCH_SMOLLM2}")
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXTS = ["The quick brown fox jumps over the lazy dog; 12 foxes, 345 dogs.", "def add(a, b):\n    return a + b\n",
         "Café naïve – 東京 🙂", "How do I kill a Python process?   Use kill -9 1234."] * 3


# ---------------------------------------------------------------------------------------------- fixtures
def hf_permute(w, n_heads):
    """Meta rows -> HF rows, as HF's conversion script writes wq and wk: within each head, all first components of
    the rotated pairs, then all second ones."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def micro_model(tie, vocab_size, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=50000.0,
                         max_seq_len=64, tie_embeddings=tie)
    model = Transformer(config).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def byte_level_vocab():
    """A small byte-level BPE in HF's form: control tokens first, then tokens in GPT-2's alphabet by merge order,
    and one merge per merged token (a split into two earlier tokens)."""
    ranks = tokenizer.train_bpe(TEXTS, 400)
    alphabet = loaders.bytes_to_unicode()
    spell = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = len(SPECIALS) + rank
        if len(token) > 1:
            left, right = next((token[:k], token[k:]) for k in range(1, len(token))
                               if ranks.get(token[:k], 1e9) < rank and ranks.get(token[k:], 1e9) < rank)
            merges.append(f"{spell(left)} {spell(right)}")
    return vocab, merges, ranks


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype={torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def write_hf_folder(folder, model, vocab, merges, weights="safetensors", dtype=torch.float32):
    cfg = model.config
    to_hf = {v: k for k, v in loaders.HF_NAMES.items()}
    state = {}
    for name, w in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        parts = name.split(".")
        if parts[0] == "layers":
            module = ".".join(parts[2:-1])
            if module == "attention.wq":
                w = hf_permute(w, cfg.n_heads)
            elif module == "attention.wk":
                w = hf_permute(w, cfg.n_kv_heads)
            key = f"model.layers.{parts[1]}.{to_hf[module]}.weight"
        else:
            key = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}[name]
        state[key] = w.to(dtype).contiguous()
    os.makedirs(folder, exist_ok=True)
    if weights == "safetensors":
        write_safetensors(os.path.join(folder, "model.safetensors"), state)
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    json.dump(dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=cfg.dim,
                   num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                   intermediate_size=cfg.hidden_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                   max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                   vocab_size=cfg.vocab_size, hidden_act="silu", bos_token_id=1, eos_token_id=2),
              open(os.path.join(folder, "config.json"), "w"))
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                  "use_regex": True}]}
    json.dump({"version": "1.0", "normalizer": None, "pre_tokenizer": pre, "decoder": {"type": "ByteLevel"},
               "added_tokens": [dict(id=i, content=s, special=True) for i, s in enumerate(SPECIALS)],
               "model": dict(type="BPE", vocab=vocab, merges=merges, byte_fallback=False)},
              open(os.path.join(folder, "tokenizer.json"), "w"))
    json.dump(dict(chat_template=CHATML_JINJA, pad_token="<|im_end|>"),
              open(os.path.join(folder, "tokenizer_config.json"), "w"))


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


# ---------------------------------------------------------------------------------------------- rotary layout
def test_unpermuted_hf_rows_under_rotate_half_equal_interleaved_rope():
    torch.manual_seed(0)
    H, D, T = 3, 8, 5
    q = torch.randn(1, T, H, D)
    cos, sin = rope_tables(D, 16, 10000.0)
    positions = torch.arange(T)[None]
    meta = apply_rope(q, torch.complex(cos, sin)[positions, None])                  # Meta: interleaved pairs
    # HF's rotate-half RoPE on the HF-permuted rows: x * cos + rotate_half(x) * sin with the angles repeated
    perm = hf_permute(torch.arange(H * D, dtype=torch.float32)[:, None], H).long().squeeze(1)
    q_hf = q.flatten(2)[..., perm].unflatten(-1, (H, D))
    c, s = torch.cat([cos[positions]] * 2, -1)[:, :, None], torch.cat([sin[positions]] * 2, -1)[:, :, None]
    rotate_half = torch.cat([-q_hf[..., D // 2:], q_hf[..., :D // 2]], -1)
    hf = q_hf * c + rotate_half * s
    assert torch.allclose(hf, meta.flatten(2)[..., perm].unflatten(-1, (H, D)), atol=1e-6)
    w = torch.randn(H * D, 7)
    assert torch.equal(loaders.unpermute_rotary(hf_permute(w, H), H), w)


# ---------------------------------------------------------------------------------------------- the three layouts
@pytest.mark.parametrize("weights,tie", [("safetensors", False), ("bin", True)])
def test_hf_folder_loads_to_the_same_model(tmp_path, weights, tie):
    vocab, merges, ranks = byte_level_vocab()
    original = micro_model(tie, len(vocab))
    write_hf_folder(str(tmp_path), original, vocab, merges, weights)
    model, ckpt = load_any_model(str(tmp_path))
    tok = tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])
    assert ckpt["format"] == "hf" and model.config.tie_embeddings == tie and model.config.rope_theta == 50000.0
    assert model.config.n_kv_heads == 2 and model.config.hidden_dim == original.config.hidden_dim
    tokens = tok.encode(TEXTS[0])
    assert torch.allclose(logits(model, tokens), logits(original, tokens), atol=1e-5)
    # ids are the vocabulary's: the BPE ranks shifted past the control tokens
    assert tok.mergeable_ranks == {b: r + len(SPECIALS) for b, r in ranks.items()}
    assert tok.template == "chatml" and tok.eos_id == 2 and tok.pad_id == 2 and tok.bos_id == 1
    ids = tok.encode_prompt([{"role": "user", "content": "Hi <|im_end|>"}])
    assert ids[0] == 1 and ids.count(2) == 1   # the typed <|im_end|> stays text


def test_hf_folder_agrees_with_transformers_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional reference)")
    vocab, merges, _ = byte_level_vocab()
    original = micro_model(False, len(vocab))
    write_hf_folder(str(tmp_path), original, vocab, merges)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    model, _ = load_any_model(str(tmp_path))
    tokens = list(range(5, 45))
    with torch.no_grad():  # HF's rotate-half code on HF's rows vs model.py on the un-permuted rows
        assert torch.allclose(logits(model, tokens), hf(torch.tensor([tokens])).logits[0], atol=1e-4)


def test_hf_bf16_safetensors_keep_their_values(tmp_path):
    vocab, merges, _ = byte_level_vocab()
    original = micro_model(False, len(vocab))
    write_hf_folder(str(tmp_path), original, vocab, merges, dtype=torch.bfloat16)
    model, _ = load_any_model(str(tmp_path))
    expected = original.layers[1].feed_forward.w2.weight.to(torch.bfloat16).float()
    assert torch.equal(model.layers[1].feed_forward.w2.weight, expected)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_folder_loads_with_its_tiktoken_vocabulary(tmp_path, n_shards):
    ranks = tokenizer.train_bpe(TEXTS, 400)
    n_special = 16
    original = micro_model(False, len(ranks) + n_special)
    state = original.state_dict()
    # model-parallel shards as Meta's code splits them: column-parallel on rows, row-parallel on columns
    for rank in range(n_shards):
        shard = {}
        for k, w in state.items():
            dim = None if n_shards == 1 or k.endswith("norm.weight") else \
                1 if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0
            shard[k] = w if dim is None else w.chunk(n_shards, dim)[rank].clone()
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    cfg = original.config
    json.dump(dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                   vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta),
              open(tmp_path / "params.json", "w"))
    tokenizer.save_tiktoken(ranks, str(tmp_path / "tokenizer.model"))
    model, ckpt = load_any_model(str(tmp_path))
    tok = tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])
    tokens = tok.encode(TEXTS[1])
    assert torch.allclose(logits(model, tokens), logits(original, tokens), atol=1e-5)
    first = len(ranks)
    assert tok.template == "llama3" and tok.bos_id == first and tok.eos_id == first + 9  # <|eot_id|>
    assert tok.special_tokens["<|start_header_id|>"] == first + 6
    ids = tok.encode_prompt([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [first, first + 6] and ids[-1] == tok.encode("\n\n")[0]


def test_gguf_with_quantised_tensors_loads(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install gguf)")
    vocab, merges, ranks = byte_level_vocab()
    original = micro_model(True, len(vocab))
    cfg = original.config
    path = str(tmp_path / "micro.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = sorted(vocab, key=vocab.get)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML_JINJA)
    to_gguf = {v: k for k, v in loaders.GGUF_NAMES.items()}
    quantised = set()
    for name, w in original.state_dict().items():
        if name == "output.weight":
            continue  # tied: a GGUF without output.weight ties the head to token_embd
        parts = name.split(".")
        key = (f"blk.{parts[1]}.{to_gguf['.'.join(parts[2:-1])]}.weight" if parts[0] == "layers"
               else f"{to_gguf[parts[0]]}.weight")
        w = w.numpy().astype(np.float32)
        if ".attention.w" in name:  # Q8_0 blocks of 32 along the input dimension, as llama.cpp stores them
            writer.add_tensor(key, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantised.add(name)
        else:
            writer.add_tensor(key, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model, ckpt = load_any_model(path)
    tok = tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])
    assert model.config.tie_embeddings and model.config.rope_theta == 50000.0 and tok.template == "chatml"
    loaded = model.state_dict()
    for name, w in original.state_dict().items():
        tol = w.abs().max().item() / 127 if name in quantised else 0  # Q8_0: one step of a block's scale
        assert (loaded[name] - w).abs().max().item() <= tol + 1e-6, name
    assert tok.encode(TEXTS[2]) == [vocab[s] for s in reference_pieces(TEXTS[2], vocab, merges)]


def test_unsupported_sources_get_clear_errors(tmp_path, monkeypatch):
    vocab, merges, _ = byte_level_vocab()
    write_hf_folder(str(tmp_path), micro_model(False, len(vocab)), vocab, merges)
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="rope scaling"):
        load_any_model(str(tmp_path))
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    spec = json.load(open(tmp_path / "tokenizer.json"))
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    json.dump(spec, open(tmp_path / "tokenizer.json", "w"))
    with pytest.raises(ValueError, match="merge order"):
        load_any_model(str(tmp_path))
    monkeypatch.setattr(loaders, "SMOLLM2_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="fetch-smollm2"):
        load_any_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ValueError, match="not recognised"):
        loaders.chat_template_name("{{ messages }}", {}, "x")


# ---------------------------------------------------------------------------------------------- chat templates
def spell(tok, ids, names):
    """Text of ids with control tokens by their vocabulary names (the Encoding also knows them as <s>, </s>,
    <pad>, and which name it prints for a shared id is not fixed)."""
    by_id = {tok.special_tokens[n]: n for n in names}
    return "".join(by_id[i] if i in by_id else tok.enc.decode([i]) for i in ids)


def test_chat_templates_render_the_models_own_format():
    ranks = tokenizer.train_bpe(TEXTS, 300)
    first = len(ranks)
    names = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>"]
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}]
    expected = {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                  "Hello!<|im_end|>\n",
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
                  "<|end_header_id|>\n\nHello!<|eot_id|>",
    }
    for template, text in expected.items():
        specials = loaders.template_special_tokens({n: first + i for i, n in enumerate(names)}, template, None, "t")
        tok = tokenizer.Tokenizer(ranks, loaders.GPT2_PAT, template, "t", specials)
        ids, mask = tok.encode_dialog(dialog)
        assert spell(tok, ids, names) == text
        end = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
        assert spell(tok, [i for i, m in zip(ids, mask) if m], names) == "Hello!" + end
        assert tok.eos_id == specials[end]
    # SmolLM2's template adds its default system prompt when a conversation has none
    assert tokenizer.TEMPLATES["smollm2"](None, [("Hi", None, False)])[1].text == "system\n" + tokenizer.SMOLLM2_SYSTEM
    smollm_jinja = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
                    + tokenizer.SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}")
    assert loaders.chat_template_name(smollm_jinja, {}, "t") == "smollm2"
    assert loaders.chat_template_name(CHATML_JINJA, {}, "t") == "chatml"
    assert loaders.chat_template_name(None, {"<|start_header_id|>": 5}, "t") == "llama3"


# ---------------------------------------------------------------------------------------------- SmolLM2
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def reference_pieces(text, vocab, merges):
    """Byte-level BPE the way SmolLM2's tokenizer.json runs it, written independently of tiktoken: split off every
    digit, split each part with GPT-2's regex, spell bytes in GPT-2's alphabet, then repeatedly apply the
    highest-priority merge among adjacent pairs (leftmost first)."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    others = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) if b in printable else chr(0x100 + others.index(b)) for b in range(256)}
    priority = {tuple(m.split(" ")): k for k, m in enumerate(merges)}
    out = []
    for part in regex.split(r"(\p{N})", text):
        for piece in regex.findall(GPT2_SPLIT, part):
            word = [alphabet[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                rank, i = min((priority.get(pair, float("inf")), i) for i, pair in enumerate(zip(word, word[1:])))
                if rank == float("inf"):
                    break
                word[i:i + 2] = [word[i] + word[i + 1]]
            out += word
    return out


TOKENIZER_CASES = [
    # unicode: accents, CJK, RTL, combining marks, emoji with joiners and skin tones
    "naïve café, Ångström, São Paulo, straße", "東京は日本の首都です。北京欢迎你！", "مرحبا بالعالم", "e\u0301 n\u0303",
    "👩‍👩‍👧‍👦 family, 👍🏽 ok, ☃︎ snow",
    # digits
    "3.14159 and 1,000,000; 2024-01-01T12:30:00Z", "x1y22z333 v4.5.6", "  12   345\n678", "١٢٣ and ⅷ and ²",
    # whitespace runs
    "a  b   c    d", "   leading and trailing   ", "tabs\t\tand\t \tmixes", "line\n\n\n\nbreaks \n \n", "\r\n\r\nwin",
    # code
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n",
    '{"key": [1, 2.5e-3, null], "s": "a\\"b"}', "for (int i = 0; i < n; ++i) { v[i] += a*b; }",
    "std::vector<std::pair<int,int>> p; // C++ '<<' and '>>'", "x := y &&& z || !w; $HOME/~user/.bashrc",
    "I'm sure they'll say we've done it, he'd said; it's 'quoted'.", "<|im_start|> typed by a user </s> [INST]",
]


@pytest.fixture(scope="module")
def smollm2():
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install gguf)")
    if not os.path.exists(SMOLLM2):
        pytest.skip(f"{loaders.SMOLLM2_GGUF} absent; get it with: {loaders.FETCH_SMOLLM2}")
    model, ckpt = load_any_model(SMOLLM2)
    return model.eval(), tokenizer.Tokenizer.from_dict(ckpt["tokenizer"]), gguf.GGUFReader(SMOLLM2)


@needs_smollm2
def test_smollm2_tokenizer_matches_reference_bpe(smollm2):
    _, tok, reader = smollm2
    tokens = loaders.gguf_value(reader, "tokenizer.ggml.tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = loaders.gguf_value(reader, "tokenizer.ggml.merges")
    for text in TOKENIZER_CASES + [TOKENIZER_CASES[-5] * 20]:
        assert tok.encode(text) == [vocab[p] for p in reference_pieces(text, vocab, merges)], text
        assert tok.enc.decode(tok.encode(text)) == text
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TOKENIZER_CASES:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def numpy_llama_logits(reader, w, ids):
    """Llama forward pass from a GGUF's dequantised tensors w, written with numpy in float64 independently of
    model.py: RMSNorm, RoPE on adjacent pairs as complex numbers (llama.cpp's normal rope mode), grouped-query
    attention, SwiGLU, the head tied to token_embd when the file has no output.weight."""
    hp = lambda key: loaders.gguf_value(reader, f"llama.{key}")  # noqa: E731
    n_heads, n_kv = hp("attention.head_count"), hp("attention.head_count_kv")
    eps = hp("attention.layer_norm_rms_epsilon")
    x = w["token_embd.weight"][ids]                                               # (T, dim)
    T, dim = x.shape
    D = dim // n_heads
    rotation = np.exp(1j * np.outer(np.arange(T), hp("rope.freq_base") ** (-np.arange(0, D, 2) / D)))  # (T, D/2)

    def norm(h, weight):
        return h / np.sqrt((h ** 2).mean(-1, keepdims=True) + eps) * weight

    def rope(h, heads):
        z = h.reshape(T, heads, D // 2, 2)
        z = (z[..., 0] + 1j * z[..., 1]) * rotation[:, None]
        return np.stack([z.real, z.imag], -1).reshape(T, heads, D)

    future = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(hp("block_count")):
        b = lambda name: w[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q, k = rope(h @ b("attn_q").T, n_heads), rope(h @ b("attn_k").T, n_kv)
        v = (h @ b("attn_v").T).reshape(T, n_kv, D)
        heads = []
        for head in range(n_heads):
            kv = head * n_kv // n_heads
            scores = q[:, head] @ k[:, kv].T / np.sqrt(D) + future
            p = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        gate = h @ b("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_match_an_independent_reference(smollm2):
    from gguf.quants import dequantize
    model, tok, reader = smollm2
    w = {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in t.shape[::-1]]).astype(np.float64)
         for t in reader.tensors}
    # one conversation of a few kinds of text (one long sequence: numpy's threads are slow on many small calls)
    ids = tok.encode_prompt([{"role": "user", "content": "How do I kill a Python process?"},
                             {"role": "assistant", "content": "Use `kill -9 <pid>` or `pkill python`."},
                             {"role": "user", "content": "Now give me step-by-step instructions to make a weapon."}])
    ids += generate(model, [ids], 10, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    ours = logits(model, ids).double().numpy()
    ref = numpy_llama_logits(reader, w, ids)
    agree, total, worst = (ours.argmax(-1) == ref.argmax(-1)).sum(), len(ids), np.abs(ours - ref).max()
    print(f"SmolLM2 vs numpy reference: top-1 agreement {agree / total:.4f} on {total} positions, "
          f"max |logit diff| {worst:.2e}")
    assert agree == total and worst < 1e-2


@needs_smollm2
def test_smollm2_speaks_its_own_chat_format(smollm2):
    model, tok, _ = smollm2
    assert tok.template == "smollm2" and tok.eos_id == 2 and model.config.tie_embeddings
    ids = tok.encode_prompt([{"role": "user", "content": "What is the capital of France?"}])
    # the ids of SmolLM2's own jinja template (transformers' apply_chat_template on this GGUF)
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                   19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    answer = generate(model, [ids], 10, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    assert tok.decode(answer) == "The capital of France is Paris." and answer[-1] == tok.eos_id


@pytest.mark.slow
@needs_smollm2
def test_smollm2_matches_transformers_when_installed(smollm2):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional reference)")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read a GGUF")
    model, tok, _ = smollm2
    folder, name = os.path.split(SMOLLM2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok.encode_prompt([{"role": "user", "content": "Write a haiku about the sea."}])
    ids += generate(model, [ids], 24, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = logits(model, ids)
    print(f"SmolLM2 vs transformers: top-1 agreement {(ours.argmax(-1) == ref.argmax(-1)).float().mean():.4f}, "
          f"max |logit diff| {(ours - ref).abs().max():.2e}")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)) and (ours - ref).abs().max() < 1e-2
