"""The Llama-architecture decoder that every stage trains, plus generation, log-probs and checkpoints.

Architecture (Llama 2, section 2.2, following Llama 1): pre-normalisation with RMSNorm, SwiGLU feed-forward,
rotary position embeddings (RoPE), grouped-query attention (GQA), no biases. Parameter names map 1:1 onto
Meta's llama layout (tok_embeddings, layers.{i}.attention.wq, ..., norm, output), so a real checkpoint's
state dict loads without renaming. A "scalar" head (Linear(dim, 1) named score) replaces the lm head for the
reward and value models, which Llama 2 initialises from the chat model (section 3.2.2).

Padding: every call takes attention_mask (B, T), 1 on real tokens. Positions are counted over real tokens only
(cumsum of the mask), so a left-padded prompt is computed exactly as the unpadded one; pad keys are never
attended to.
"""
import math
import os
import warnings
from collections import namedtuple
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2            # grouped-query attention; == n_heads is plain multi-head attention
    hidden_dim: int = 0            # SwiGLU width; 0 -> Llama rule: int(2 * 4 * dim / 3) rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False
    head: str = "lm"               # "lm": next-token logits; "scalar": one number per position (reward/value)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"need dim % n_heads == 0, n_heads % n_kv_heads == 0 and an even head_dim; got dim="
                             f"{self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}")
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', got {self.head!r}")
        if self.hidden_dim == 0:  # Meta's rule: 2/3 of 4*dim keeps SwiGLU's three matrices at the cost of two
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang and Sennrich, 2019)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight  # torch's RMSNorm op


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of the rotation angle pos * theta^(-2i/head_dim), each (max_seq_len, head_dim / 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, rotation):
    """Rotate x (B, T, H, D) by the angles of its positions; rotation = e^{i angle} = cos + i sin, complex
    (B, T, 1, D/2), broadcast over the heads.

    Meta's convention: the pairs rotated together are interleaved neighbours (x[2i], x[2i+1]), read as the
    complex number x[2i] + i x[2i+1] and multiplied by e^{i angle}: one complex multiply, as Meta's code writes it
    (the same products as writing the four real ones out, in a third of the time). HF-converted
    checkpoints permute wq/wk to use rotate-half instead, so their weights must be un-permuted before loading.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))              # (B, T, H, D/2) complex
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    Per layer k, v of shape (B, n_kv_heads, max_len, head_dim); key_mask (B, max_len) marks which filled slots
    are real tokens; next_pos (B,) is each row's next RoPE position (its count of real tokens so far); pos is the
    number of slots filled.
    """

    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos, self.max_len = 0, max_len

    def update(self, layer, k, v):
        """Write this call's k, v (B, n_kv_heads, T, D) at slot pos; return all filled slots of the layer."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.layer_id, self.n_heads, self.n_kv_heads = layer_id, config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, rotation, attn_mask, cache):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rotation)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rotation)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)                        # (B, H_kv, S, D), S = filled slots
            q = q.to(k.dtype)
        # GQA: each key/value head serves n_heads / n_kv_heads consecutive query heads (Meta's repeat_kv); SDPA
        # reads the shared heads in place instead of copying them (enable_gqa), which at every decoding step would
        # copy the whole cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        # back to the layer's dtype: a float32 cache beside bf16 weights (gathered so by --fsdp on CUDA) gives float32
        return self.wo(out.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rotation, attn_mask, cache):
        x = x + self.attention(self.attention_norm(x), rotation, attn_mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if config.head == "lm":
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        else:
            self.score = nn.Linear(config.dim, 1)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # not persistent: recomputed from the config, and absent from Meta's state dict too
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the 2 * n_layers residual branches each add to the stream, so shrink their
        # output projections to keep the stream's variance independent of depth
        for layer in self.layers:
            for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings and config.head == "lm":
            self.output.weight = self.tok_embeddings.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)  # GPT-2 / small Llama models
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens, attention_mask=None, cache=None, last_only=False, targets=None, loss_weights=None):
        """tokens (B, T) -> logits (B, T, V) float32 for head "lm", values (B, T) float32 for head "scalar";
        last_only: the head reads the last position only (T = 1 out), all generation needs of a prompt.

        targets (B, T) and loss_weights (B, T) instead return the scalar sum_t w_t * -log p(targets_t) through
        chunked_nll, which never holds the (B, T, V) logits (a speed option, --chunked-loss)."""
        B, T = tokens.shape
        if targets is not None and self.config.head != "lm":
            raise ValueError("targets need the lm head")
        start = 0 if cache is None else cache.pos
        if start + T > self.config.max_seq_len or (cache is not None and start + T > cache.max_len):
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len} "
                             f"(or the KV cache's length)")
        if attention_mask is None and cache is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            attn_mask = None  # plain causal: lets SDPA pick its fastest kernel
        else:
            real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            positions = real.long().cumsum(1) - 1                        # counts real tokens only: pads shift nothing
            key_mask = real
            if cache is not None:
                positions = positions + cache.next_pos[:, None]
                cache.key_mask[:, start:start + T] = real
                key_mask = cache.key_mask[:, :start + T]                 # (B, S)
            positions = positions.clamp(min=0)                           # left pads would be -1
            q_slot = torch.arange(start, start + T, device=tokens.device)[:, None]
            k_slot = torch.arange(start + T, device=tokens.device)[None, :]
            attn_mask = (k_slot <= q_slot) & key_mask[:, None, :]         # (B, T, S): causal and not a pad key
            # every query also sees itself, so a pad query with no real key to its left gets a finite softmax
            # (its output is never used) instead of NaN
            attn_mask = (attn_mask | (k_slot == q_slot))[:, None]         # (B, 1, T, S), broadcast over heads
        # e^{i pos theta_j} of every position, (B, T, 1, D/2) complex
        rotation = torch.complex(self.rope_cos[positions, None].float(), self.rope_sin[positions, None].float())
        h = self.tok_embeddings(tokens)                                  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rotation, attn_mask, cache)
        if cache is not None:
            cache.pos += T
            cache.next_pos += real.long().sum(1)
        h = self.norm(h[:, -1:] if last_only else h)
        # the head runs in float32 even under bf16 autocast: log-probs and rewards need the precision
        with torch.autocast(device_type=h.device.type, enabled=False):
            if targets is not None:
                return chunked_nll(h.flatten(0, 1), self.output.weight, targets.flatten(), loss_weights.flatten())
            if self.config.head == "lm":
                return F.linear(h.float(), self.output.weight.float())   # (B, T, V)
            return F.linear(h.float(), self.score.weight.float(), self.score.bias.float()).squeeze(-1)  # (B, T)


def num_params(model):
    """Number of parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config, seq_len=None):
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * n_layers * dim * seq_len.

    N counts the weights used in matrix multiplies (everything but the embedding lookup and the norms); the
    second term is the attention scores and their weighted sum, counted without the causal halving.
    """
    kv_dim = config.n_kv_heads * config.head_dim
    per_layer = 2 * config.dim * config.dim + 2 * config.dim * kv_dim + 3 * config.dim * config.hidden_dim
    head = config.dim * config.vocab_size if config.head == "lm" else config.dim
    n_matmul = config.n_layers * per_layer + head
    return 6 * n_matmul + 12 * config.n_layers * config.dim * (seq_len or config.max_seq_len)


# ---------------------------------------------------------------------------------------------- generation
def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token ids (B,) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p       # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    # inverse-CDF sampling: the first token whose cumulative probability reaches u * total, u uniform in (0, 1]:
    # one random number per row, where torch.multinomial draws one per vocabulary entry (a quarter of a batch-16
    # decoding step on CPU). A token of probability 0 adds nothing to the sum, so it is never the first to reach it.
    # generator may be a list of one generator per row: then a row's draws do not depend on the rows beside it
    # (a batch split over ranks samples what one process samples)
    cdf = logits.softmax(-1).cumsum(-1)                                                         # (B, V)
    if isinstance(generator, (list, tuple)):
        u = 1 - torch.cat([torch.rand(1, 1, generator=g, device=cdf.device, dtype=cdf.dtype) for g in generator])
    else:
        u = 1 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)  # (B, 1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=0, top_p=1.0,
             generator=None, use_cache=True, return_logprobs=False, repetition_penalty=1.0):
    """Sample continuations of a batch of token-id prompts; returns each row's new tokens (EOS included).

    The prompts are left-padded into one batch, prefilled once, then extended one token per step through the
    KV cache; use_cache=False recomputes the whole sequence each step (same numbers, slower). A row stops at
    its EOS while the others continue. generator must live on the model's device; a list of one per prompt gives
    each row its own random stream (sample_next). With return_logprobs,
    also returns each new token's log-probability under the model (temperature 1, no top-k/top-p).
    repetition_penalty > 1 (CTRL, Keskar et al. 2019) makes a token the row has already generated less likely
    before the choice: its logit divided by the penalty where positive, multiplied where negative.
    """
    device = next(model.parameters()).device
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds max_seq_len "
                         f"{model.config.max_seq_len}")
    B = len(prompts)
    tokens = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    cache = KVCache(model.config, B, longest + max_new_tokens, device, next(model.parameters()).dtype) \
        if use_cache else None
    logits = model(tokens, mask, cache, last_only=True)[:, -1]            # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens, new_logprobs = [], []
    seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device) if repetition_penalty != 1.0 else None
    for _ in range(max_new_tokens):
        choose_from = logits.float()
        if seen is not None:
            penalised = torch.where(choose_from > 0, choose_from / repetition_penalty, choose_from * repetition_penalty)
            choose_from = torch.where(seen, penalised, choose_from)
        next_tok = sample_next(choose_from, temperature, top_k, top_p, generator)
        next_tok = next_tok.masked_fill(done, pad_id)                     # finished rows are fed padding
        new_tokens.append(next_tok)
        if return_logprobs:  # only when asked: a log-softmax over the vocabulary at every step is not free
            new_logprobs.append(logits.float().log_softmax(-1).gather(1, next_tok[:, None]).squeeze(1))
        step_mask = (~done).long()[:, None]
        done = done | (next_tok == eos_id)
        if seen is not None:
            seen[torch.arange(B, device=device), next_tok] = True
        if done.all() or len(new_tokens) == max_new_tokens:
            break
        if use_cache:
            logits = model(next_tok[:, None], step_mask, cache)[:, -1]
        else:
            tokens, mask = torch.cat([tokens, next_tok[:, None]], 1), torch.cat([mask, step_mask], 1)
            logits = model(tokens, mask, last_only=True)[:, -1]
    out_tokens, out_logprobs = [], []
    cols = torch.stack(new_tokens, 1).tolist() if new_tokens else [[] for _ in range(B)]
    lps = torch.stack(new_logprobs, 1).tolist() if new_logprobs else [[] for _ in range(B)]
    for row, lp in zip(cols, lps):
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        out_tokens.append(row[:n])
        out_logprobs.append(lp[:n])
    return (out_tokens, out_logprobs) if return_logprobs else out_tokens


Answer = namedtuple("Answer", "text prompt tokens finished")


@torch.no_grad()
def respond(model, tok, conversations, max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=64,
            generator=None, prefixes=None, min_room=1, desc=None, repetition_penalty=1.0):
    """The one batched generation routine every caller uses: answer each chat conversation (a message list ending
    with a user turn), greedily by default, in batches of similar length through the KV cache.

    Returns one Answer(text, prompt ids, generated ids, finished) per conversation, in the order given; finished
    means the answer ended with the end-of-turn token. generator: one, or a list of one per conversation. A prefix,
    when given, is written as the start of the answer and the model continues it (text includes it, the prompt ids
    end with it). A prompt leaving fewer than min_room tokens of context to answer in is not answered (text None),
    with one counted warning.
    """
    prefixes = prefixes or [""] * len(conversations)
    prompts = [tok.encode_prompt(c) + (tok.encode(" " + p) if p else []) for c, p in zip(conversations, prefixes)]
    fits = [i for i, p in enumerate(prompts) if len(p) + min_room <= model.config.max_seq_len]
    if len(fits) < len(prompts):
        warnings.warn(f"respond: {len(prompts) - len(fits)} of {len(prompts)} prompts leave fewer than {min_room} "
                      f"tokens to answer in (max_seq_len {model.config.max_seq_len}); they are not answered")
    order = sorted(fits, key=lambda i: len(prompts[i]))  # similar lengths pad less
    answers = [Answer(None, p, [], False) for p in prompts]
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[start:start + batch_size]
        room = model.config.max_seq_len - max(len(prompts[i]) for i in idx)
        rows_generator = [generator[i] for i in idx] if isinstance(generator, (list, tuple)) else generator
        outs = generate(model, [prompts[i] for i in idx], min(max_new_tokens, room), tok.eos_id, tok.pad_id,
                        temperature=temperature, top_p=top_p, generator=rows_generator,
                        repetition_penalty=repetition_penalty)
        for i, out in zip(idx, outs):
            text = tok.decode(out)
            answers[i] = Answer(prefixes[i] + text if prefixes[i] else text, prompts[i], out,
                                bool(out) and out[-1] == tok.eos_id)
    model.train(was_training)
    return answers


# ---------------------------------------------------------------------------------------------- losses and scores
def target_logprobs(logits, targets):
    """log softmax(logits)[target] at every position: logits (..., V), targets (...) -> (...)."""
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model, tokens, attention_mask):
    """(B, T-1): log p(tokens[:, t+1] | tokens[:, :t+1]); 0 where the target token is padding."""
    logits = model(tokens, attention_mask)[:, :-1]                       # (B, T-1, V) float32
    return target_logprobs(logits, tokens[:, 1:]) * attention_mask[:, 1:]


def masked_nll(logits, targets, loss_mask):
    """Mean next-token cross-entropy over trained positions (Llama 2, section 3.1: loss on answer tokens only).

    L = -(1 / sum_t m_t) * sum_t m_t log softmax(z_t)[y_t]
    logits z (B, T, V), targets y (B, T) already shifted to line up with the logits, loss_mask m (B, T).
    An all-zero mask gives 0 (a micro-batch without answer tokens contributes nothing).
    """
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*T,)
    mask = loss_mask.flatten().to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


class ChunkedNLL(torch.autograd.Function):
    """sum_n w_n * -log softmax(W h_n)[y_n] and its gradient, computed block by block of rows so that the (N, V)
    logits never exist whole. The value is masked_nll's numerator; the gradient is written out (the derivative of
    cross-entropy by its logits is the softmax minus the one-hot target):

        dL/dz_n = w_n (softmax(z_n) - onehot(y_n)),   dL/dh_n = W^T dL/dz_n,   dL/dW = sum_n dL/dz_n h_n^T

    Both gradients are made in the forward, while a block's logits are at hand, and the backward scales them by
    the incoming gradient (the loss is linear in it). Against logits -> F.cross_entropy this skips the zero-filled
    (N, V) gradient, a log-softmax backward pass and the allocation of four (N, V) tensors; on the CPU small
    blocks also stay in cache. Not in Llama 2: a speed option (--chunked-loss); tests check it against masked_nll.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, weights, with_grad):
        rows = 128 if h.device.type == "cpu" else 4096   # CPU: blocks that fit the cache; GPU: fewer, larger ones
        need_h, need_weight = (with_grad and need for need in ctx.needs_input_grad[:2])
        loss = h.new_zeros(())
        grad_h = torch.empty_like(h) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, h.shape[0], rows):
            h_n, y_n, w_n = h[start:start + rows], targets[start:start + rows, None], weights[start:start + rows]
            logp = (h_n @ weight.T).log_softmax(-1)                                  # (rows, V)
            loss -= (logp.gather(1, y_n).squeeze(1) * w_n).sum()
            if need_h or need_weight:
                grad_z = logp.exp_()                                                 # softmax, in place
                grad_z.scatter_add_(1, y_n, torch.full_like(y_n, -1, dtype=grad_z.dtype))  # - onehot(y)
                grad_z.mul_(w_n[:, None])
                if need_h:
                    torch.mm(grad_z, weight, out=grad_h[start:start + rows])
                if need_weight:
                    grad_weight.addmm_(grad_z.T, h_n)
        ctx.save_for_backward(grad_h, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss for g in (grad_h, grad_weight)]
        return *scaled, None, None, None


def chunked_nll(h, weight, targets, weights):
    """sum_n w_n * -log softmax(weight @ h_n)[targets_n] for h (N, D), weight (V, D), targets and weights (N,),
    without the (N, V) logits (ChunkedNLL). Rows of weight 0 (prompt tokens in SFT) are dropped first."""
    keep = weights != 0
    h, targets, weights = h[keep].float(), targets[keep], weights[keep].float()
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return ChunkedNLL.apply(h, weight.float(), targets, weights, with_grad)


def next_token_loss(model, tokens, attention_mask, loss_mask, n_tokens, world_size=1, chunked=False):
    """The loss of every next-token stage (pre-training, SFT, rejection sampling, distillation; Llama 2 sections 2.2
    and 3.1) on one micro-batch of a larger batch:

        L = -(1 / N) sum_{b,t} m_{b,t} log p(x_{b,t} | x_{b,<t})

    tokens, attention_mask, loss_mask (B, T) as data.collate makes them (loss_mask m: 1 on trained tokens, all ones
    for pre-training, the answer tokens for SFT). N = n_tokens counts the trained tokens of the whole batch (every
    micro-batch, every process), so the gradient is the same whatever the split into micro-batches; DDP averages
    over processes, hence * world_size. chunked: the same sum through chunked_nll, which never holds the (B, T, V)
    logits whole (--chunked-loss).
    """
    targets_mask = loss_mask[:, 1:] * attention_mask[:, 1:]
    # packed rows (pre-training) hold no padding: without a mask SDPA may take its causal (flash) kernel
    inputs = dict(attention_mask=None if bool(attention_mask.all()) else attention_mask[:, :-1])
    if chunked:
        return model(tokens[:, :-1], targets=tokens[:, 1:], loss_weights=targets_mask * (world_size / n_tokens),
                     **inputs)
    logits = model(tokens[:, :-1], **inputs)
    n_here = targets_mask.sum()
    return masked_nll(logits.float(), tokens[:, 1:], targets_mask) * n_here / n_tokens * world_size


def last_token_values(values, attention_mask):
    """(B, T), (B, T) -> (B,): each row's value at its last real token, for left or right padding alike."""
    T = values.shape[1]
    last = (torch.arange(T, device=values.device) * attention_mask).argmax(-1)  # highest index with mask 1
    return values.gather(1, last[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, state):
    """torch.save to path + ".tmp", then rename: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """The dict saved by save_checkpoint. Checkpoints are pickles: load only files you trust."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} holds no model_config and model: not a checkpoint of this project")
    return ckpt


def load_model(path_or_ckpt, device="cpu", head=None):
    """(Transformer, checkpoint dict) from this project's checkpoint file or its dict. head="scalar" on an lm
    checkpoint swaps the lm head for a fresh scalar head: the reward and value models start from the SFT model
    (Llama 2, section 3.2.2). Real models (HF or Meta folders, GGUF files) come through loaders.load_any_model."""
    is_path = isinstance(path_or_ckpt, (str, os.PathLike))
    ckpt = load_checkpoint(path_or_ckpt) if is_path else path_or_ckpt
    where = path_or_ckpt if is_path else "checkpoint"
    known = {f.name for f in fields(ModelConfig)}
    if set(ckpt["model_config"]) - known:
        raise ValueError(f"{where}: unknown model_config fields {sorted(set(ckpt['model_config']) - known)}")
    config = ModelConfig(**ckpt["model_config"])
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    fresh = set()
    if head is not None and head != config.head:
        config = ModelConfig(**{**asdict(config), "head": head})
        state = {k: v for k, v in state.items() if not k.startswith(("output.", "score."))}
        fresh = {"score.weight", "score.bias"} if head == "scalar" else {"output.weight"}
    model = Transformer(config)
    expected = model.state_dict()
    if config.tie_embeddings and config.head == "lm":
        fresh.add("output.weight")  # tied: it is tok_embeddings.weight, whether or not the file repeats it
    missing = sorted(set(expected) - set(state) - fresh)
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: weights do not match model_config {asdict(config)}:\n"
                         f"  missing {missing[:8]}\n  unexpected {unexpected[:8]}\n  wrong shape {wrong[:8]}")
    model.load_state_dict(state, strict=False)
    return model.to(device), ckpt
