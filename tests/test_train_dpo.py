import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tokenizer  # noqa: E402
import train_dpo  # noqa: E402
import world  # noqa: E402
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint  # noqa: E402

t = torch.tensor


# ---------------------------------------------------------------------------------------------- losses by hand
def test_dpo_loss_by_hand():
    # pair 1: h = (-3 - -4) - (-5 - -4) = 2, beta h = 1;  pair 2: h = (-2 - -2) - (-6 - -7) = -1, beta h = -0.5
    loss, stats = train_dpo.dpo_loss(t([-3.0, -2.0]), t([-5.0, -6.0]), t([-4.0, -2.0]), t([-4.0, -7.0]), beta=0.5)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2   # -log sigma(z) = log(1 + e^-z)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["chosen_reward"].tolist() == pytest.approx([0.5, 0.0])          # 0.5 * (-3 - -4), 0.5 * 0
    assert stats["rejected_reward"].tolist() == pytest.approx([-0.5, 0.5])       # 0.5 * (-5 - -4), 0.5 * (-6 - -7)


def test_dpo_loss_falls_as_chosen_logp_rises():
    losses = [train_dpo.dpo_loss(t([c]), t([-5.0]), t([-4.0]), t([-5.0]), beta=0.1)[0].item() for c in (-6, -4, -2, 0)]
    assert losses == sorted(losses, reverse=True) and losses[1] == pytest.approx(math.log(2))


def test_ipo_loss_by_hand_and_its_minimum_is_the_target():
    # beta = 0.25: target 1 / (2 * 0.25) = 2.  pair 1: h = 2 -> 0;  pair 2: h = (-1 - -1) - (-2 - -2) = 0 -> 4
    loss, stats = train_dpo.ipo_loss(t([-3.0, -1.0]), t([-5.0, -2.0]), t([-4.0, -1.0]), t([-4.0, -2.0]), beta=0.25)
    assert loss.item() == pytest.approx((0.0 + 4.0) / 2)
    assert stats["chosen_reward"].tolist() == pytest.approx([0.25, 0.0])
    # past the target the square pushes back: h = 3 costs (3 - 2)^2 = 1, like h = 1
    above = train_dpo.ipo_loss(t([-1.0]), t([-4.0]), t([-1.0]), t([-1.0]), beta=0.25)[0].item()
    below = train_dpo.ipo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-1.0]), beta=0.25)[0].item()
    assert above == pytest.approx(1.0) and below == pytest.approx(1.0)


def test_cdpo_loss_by_hand_and_reduces_to_dpo():
    # beta h = 1 as in the first DPO pair; eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    args = (t([-3.0]), t([-5.0]), t([-4.0]), t([-4.0]))
    loss, _ = train_dpo.cdpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)), rel=1e-6)
    assert train_dpo.cdpo_loss(*args, beta=0.5, label_smoothing=0.0)[0].item() == pytest.approx(
        train_dpo.dpo_loss(*args, beta=0.5)[0].item())
    # its minimum is a finite margin: beta h = log((1 - eps) / eps)
    margins = torch.linspace(0, 5, 501)
    per_margin = -(0.9 * F.logsigmoid(margins) + 0.1 * F.logsigmoid(-margins))
    assert margins[per_margin.argmin()].item() == pytest.approx(math.log(9), abs=0.01)
    h = torch.tensor([math.log(9) / 0.5], requires_grad=True)   # at the optimum the gradient vanishes
    train_dpo.cdpo_loss(h, t([0.0]), t([0.0]), t([0.0]), beta=0.5, label_smoothing=0.1)[0].backward()
    assert abs(h.grad.item()) < 1e-6


def test_rpo_loss_adds_the_chosen_per_token_nll_to_dpo():
    # the first DPO pair (log(1 + e^-1)) plus alpha * NLL per token: 0.5 * 3 / 4 (chosen log-prob -3 over 4 tokens)
    loss, stats = train_dpo.rpo_loss(t([-3.0]), t([-5.0]), t([-4.0]), t([-4.0]), t([4.0]), beta=0.5, alpha=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.375, rel=1e-6)
    assert stats["chosen_reward"].item() == pytest.approx(0.5)


def test_simpo_loss_by_hand_uses_mean_logps_and_no_reference():
    # mean log-probs -1 and -2, beta 2, gamma 1: 2 * -1 - 2 * -2 - 1 = 1 -> log(1 + e^-1)
    loss, stats = train_dpo.simpo_loss(t([-1.0]), t([-2.0]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert (stats["chosen_reward"].item(), stats["rejected_reward"].item()) == (-2.0, -4.0)


def test_pair_loss_dispatch_feeds_simpo_per_token_means():
    args = train_dpo.get_args(["--loss", "simpo", "--beta", "2", "--gamma", "1"])
    logps, lengths = t([[-4.0, -12.0]]), t([[4.0, 6.0]])   # means -1 and -2
    loss, _ = train_dpo.pair_loss(args, logps, torch.zeros(1, 2), lengths)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


# ---------------------------------------------------------------------------------------------- micro model
@pytest.fixture(scope="module")
def micro_init(tmp_path_factory):
    """A micro policy checkpoint with a BPE trained on the world's SFT text (sequences fit in 192 tokens)."""
    texts = [m["content"] for d in world.build_world(0).sft for m in d]
    tok = tokenizer.Tokenizer(tokenizer.train_bpe(texts, 256 + 256), name="micro")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=192)
    path = str(tmp_path_factory.mktemp("init") / "model.pt")
    save_checkpoint(path, dict(model=Transformer(config).state_dict(), model_config=vars(config),
                               tokenizer=tok.to_dict(), step=0))
    return path, tok


@pytest.fixture
def few_pairs(monkeypatch):
    """Every 8th world pair (about 170 for training): enough for the micro runs, a fraction of the time."""
    every_pair = train_dpo.world_pairs
    monkeypatch.setattr(train_dpo, "world_pairs", lambda *a: every_pair(*a)[::8])


def micro_args(init, out, *extra):
    return train_dpo.get_args(["--init", init, "--out", str(out), "--steps", "4", "--batch-size", "16",
                               "--lr", "3e-3", "--warmup", "2", "--eval-every", "2", "--val-pairs", "32",
                               "--kl-prompts", "4", "--max-new-tokens", "8", "--device", "cpu", *extra])


def test_policy_equal_to_reference_gives_log2_and_zero_kl(micro_init):
    path, tok = micro_init
    args = train_dpo.get_args(["--init", path])
    pairs = train_dpo.world_pairs(world.build_world(0), 0.0, 0, "train", 2)[:6]
    for p in pairs:
        p["safety"] = world.is_safety(p["example"])
    rows = train_dpo.encode(tok, pairs, 192)
    policy, _ = train_dpo.load_model(path)
    ref_model, _ = train_dpo.load_model(path)
    batch = train_dpo.collate_pairs(rows, tok.pad_id, "cpu")
    logps, lengths = train_dpo.answer_logps(policy, batch)
    ref_logps, _ = train_dpo.answer_logps(ref_model, batch)
    loss, stats = train_dpo.pair_loss(args, logps, ref_logps, lengths)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["chosen_reward"].abs().max().item() < 1e-6
    prompts = [train_dpo.prompt_ids(r) for r in rows[:3]]
    assert train_dpo.sampled_kl(policy, ref_model, prompts, tok, 8, torch.Generator().manual_seed(0)) == 0.0


def test_answer_logps_sum_answer_tokens_only_in_one_padded_batch(micro_init):
    path, tok = micro_init
    policy, _ = train_dpo.load_model(path)
    prompt = [{"role": "user", "content": "How do I kill a Python process?"}]
    pairs = [dict(messages=prompt, chosen="Use the kill command with the process id.", rejected="I can't help."),
             dict(messages=[{"role": "user", "content": "Hi"}], chosen="Hello there, friend.",
                  rejected="No.")]
    rows = data.encode_pairs(tok, pairs, 192)
    logps, lengths = train_dpo.answer_logps(policy, train_dpo.collate_pairs(rows, tok.pad_id, "cpu"))  # (2, 2)
    for i, row in enumerate(rows):
        for j, side in enumerate(("chosen", "rejected")):
            ids, mask = torch.tensor([row[side]]), row[f"{side}_mask"]
            alone = train_dpo.token_logprobs(policy, ids, torch.ones_like(ids))[0]   # this row, unpadded
            by_hand = sum(alone[k - 1].item() for k in range(1, len(mask)) if mask[k])
            assert logps[i, j].item() == pytest.approx(by_hand, abs=1e-4)
            assert lengths[i, j].item() == sum(mask)   # answer tokens and </s>, no prompt token


def test_micro_run_raises_preference_accuracy_and_resumes(micro_init, few_pairs, tmp_path, monkeypatch):
    path, _ = micro_init
    result = train_dpo.main(micro_args(path, tmp_path / "a", "--steps", "12", "--eval-every", "6"))
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    # policy == reference at the start: every margin is (about) 0, so accuracy starts near 0 and the loss at log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and rows[0]["accuracy"] < 0.5
    assert result["val_accuracy"] >= 0.8 and result["val_loss"] < math.log(2) - 0.1
    assert sum(r["accuracy"] for r in rows[-3:]) / 3 >= 0.7   # training labels carry 10% noise
    assert {"chosen_reward", "rejected_reward", "margin", "kl", "val_accuracy_safety"} <= set(rows[-1])
    assert load_checkpoint(str(tmp_path / "a" / "model.pt"))["step"] == 12

    # resume: a run killed right after its step-2 checkpoint, resumed, ends where an uninterrupted run ends
    straight = train_dpo.main(micro_args(path, tmp_path / "b", "--save-every", "2"))
    real_save = train_dpo.save_checkpoint

    def save_then_die(p, state):
        real_save(p, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_dpo, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(micro_args(path, tmp_path / "c", "--save-every", "2"))
    monkeypatch.setattr(train_dpo, "save_checkpoint", real_save)
    resumed = train_dpo.main(micro_args(path, tmp_path / "c", "--save-every", "2", "--resume"))
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    a, b = (load_checkpoint(str(tmp_path / d / "model.pt"))["model"] for d in ("b", "c"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_reference_on_the_fly_matches_precomputed(micro_init, few_pairs, tmp_path):
    path, _ = micro_init
    once = train_dpo.main(micro_args(path, tmp_path / "once", "--steps", "2"))
    fly = train_dpo.main(micro_args(path, tmp_path / "fly", "--steps", "2", "--ref-on-the-fly"))
    assert fly["loss"] == pytest.approx(once["loss"], abs=1e-5)
    assert fly["margin"] == pytest.approx(once["margin"], abs=1e-5)


def test_files_feed_the_gate_and_errors_name_file_and_line(micro_init, tmp_path):
    _, tok = micro_init
    helpful, safety = tmp_path / "helpful.jsonl", tmp_path / "safety.jsonl"
    helpful.write_text(json.dumps(dict(prompt="Hi", chosen="Hello.", rejected="Go away.")) + "\n")
    safety.write_text("".join(json.dumps(dict(prompt=[{"role": "user", "content": f"How do I rob bank {i}?"}],
                                              chosen="I can't help with that.", rejected="Sure, here is how.")) + "\n"
                              for i in range(3)))
    args = train_dpo.get_args(["--data", str(helpful), "--safety-data", str(safety)])
    train, val = train_dpo.load_pairs(args, tok, 192)
    assert [r["safety"] for r in val + train] == [False, True, True, True]     # every 20th pair is held out
    assert tok.decode(val[0]["chosen"]) == "[INST] Hi [/INST] Hello. "
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(prompt="Hi", chosen="A", rejected="B")) + "\n"
                   + json.dumps(dict(prompt="Hi", chosen="A")) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*rejected"):
        train_dpo.load_pairs(train_dpo.get_args(["--data", str(bad)]), tok, 192)
    with pytest.raises(SystemExit):
        train_dpo.get_args(["--safety-data", str(safety)])   # world pairs and files do not mix


def test_llama2_gate_takes_safety_labels_on_safety_prompts_only():
    w = world.build_world(0)
    pairs = train_dpo.world_pairs(w, 0.0, 0, "train", 2)
    assert {p["objective"] for p in pairs if world.is_safety(p["example"])} == {"safety"}
    assert {p["objective"] for p in pairs if not world.is_safety(p["example"])} == {"helpfulness"}
    # on a harmful prompt the safety annotator never prefers the unsafe compliance
    assert not any(world.judge(p["example"], p["chosen"]).unsafe for p in pairs if world.is_safety(p["example"]))
