import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import (KVCache, ModelConfig, Transformer, apply_rope, chunked_nll, flops_per_token,  # noqa: E402
                   generate, last_token_values, load_checkpoint, load_model, masked_nll, next_token_loss, num_params,
                   rope_tables, sample_next, save_checkpoint, token_logprobs)

V = 64


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def left_pad(seqs, pad_id=0):
    T = max(len(s) for s in seqs)
    tokens = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return tokens, mask


# ---------------------------------------------------------------------------------------------- architecture
def test_config_hidden_dim_follows_llama_rule():
    # Meta: int(2 * 4 * dim / 3) rounded up to multiple_of; dim 4096 -> 11008 with multiple_of 256 (Llama 2 7B)
    assert ModelConfig(vocab_size=10, dim=4096, n_heads=32, n_kv_heads=32, multiple_of=256).hidden_dim == 11008
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=10, dim=32, n_heads=4, n_kv_heads=3)


def test_parameter_names_follow_meta_layout():
    names = set(tiny().state_dict())
    for name in ("tok_embeddings.weight", "layers.1.attention.wq.weight", "layers.0.attention.wk.weight",
                 "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
                 "norm.weight", "output.weight"):
        assert name in names
    assert not any("rope" in n for n in names)


def test_rope_is_metas_complex_rotation_of_interleaved_pairs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)                                   # (B, T, H, D)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    cos, sin = rope_tables(8, 16, 10000.0)
    out = apply_rope(x, torch.complex(cos, sin)[positions, None])
    # Meta: view (x[2i], x[2i+1]) as a complex number and multiply by e^{i * pos * theta^(-2i/D)}
    angles = positions[..., None].float() * 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2)))
                                  * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    assert torch.allclose(out, expected, atol=1e-5)


@torch.no_grad()
def test_future_tokens_never_change_earlier_logits():
    model = tiny()
    tokens, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    for attention_mask in (None, mask):
        base = model(tokens, attention_mask)
        changed = tokens.clone()
        changed[:, 4] = 42  # position 4 is a real token in both rows
        out = model(changed, attention_mask)
        assert torch.allclose(base[:, :4], out[:, :4], atol=1e-5)
        assert not torch.allclose(base[:, 4:], out[:, 4:], atol=1e-3)


@torch.no_grad()
def test_left_padding_gives_the_unpadded_logits():
    model = tiny()
    prompt = [3, 14, 15, 9, 26]
    alone = model(torch.tensor([prompt]))[0]                    # no mask: the plain causal path
    tokens, mask = left_pad([prompt, [1] * 9])
    padded = model(tokens, mask)[0, -len(prompt):]
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.isfinite(model(tokens, mask)).all()           # pad query rows produce no NaN


@torch.no_grad()
def test_gqa_equals_multi_head_with_repeated_kv_weights():
    gqa = tiny(n_heads=4, n_kv_heads=2)
    mha = tiny(seed=1, n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):  # Meta's repeat_kv: kv head j serves query heads 2j and 2j+1 (D = 8)
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = state[key].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    assert torch.allclose(gqa(tokens, mask), mha(tokens, mask), atol=1e-5)


@torch.no_grad()
def test_autocast_keeps_logits_float32():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, model(torch.tensor([[1, 2, 3]])), atol=0.1)


def test_tied_embeddings_share_one_matrix():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert num_params(model) == num_params(tiny()) - V * 32


def test_flops_per_token_counts_the_matmul_weights():
    model = tiny()
    cfg = model.config
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    n_matmul = num_params(model) - cfg.vocab_size * cfg.dim - norms  # no FLOPs in the lookup or the norms
    assert flops_per_token(cfg, seq_len=10) == 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * 10


# ---------------------------------------------------------------------------------------------- generation
PROMPTS = [[5, 9, 2], [7, 1, 4, 8, 3, 6, 2], [11, 12, 13, 14, 15]]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9)])
def test_kv_cache_generation_equals_recomputation(sampling):
    model = tiny()
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        runs.append(generate(model, PROMPTS, 12, eos_id=V - 1, pad_id=0, generator=gen, use_cache=use_cache,
                             return_logprobs=True, **sampling))
    (cached, cached_lp), (plain, plain_lp) = runs
    assert cached == plain
    assert all(len(t) == 12 or t[-1] == V - 1 for t in cached)
    for a, b in zip(cached_lp, plain_lp):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    # and both match a fresh forward pass over prompt + response
    with torch.no_grad():
        tokens, mask = left_pad([p + t for p, t in zip(PROMPTS, cached)])
        full = token_logprobs(model, tokens, mask)
    for i, t in enumerate(cached):
        assert torch.allclose(full[i, -len(t):], torch.tensor(cached_lp[i]), atol=1e-5)


def test_eos_stops_one_sequence_while_others_continue():
    model = tiny(vocab_size=256)  # a wider vocabulary keeps the untrained model's greedy rows from collapsing
    free = generate(model, PROMPTS, 10, eos_id=-1, pad_id=0, temperature=0.0)
    # pick as EOS a token row 0 produces but no other row does: row 0 must stop there, the others run on
    eos = next(t for t in free[0][1:] if all(t not in row for row in free[1:]))
    cut = free[0].index(eos) + 1
    out = generate(model, PROMPTS, 10, eos_id=eos, pad_id=0, temperature=0.0)
    assert out[0] == free[0][:cut] and out[0][-1] == eos
    assert out[1:] == free[1:] and all(len(row) == 10 for row in out[1:])


def test_generator_seed_reproduces_samples():
    model = tiny()
    a = generate(model, PROMPTS, 8, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(7))
    b = generate(model, PROMPTS, 8, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(7))
    c = generate(model, PROMPTS, 8, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_repetition_penalty_equals_a_hand_loop():
    """Greedy decoding with the CTRL penalty against a loop that recomputes the whole sequence each step and
    applies the rule by hand to the row's own earlier answer tokens (not the prompt's)."""
    model, theta = tiny(vocab_size=256), 1.5
    out = generate(model, PROMPTS, 10, eos_id=-1, pad_id=0, temperature=0.0, repetition_penalty=theta)
    for prompt, row in zip(PROMPTS, out):
        answer = []
        for _ in range(10):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + answer]))[0, -1].tolist()
            for t in set(answer):
                logits[t] = logits[t] / theta if logits[t] > 0 else logits[t] * theta
            answer.append(max(range(len(logits)), key=logits.__getitem__))
        assert row == answer
    plain = generate(model, PROMPTS, 10, eos_id=-1, pad_id=0, temperature=0.0)
    assert plain != out and max(row.count(t) for row in out for t in row) < max(row.count(t) for row in plain
                                                                                for t in row)


def test_generate_refuses_to_run_past_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny(), [[1] * 60], 10, eos_id=-1, pad_id=0)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=gen).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, generator=gen).item() == 1 for _ in range(20))
    # probs 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two only
    assert {sample_next(logits, 1.0, top_p=0.8, generator=gen).item() for _ in range(200)} == {1, 3}


@torch.no_grad()
def test_last_only_reads_the_last_position_of_the_full_forward():
    model = tiny().eval()
    tokens = torch.randint(1, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0                                                   # a left-padded row
    last = model(tokens, mask, last_only=True)
    assert last.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], model(tokens, mask)[:, -1], atol=1e-5, rtol=0)


def test_sampling_frequencies_follow_the_softmax():
    # 40000 draws of 4 rows at once: each token's frequency within 5 standard errors of its probability
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0], [-5.0, 0.0, 5.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    probs = logits.softmax(-1)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits.repeat(500, 1), 1.0, generator=gen) for _ in range(20)]).view(-1, 4)
    freq = torch.stack([(draws == v).float().mean(0) for v in range(4)], 1)  # (4 rows, 4 tokens)
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / len(draws)).sqrt() + 1e-4).all()
    # temperature 2 halves the logits
    draws = sample_next(logits[:1].repeat(20000, 1), 2.0, generator=gen)
    assert abs((draws == 1).float().mean().item() - (logits[0] / 2).softmax(-1)[1].item()) < 0.02


def test_sampling_never_picks_a_filtered_token():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    kept = logits.topk(3, -1).indices
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        picked = sample_next(logits, 1.0, top_k=3, generator=gen)
        assert (kept == picked[:, None]).any(1).all()


def test_kv_cache_is_preallocated():
    cfg = tiny().config
    cache = KVCache(cfg, batch_size=3, max_len=20, device="cpu")
    assert len(cache.k) == cfg.n_layers and cache.k[0].shape == (3, cfg.n_kv_heads, 20, cfg.head_dim)


# ---------------------------------------------------------------------------------------------- losses and scores
def test_masked_nll_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    targets = torch.tensor([[0, 0, 1]])
    loss_mask = torch.tensor([[0, 1, 1]])
    # position 0 is masked; -log softmax([1, 0])[0] = log(1 + e^-1); -log softmax([0, 2])[1] = log(1 + e^-2)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    assert masked_nll(logits, targets, loss_mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_nll(logits, targets, torch.zeros_like(loss_mask)).item() == 0.0


def test_chunked_nll_and_its_gradient_by_hand():
    # weight = identity, so the logits are the rows of h: the example above, weights 0, 1/2, 1/2
    h = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    weight = torch.eye(2, requires_grad=True)
    loss = chunked_nll(h, weight, torch.tensor([0, 0, 1]), torch.tensor([0.0, 0.5, 0.5]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2, rel=1e-6)
    (3 * loss).backward()
    # dL/dz = w (softmax(z) - onehot(y)): row 1 [e/(e+1) - 1, 1/(e+1)] / 2, row 2 [1/(1+e^2), e^2/(1+e^2) - 1] / 2
    e, e2 = math.exp(1), math.exp(2)
    grad_z = torch.tensor([[0.0, 0.0], [-1 / (e + 1), 1 / (e + 1)], [1 / (1 + e2), -1 / (1 + e2)]]) / 2
    assert torch.allclose(h.grad, 3 * grad_z, atol=1e-6)                  # dL/dh = W^T dL/dz, W = I
    assert torch.allclose(weight.grad, 3 * grad_z.T @ h.detach(), atol=1e-6)  # dL/dW = sum_n dL/dz_n h_n^T


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_masked_nll_in_value_and_gradient(tie):
    model = tiny(tie_embeddings=tie).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, 61), generator=gen)                   # 180 positions: two blocks of rows
    mask = (torch.rand(3, 60, generator=gen) < 0.7).long()

    def loss_and_grads(chunked):
        model.zero_grad(set_to_none=True)
        if chunked:
            loss = model(tokens[:, :-1], targets=tokens[:, 1:], loss_weights=mask / mask.sum())
        else:
            loss = masked_nll(model(tokens[:, :-1]), tokens[:, 1:], mask)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (full, full_grads), (chunked, chunked_grads) = loss_and_grads(False), loss_and_grads(True)
    assert chunked == pytest.approx(full, rel=1e-6) and full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-7), name
    model.output.weight.requires_grad_(False)                              # a frozen head (tied: the embedding too)
    (_, frozen_full), (_, frozen_chunked) = loss_and_grads(False), loss_and_grads(True)
    assert "output.weight" not in frozen_chunked and frozen_chunked.keys() == frozen_full.keys()
    with torch.no_grad():
        value = model(tokens[:, :-1], targets=tokens[:, 1:], loss_weights=mask / mask.sum())
    assert value.item() == pytest.approx(full, rel=1e-6) and value.grad_fn is None
    model.zero_grad(set_to_none=True)
    zero = model(tokens[:, :-1], targets=tokens[:, 1:], loss_weights=torch.zeros(3, 60))   # no trained token
    zero.backward()
    assert zero.item() == 0.0 and all(not p.grad.any() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="targets need the lm head"):
        tiny(head="scalar")(tokens[:, :-1], targets=tokens[:, 1:], loss_weights=mask.float())


def test_next_token_loss_passes_no_mask_for_packed_rows():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16))
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    tokens = torch.randint(1, 32, (2, 9))
    packed = torch.ones_like(tokens)
    padded = torch.ones_like(tokens).index_fill(1, torch.tensor([8]), 0)
    loss_packed = next_token_loss(model, tokens, packed, torch.ones_like(tokens), n_tokens=16)
    next_token_loss(model, tokens, padded, torch.ones_like(tokens), n_tokens=16)
    assert seen[0] is None and seen[1].shape == (2, 8)  # packed: SDPA's causal path; padded: the mask
    # the causal path computes the same loss as the explicit all-ones mask
    with torch.no_grad():
        logits = model(tokens[:, :-1], attention_mask=torch.ones(2, 8, dtype=torch.long))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert loss_packed.item() == pytest.approx(expected.item(), abs=1e-5)


@torch.no_grad()
def test_scalar_head_reads_last_real_token_under_any_padding():
    model = tiny(head="scalar")
    seq = [4, 8, 15, 16, 23]
    alone = model(torch.tensor([seq]))[0, -1]
    left_tokens, left_mask = left_pad([seq, [1] * 8])
    right_tokens = torch.tensor([seq + [0, 0, 0], [1] * 8])
    right_mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    left = last_token_values(model(left_tokens, left_mask), left_mask)
    right = last_token_values(model(right_tokens, right_mask), right_mask)
    assert left.shape == (2,)
    assert torch.allclose(left[0], alone, atol=1e-5) and torch.allclose(right[0], alone, atol=1e-5)
    assert torch.allclose(left[1], right[1], atol=1e-5)


def test_last_token_values_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert last_token_values(values, mask).tolist() == [2.0, 6.0]


@torch.no_grad()
def test_token_logprobs_matches_log_softmax():
    model = tiny()
    tokens, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    lp = token_logprobs(model, tokens, mask)
    ref = model(tokens, mask).log_softmax(-1)
    assert lp.shape == (2, 3)
    assert torch.allclose(lp[0, 2], ref[0, 2, 4], atol=1e-6)
    assert lp[1, 0] == 0  # target is padding


# ---------------------------------------------------------------------------------------------- checkpoints
def ckpt_of(model, step=0):
    return dict(model_config=vars(model.config), model=model.state_dict(), step=step)


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = tiny(tie_embeddings=True)
    path = str(tmp_path / "sub" / "model.pt")
    save_checkpoint(path, ckpt_of(model, step=3))
    loaded, ckpt = load_model(path)
    assert ckpt["step"] == 3 and loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(tokens), model(tokens))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, ckpt_of(tiny(), step=1))

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, ckpt_of(tiny(), step=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["model.pt"]


def test_load_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(str(bad))


@torch.no_grad()
def test_load_model_swaps_lm_head_for_scalar_head(tmp_path):
    lm = tiny()
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, ckpt_of(lm))
    rm, _ = load_model(path, head="scalar")
    assert rm.config.head == "scalar" and not hasattr(rm, "output")
    assert torch.equal(rm.layers[1].attention.wq.weight, lm.layers[1].attention.wq.weight)
    assert rm(torch.tensor([[1, 2, 3]])).shape == (1, 3)


def test_load_model_names_the_mismatch():
    ckpt = ckpt_of(tiny())
    ckpt["model_config"] = {**ckpt["model_config"], "n_layers": 3}
    with pytest.raises(ValueError, match="layers.2"):
        load_model(ckpt)
    ckpt = ckpt_of(tiny())
    ckpt["model_config"] = {**ckpt["model_config"], "dim": 64, "hidden_dim": 0}
    with pytest.raises(ValueError, match="wrong shape"):
        load_model(ckpt)
