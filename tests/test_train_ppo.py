"""train_ppo.py: GAE, the clipped losses and the Llama 2 reward against hand computations; micro runs that raise
the reward, start with zero KL to the reference and resume exactly."""
import json
import math
import os
import signal

import pytest
import torch

import tokenizer
import train_ppo
import runtime
import world
from model import ModelConfig, Transformer, generate, load_checkpoint, save_checkpoint
from reward import ENSEMBLES, REWARDS, ensemble_mean, ensemble_min, helpfulness_only, llama2_gate, safety_only
from train_ppo import (adaptive_beta, explained_variance, gae, kl_penalized_rewards, lagrangian_reward, lambda_update,
                       policy_loss, response_logprobs, response_logprobs_and_entropy, response_values, rollout_batch,
                       value_loss, whiten)


# ---------------------------------------------------------------------------------------------- the reward
def test_llama2_gate_by_hand():
    safety = torch.tensor([0.9, 0.10, 0.50, 0.14])
    helpful = torch.tensor([0.2, 0.80, 0.70, 0.60])
    safety_prompt = torch.tensor([True, False, False, False])
    # safety prompt -> R_s; R_s below 0.15 on any prompt -> R_s; otherwise R_h
    assert torch.allclose(llama2_gate(safety, helpful, safety_prompt), torch.tensor([0.9, 0.10, 0.70, 0.14]))
    assert torch.allclose(llama2_gate(safety, helpful, safety_prompt, threshold=0.12),
                          torch.tensor([0.9, 0.10, 0.70, 0.60]))
    assert torch.equal(safety_only(safety, helpful, safety_prompt), safety)
    assert torch.equal(helpfulness_only(safety, helpful, safety_prompt), helpful)
    # --reward picks one of reward.py's combinations
    assert REWARDS == {"llama2": llama2_gate, "safety": safety_only, "helpfulness": helpfulness_only}


def test_ensembles_by_hand():
    scores = torch.tensor([[1.0, -2.0, 0.5],     # k = 3 reward models (rows) scoring N = 3 responses
                           [3.0, 0.0, 0.5],
                           [-1.0, 1.0, 2.0]])
    # mean: (1 + 3 - 1) / 3 = 1, (-2 + 0 + 1) / 3 = -1/3, (0.5 + 0.5 + 2) / 3 = 1; min: the lowest of each column
    assert torch.allclose(ensemble_mean(scores), torch.tensor([1.0, -1 / 3, 1.0]))
    assert torch.equal(ensemble_min(scores), torch.tensor([-1.0, -2.0, 0.5]))
    # one member that overrates a response moves the mean but not the minimum
    inflated = scores.clone()
    inflated[0, 2] = 10.0
    assert ensemble_mean(inflated)[2] > 3 and ensemble_min(inflated)[2] == 0.5
    assert ENSEMBLES == {"mean": ensemble_mean, "min": ensemble_min}


def test_lagrangian_reward_and_lambda_update_by_hand():
    helpful, cost = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -3.0])
    # lambda 0: the helpfulness score itself; lambda 1: (2 - 1) / 2 = 0.5, (1 + 3) / 2 = 2
    assert torch.equal(lagrangian_reward(helpful, cost, 0.0), helpful)
    assert torch.allclose(lagrangian_reward(helpful, cost, 1.0), torch.tensor([0.5, 2.0]))
    # lambda 3: (2 - 3) / 4 = -0.25, (1 + 9) / 4 = 2.5: a large lambda ranks by cost alone
    assert torch.allclose(lagrangian_reward(helpful, cost, 3.0), torch.tensor([-0.25, 2.5]))
    # ln lambda = ln 2, E[C] = 0.5, d = -1, lr 0.1: ln 2 + 0.1 * 2 * 1.5 = ln 2 + 0.3
    assert math.isclose(lambda_update(math.log(2), 0.5, -1.0, 0.1), math.log(2) + 0.3)
    # below the threshold lambda shrinks, at it lambda stays
    assert lambda_update(0.0, -2.0, -1.0, 0.1) == -0.1 and lambda_update(0.0, -1.0, -1.0, 0.1) == 0.0
    # the cap: ln 10 + 0.1 * 10 * 5 = ln 10 + 5 is cut to ln 20
    assert math.isclose(lambda_update(math.log(10), 4.0, -1.0, 0.1, max_lambda=20.0), math.log(20))


def test_whiten_over_the_mask():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # entries 1, 3, 5, 7: mean 4, variance (9 + 1 + 1 + 9) / 4 = 5
    expected = torch.tensor([[-3.0, -1.0, 0.0], [1.0, 3.0, 0.0]]) / math.sqrt(5)
    assert torch.allclose(whiten(x, mask), expected, atol=1e-6)
    assert torch.allclose(whiten(x, mask, shift_mean=False), (expected + 4) * mask, atol=1e-6)
    w = whiten(torch.tensor([2.0, 4.0, 9.0]))
    assert abs(w.mean().item()) < 1e-6 and abs(w.pow(2).mean().item() - 1) < 1e-5


def test_kl_penalty_per_token_and_score_at_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.1, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalized_rewards(score, logp, ref_logp, mask, beta=0.1)
    # kl = logp - ref_logp on response tokens: [0.5, -1, 0], [0, -0.2, (pad)]
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, -0.2, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0], [0.0, 0.02 - 1.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_kl_penalty_is_zero_when_policy_equals_reference():
    logp = -torch.rand(3, 5)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0]])
    score = torch.tensor([0.3, -1.2, 2.0])
    rewards, kl = kl_penalized_rewards(score, logp, logp.clone(), mask, beta=0.5)
    assert torch.count_nonzero(kl) == 0
    only_score = torch.zeros(3, 5)
    only_score[0, 4], only_score[1, 1], only_score[2, 3] = 0.3, -1.2, 2.0
    assert torch.equal(rewards, only_score)


# ---------------------------------------------------------------------------------------------- GAE and losses
def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, -1.0], [2.0, 1.0, 9.0]])    # the 9 sits on padding: never read
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_2 = 2 + 0 - (-1) = 3; delta_1 = 0 + 0.9 * -1 - 1 = -1.9; delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4
    #        A_2 = 3; A_1 = -1.9 + 0.72 * 3 = 0.26; A_0 = 1.4 + 0.72 * 0.26 = 1.5872
    # row 1: delta_1 = 1 + 0 - 1 = 0; delta_0 = 0.5 + 0.9 * 1 - 2 = -0.6; A_1 = 0; A_0 = -0.6
    expected = torch.tensor([[1.5872, 0.26, 3.0], [-0.6, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-5)


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return():
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    adv, returns = gae(rewards * mask, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    assert torch.allclose(returns, reward_to_go, atol=1e-5)


def test_policy_loss_by_hand_and_the_clip_stops_the_gradient():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 1.1]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.5, -0.7]])
    logp = (old_logp + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])                    # the last token is padding
    loss, stats = policy_loss(logp, old_logp, adv, mask, clip=0.2)
    # max(-A rho, -A clip(rho)): [max(-1.5, -1.2), max(-0.5, -0.8), max(1.5, 1.2)] = [-1.2, -0.5, 1.5]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    # k3: (rho - 1) - log rho, averaged over the three response tokens
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.5)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    loss.backward()
    # the clip binds on token 0 (rho above 1 + eps with A > 0): no gradient there; d/dlogp of -A rho elsewhere
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 3, 1.5 / 3, 0.0]]), atol=1e-6)


def test_value_loss_by_hand():
    old_values = torch.tensor([[0.0, 1.0, 2.0]])
    values = torch.tensor([[0.5, 1.1, 0.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.5]])
    mask = torch.ones(1, 3)
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    # token 0: V 0.5 -> clipped 0.2: max(0.25, 0.64) = 0.64; token 1: V 1.1 (inside the clip): 1.21;
    # token 2: V 0 -> clipped 1.8: max(2.25, 0.09) = 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 2.25) / 3, abs=1e-6)
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # token 0 takes the clipped branch, so no gradient; elsewhere d/dV 1/2 (V - R)^2 / 3
    assert torch.allclose(values.grad, torch.tensor([[0.0, 1.1 / 3, -1.5 / 3]]), atol=1e-6)


def test_explained_variance_and_adaptive_beta():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    # e = clip((KL - target) / target, -0.2, 0.2); beta (1 + 0.1 e)
    assert adaptive_beta(0.1, kl=6.0, target=5.0) == pytest.approx(0.1 * (1 + 0.1 * 0.2))
    assert adaptive_beta(0.1, kl=4.5, target=5.0) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert adaptive_beta(0.1, kl=0.0, target=5.0) == pytest.approx(0.1 * (1 - 0.1 * 0.2))


@torch.no_grad()
def test_rollout_layout_matches_the_sampled_log_probs():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses, sampled_logp = generate(model, prompts, 6, eos_id=1, pad_id=0,
                                       generator=torch.Generator().manual_seed(3), return_logprobs=True)
    tokens, attention_mask, response_mask, P = rollout_batch(prompts, responses, pad_id=0)
    assert P == 5 and response_mask.sum(1).tolist() == [len(r) for r in responses]
    logp = response_logprobs(model, tokens, attention_mask, P)
    for i, lp in enumerate(sampled_logp):
        torch.testing.assert_close(logp[i, :len(lp)], torch.tensor(lp), atol=1e-4, rtol=0)
        assert torch.all(logp[i, len(lp):] == 0)
    # the value of the state before response token j is read where token j is predicted: position P - 1 + j
    values = response_values(lambda t, m: t.float(), tokens, attention_mask, P)
    assert values[0, 0].item() == prompts[0][-1] and values[1, 1].item() == responses[1][0]


@torch.no_grad()
def test_one_pass_gives_the_same_log_probs_and_the_entropy():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)).eval()
    tokens, attention_mask, _, P = rollout_batch([[5, 6, 7], [8]], [[9, 10, 1], [11]], pad_id=0)
    logp, entropy = response_logprobs_and_entropy(model, tokens, attention_mask, P)
    assert torch.equal(logp, response_logprobs(model, tokens, attention_mask, P))
    probs = model(tokens, attention_mask)[0, P - 1].softmax(-1)      # before the first response token of row 0
    assert entropy[0, 0].item() == pytest.approx(-(probs * probs.log()).sum().item(), abs=1e-5)
    assert entropy[1, 1:].tolist() == [0.0, 0.0]                     # padding of the one-token response


# ---------------------------------------------------------------------------------------------- micro runs
# A byte-level tokenizer, a random micro policy and a hand-built reward model whose score rises with the share
# of ASCII bytes in the conversation: a random policy starts near one half, so PPO has a clear signal to follow.
def byte_tokenizer():
    return tokenizer.Tokenizer({bytes([b]): b for b in range(256)}, name="bytes")


def ascii_reward_model(tok):
    """Scalar-head transformer: one attention layer averages the normed embeddings (queries and keys are zero),
    ASCII bytes embed as e0, everything else as e1, and the score reads (h0 - h1) / rms(h) at </s>."""
    config = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=256,
                         head="scalar")
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_embeddings.weight[:128, 0] = 1.0
        model.tok_embeddings.weight[128:, 1] = 1.0
        for norm in (model.layers[0].attention_norm, model.layers[0].ffn_norm, model.norm):
            norm.weight.fill_(1.0)
        model.layers[0].attention.wv.weight.copy_(torch.eye(16))
        model.layers[0].attention.wo.weight.copy_(torch.eye(16))
        model.score.weight[0, 0], model.score.weight[0, 1] = 1.0, -1.0
    return model


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_models(tmp_path_factory.mktemp("ppo_micro"))


def micro_models(folder):
    """Checkpoints in folder of a micro policy (64-token and 256-token contexts) and the ASCII reward model, and a
    file of eight prompts."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                     max_seq_len=64))
    rm = ascii_reward_model(tok)
    # a policy whose context holds the world's validation prompts (up to 215 bytes), for the gold evaluation
    long_policy = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                          max_seq_len=256))
    paths = {name: str(folder / name / "model.pt") for name in ("sft", "rm", "sft_long")}
    for name, model in (("sft", policy), ("rm", rm), ("sft_long", long_policy)):
        save_checkpoint(paths[name], dict(model=model.state_dict(), model_config=vars(model.config),
                                          tokenizer=tok.to_dict(), step=0))
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(dict(prompt=p, safety=i % 3 == 0)) + "\n"
                               for i, p in enumerate(["hi", "ok", "go on", "tell me", "yes", "more", "now", "why"])))
    return dict(paths, prompts=str(prompts), folder=folder)


def ppo_args(micro, out, iterations, *extra):
    return train_ppo.get_args(["--init", micro["sft"], "--rm-safety", micro["rm"], "--rm-helpful", micro["rm"],
                               "--prompts", micro["prompts"], "--out", out, "--iterations", str(iterations),
                               "--batch-size", "32", "--minibatch-size", "8", "--ppo-epochs", "2",
                               "--max-new-tokens", "8", "--lr", "3e-3", "--value-lr", "3e-3", "--beta", "0.01",
                               "--missing-eos-score", "none", "--eval-prompts", "0", "--save-every", "2",
                               "--sample-every", "100", "--device", "cpu", *extra])


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_micro_run_raises_the_reward_from_zero_kl(micro):
    out = str(micro["folder"] / "run")
    result = train_ppo.main(ppo_args(micro, out, 12))
    log = read_metrics(out)
    assert len(log) == 12 and result["step"] == 12
    # the first rollout comes from the untouched policy: it is the reference, so the KL is exactly zero
    assert log[0]["kl"] == 0.0
    first = sum(r["r_s"] for r in log[:2]) / 2
    last = sum(r["r_s"] for r in log[-2:]) / 2
    assert last > first + 0.5, (first, last)
    assert log[-1]["kl"] > 0
    for key in ("reward", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance",
                "response_length", "beta"):
        assert math.isfinite(log[-1][key]), key
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["stage"] == "ppo" and ckpt["step"] == 12 and "value_model" in ckpt


def test_the_stage_check_reads_the_kl_range_and_the_score_rise():
    args = train_ppo.get_args(["--init", "x", "--rm-safety", "x", "--rm-helpful", "x", "--out", "o",
                               "--kl-range", "0.5", "5", "--min-score-rise", "0.05"])
    scores = [0.2, 0.25, 0.3, 0.3, 0.35, 0.4, 0.4, 0.45]                  # quarters: 0.225 -> 0.425
    train_ppo.check_moved(args, 1.0, scores)
    with pytest.raises(runtime.UserError, match="outside --kl-range 0.5 5"):
        train_ppo.check_moved(args, 0.003, scores)
    with pytest.raises(runtime.UserError, match=r"ppo did not move: mean R_c rose \+0.0100"):
        train_ppo.check_moved(args, 1.0, [0.3, 0.3, 0.31, 0.31])
    # a rise of 0.1 inside its noise: quarters [0.3, 0.5] -> [0.5, 0.5], variances 0.02 and 0, noise 1.96 * 0.1
    with pytest.raises(runtime.UserError, match=r"rose \+0.1000 .* more than its noise 0.1960"):
        train_ppo.check_moved(args, 1.0, [0.3, 0.5, 0.4, 0.4, 0.4, 0.4, 0.5, 0.5])
    train_ppo.check_moved(train_ppo.get_args(["--init", "x", "--rm-safety", "x", "--rm-helpful", "x", "--out", "o"]),
                          0.0, [0.3, 0.2])                               # no check asked


def test_keep_every_keeps_the_policy_along_training(micro, tmp_path):
    out = str(tmp_path / "kept")
    train_ppo.main(ppo_args(micro, out, 4, "--keep-every", "2"))
    assert sorted(f for f in os.listdir(out) if f.startswith("policy_")) == ["policy_0002.pt", "policy_0004.pt"]
    final, kept = load_checkpoint(os.path.join(out, "model.pt")), load_checkpoint(os.path.join(out, "policy_0004.pt"))
    assert kept["step"] == 4 and kept["stage"] == "ppo" and "optimizer" not in kept
    for name, tensor in final["model"].items():
        torch.testing.assert_close(kept["model"][name], tensor, rtol=0, atol=0)
    early = load_checkpoint(os.path.join(out, "policy_0002.pt"))
    assert any(not torch.equal(early["model"][n], t) for n, t in final["model"].items())


def test_resume_ends_with_the_same_weights(micro):
    straight, broken = str(micro["folder"] / "straight"), str(micro["folder"] / "broken")
    train_ppo.main(ppo_args(micro, straight, 4, "--kl-target", "0.5"))
    train_ppo.main(ppo_args(micro, broken, 2, "--kl-target", "0.5"))        # killed after the iteration-2 save
    train_ppo.main(ppo_args(micro, broken, 4, "--kl-target", "0.5", "--resume"))
    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, broken))
    assert a["step"] == b["step"] == 4 and a["beta"] == b["beta"] != 0.01
    for key in ("model", "value_model"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    assert [r["step"] for r in read_metrics(broken)] == [1, 2, 3, 4]
    assert read_metrics(broken)[-1] == read_metrics(straight)[-1]


def test_lagrangian_logs_lambda_follows_the_dual_step_and_resumes(micro, tmp_path):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    flags = ("--reward", "lagrangian", "--cost-threshold", "-0.2", "--lambda-init", "0.5", "--lambda-lr", "0.5")
    train_ppo.main(ppo_args(micro, straight, 4, *flags))
    rows = read_metrics(straight)
    assert rows[0]["lambda"] == 0.5
    for before, after in zip(rows, rows[1:]):   # each iteration's lambda is the dual step from the one before
        assert math.isclose(after["lambda"], math.exp(lambda_update(math.log(before["lambda"]), before["cost"],
                                                                     -0.2, 0.5)), rel_tol=1e-9)
        assert math.isclose(before["cost"], -before["r_s"], rel_tol=1e-6)  # cost = -r_s
    assert len({r["lambda"] for r in rows}) == 4
    train_ppo.main(ppo_args(micro, broken, 2, *flags))
    train_ppo.main(ppo_args(micro, broken, 4, *flags, "--resume"))
    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, broken))
    assert a["log_lambda"] == b["log_lambda"] != math.log(0.5)
    assert read_metrics(broken) == rows


def test_an_ensemble_of_identical_reward_models_is_that_reward_model(micro, tmp_path):
    train_ppo.main(ppo_args(micro, str(tmp_path / "single"), 2))
    for how in ("mean", "min"):
        train_ppo.main(ppo_args(micro, str(tmp_path / how), 2, "--rm-helpful", micro["rm"], micro["rm"], micro["rm"],
                                "--ensemble", how))
        assert math.isclose(read_metrics(str(tmp_path / how))[-1]["logit_R_c"],
                            read_metrics(str(tmp_path / "single"))[-1]["logit_R_c"], rel_tol=1e-5)
        assert read_metrics(str(tmp_path / how))[-1]["R_c"] == \
            pytest.approx(read_metrics(str(tmp_path / "single"))[-1]["R_c"], rel=1e-5)


def test_prompt_file_errors_name_the_line(micro, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(prompt="fine")) + "\n" + json.dumps(dict(messages=[{"role": "assistant",
                                                                                        "content": "x"}])) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_ppo.main(ppo_args(micro, str(tmp_path / "out"), 1, "--prompts", str(bad)))
    assert not os.path.exists(tmp_path / "out")                      # every input is read before anything is written


def test_command_line_needs_its_inputs_and_refuses_nonsense(micro, capsys):
    needed = ["--init", micro["sft"], "--rm-safety", micro["rm"], "--rm-helpful", micro["rm"], "--out", "x"]
    assert train_ppo.get_args(needed).iterations == 15                # the tiny preset by default
    for i in range(0, len(needed), 2):                                # each required flag left out in turn
        with pytest.raises(SystemExit) as e:
            train_ppo.get_args(needed[:i] + needed[i + 2:])
        assert e.value.code == 2 and needed[i] in capsys.readouterr().err
    for bad, named in ((["--iterations", "-5"], "--iterations"), (["--minibatch-size", "0"], "--minibatch-size"),
                       (["--lr", "nan"], "--lr"), (["--batch-size", "30", "--minibatch-size", "8"], "multiple"),
                       (["--eval-prompts", "-2"], "--eval-prompts"), (["--reward", "gold"], "--reward")):
        with pytest.raises(SystemExit) as e:
            train_ppo.get_args(needed + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and named in err, (bad, err)


def test_user_errors_leave_nothing_behind(micro, tmp_path):
    out = str(tmp_path / "out")
    # the micro policy's context is 64 tokens: 64 new tokens leave no room for a prompt
    with pytest.raises(runtime.UserError, match="--max-new-tokens 64 leaves no room"):
        train_ppo.main(ppo_args(micro, out, 1, "--max-new-tokens", "64"))
    # the value model starts from the safety RM (--value-init safety), which must read the policy's tokens
    other = tokenizer.Tokenizer({bytes([b]): (b + 1) % 256 for b in range(256)}, name="shifted")
    rm_path, rm = str(tmp_path / "rm_other.pt"), ascii_reward_model(other)
    save_checkpoint(rm_path, dict(model=rm.state_dict(), model_config=vars(rm.config), tokenizer=other.to_dict()))
    with pytest.raises(runtime.UserError, match="--value-init safety: .* has another tokenizer"):
        train_ppo.main(ppo_args(micro, out, 1, "--rm-safety", rm_path))
    assert not os.path.exists(out)


def test_a_second_run_into_the_same_folder_needs_resume_or_overwrite(micro, tmp_path):
    out = str(tmp_path / "out")
    train_ppo.main(ppo_args(micro, out, 2))
    with pytest.raises(runtime.UserError, match="already holds a run"):
        train_ppo.main(ppo_args(micro, out, 1))
    train_ppo.main(ppo_args(micro, out, 1, "--overwrite"))
    assert [r["step"] for r in read_metrics(out)] == [1]              # the old run's rows are gone
    assert load_checkpoint(os.path.join(out, "model.pt"))["step"] == 1


def test_sigterm_saves_the_iteration_reached_and_resume_loses_nothing(micro, tmp_path, monkeypatch, capsys):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train_ppo.main(ppo_args(micro, straight, 4, "--kl-target", "0.5"))
    real, calls = train_ppo.policy_loss, []

    def policy_loss(*args):
        calls.append(1)
        if len(calls) == 17:  # 8 minibatches per iteration: the first of iteration 2 (0-based)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(train_ppo, "policy_loss", policy_loss)
    with pytest.raises(SystemExit) as e:
        train_ppo.main(ppo_args(micro, stopped, 4, "--kl-target", "0.5"))
    # iteration 2 finishes, then the checkpoint holds step 3 (not a --save-every step) and the run exits 128 + 15
    assert e.value.code == 128 + signal.SIGTERM and len(calls) == 24
    assert "SIGTERM at iteration 3" in capsys.readouterr().out
    assert load_checkpoint(os.path.join(stopped, "model.pt"))["step"] == 3
    monkeypatch.setattr(train_ppo, "policy_loss", real)
    train_ppo.main(ppo_args(micro, stopped, 4, "--kl-target", "0.5", "--resume"))
    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, stopped))
    assert a["step"] == b["step"] == 4 and a["beta"] == b["beta"]
    for key in ("model", "value_model"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    assert read_metrics(stopped) == read_metrics(straight)


def test_gold_eval_during_training_and_at_the_end(micro, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ppo_args(micro, out, 2, "--init", micro["sft_long"], "--value-init", "policy", "--eval-prompts", "6",
                    "--eval-every", "1")
    result = train_ppo.main(argv)
    rows = read_metrics(out)
    # iteration 1 is evaluated during training, iteration 2 (the last) by the final evaluation, in a row of its own
    assert [r["step"] for r in rows] == [1, 2, 2] and "eval" in rows[0] and "eval" not in rows[1]
    assert json.dumps(rows[2]) == json.dumps({"step": 2, "eval": result["eval"]})  # (a rate may be NaN)
    assert result["eval"]["n_prompts"] == 6
    assert 0 <= result["eval"]["violation_rate"] <= 1 and 0 <= result["eval"]["benign_accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "eval at iteration 1: violation_rate" in printed
    assert "gold judge on 6 held-out prompts: violation_rate" in printed


def test_gold_evaluation_reads_the_validation_split():
    validation = world.build_world(0).headline("validation")  # the rung the rates are over
    assert train_ppo.held_out_examples(0, -1) == validation and train_ppo.held_out_examples(0, 0) == []
    six = train_ppo.held_out_examples(0, 6)  # spread over the split: every kind of prompt
    assert len(six) == 6 and all(ex in validation for ex in six)
    assert {ex.split for ex in six} == {"validation"} and {ex.kind for ex in six} == {"benign", "harmful", "borderline"}


def test_world_prompts_carry_the_safety_tag_and_long_ones_are_skipped():
    tok = byte_tokenizer()
    prompts = train_ppo.encode_prompts("world", tok, max_prompt_len=10_000, world_seed=0)
    n = len(world.build_world(0).rl_prompts)
    assert len(prompts) == n and sum(p.safety for p in prompts) == 300
    assert all(p.safety == (p.example.kind == "harmful") for p in prompts)
    assert all(p.ids == tok.encode_prompt(p.example.messages) for p in prompts[:20])
    short = train_ppo.encode_prompts("world", tok, max_prompt_len=60, world_seed=0)
    assert 0 < len(short) < n and all(len(p.ids) <= 60 for p in short)
