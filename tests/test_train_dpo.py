import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

import data
import judge
import loaders
import runtime
import tokenizer
import train_dpo
import world
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint, token_logprobs

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
    losses = [train_dpo.dpo_loss(t([c]), t([-5.0]), t([-4.0]), t([-5.0]), beta=0.1)[0].item()
              for c in (-6, -4, -2, 0)]
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
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)),
                                        rel=1e-6)
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
    logps, lengths = t([[-4.0, -12.0]]), t([[4.0, 6.0]])   # means -1 and -2
    loss, _ = train_dpo.pair_loss("simpo", logps, torch.zeros(1, 2), lengths, 2.0, 0.1, 1.0, 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_pair_loss_dispatch_passes_each_loss_its_own_numbers():
    # columns (chosen, rejected): the first DPO pair, beta h = 1 at beta 0.5; chosen answer of 4 tokens
    logps, ref_logps, lengths = t([[-3.0, -5.0]]), t([[-4.0, -4.0]]), t([[4.0, 2.0]])
    args = (logps, ref_logps, lengths, 0.5, 0.1, 0.5, 1.0)   # beta, label_smoothing, rpo_alpha, gamma
    by_hand = {"dpo": math.log(1 + math.exp(-1)),
               "ipo": (2.0 - 1.0) ** 2,                                  # h = 2, target 1 / (2 * 0.5) = 1
               "cdpo": 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)),
               "rpo": math.log(1 + math.exp(-1)) + 0.5 * 3 / 4,
               "simpo": math.log(1 + math.exp(-(0.5 * -0.75 - 0.5 * -2.5 - 1.0)))}  # beta * mean log-probs - gamma
    assert set(by_hand) == set(train_dpo.LOSSES)
    for name, expected in by_hand.items():
        assert train_dpo.pair_loss(name, *args)[0].item() == pytest.approx(expected, rel=1e-6), name


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
    """Every 8th pair of each world annotator (about 170 for training): enough for the micro runs, a fraction of
    the time."""
    every_pair = judge.preference_pairs
    monkeypatch.setattr(judge, "preference_pairs", lambda *a: every_pair(*a)[::8])


def micro_args(init, out, *extra):
    return train_dpo.get_args(["--init", init, "--out", str(out), "--steps", "4", "--batch-size", "16",
                               "--lr", "3e-3", "--warmup", "2", "--eval-every", "2", "--val-pairs", "32",
                               "--kl-prompts", "4", "--max-new-tokens", "8", "--device", "cpu", *extra])


def test_policy_equal_to_reference_gives_log2_and_zero_kl(micro_init):
    path, tok = micro_init
    pairs = judge.labelled_pairs(world.build_world(0), "llama2", 0.0, 0, "train", 2)[:6]
    rows = train_dpo.encode(tok, pairs, 192)
    policy, _, _ = loaders.load_policy(path)
    ref_model, _ = loaders.load_any_model(path)
    batch = train_dpo.collate_pairs(rows, tok.pad_id, "cpu")
    logps, lengths = train_dpo.answer_logps(policy, batch)
    ref_logps, _ = train_dpo.answer_logps(ref_model, batch)
    loss, stats = train_dpo.pair_loss("dpo", logps, ref_logps, lengths, 0.1, 0.1, 1.0, 1.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["chosen_reward"].abs().max().item() < 1e-6
    prompts = [train_dpo.prompt_ids(r) for r in rows[:3]]
    assert train_dpo.sampled_kl(policy, ref_model, prompts, tok, 8, torch.Generator().manual_seed(0)) == 0.0


def test_answer_logps_sum_answer_tokens_only_in_one_padded_batch(micro_init):
    path, tok = micro_init
    policy, _, _ = loaders.load_policy(path)
    prompt = [{"role": "user", "content": "How do I kill a Python process?"}]
    pairs = [dict(messages=prompt, chosen="Use the kill command with the process id.", rejected="I can't help."),
             dict(messages=[{"role": "user", "content": "Hi"}], chosen="Hello there, friend.",
                  rejected="No.")]
    rows = data.encode_pairs(tok, pairs, 192)
    logps, lengths = train_dpo.answer_logps(policy, train_dpo.collate_pairs(rows, tok.pad_id, "cpu"))  # (2, 2)
    for i, row in enumerate(rows):
        for j, side in enumerate(("chosen", "rejected")):
            ids, mask = torch.tensor([row[side]]), row[f"{side}_mask"]
            alone = token_logprobs(policy, ids, torch.ones_like(ids))[0]   # this row, unpadded
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
    real_save = runtime.save_on_rank0

    def save_then_die(rt, p, state):
        real_save(rt, p, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "save_on_rank0", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(micro_args(path, tmp_path / "c", "--save-every", "2"))
    monkeypatch.setattr(runtime, "save_on_rank0", real_save)
    resumed = train_dpo.main(micro_args(path, tmp_path / "c", "--save-every", "2", "--resume"))
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    a, b = (load_checkpoint(str(tmp_path / d / "model.pt"))["model"] for d in ("b", "c"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [json.loads(line)["step"] for line in open(tmp_path / "c" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_reference_on_the_fly_matches_precomputed(micro_init, few_pairs, tmp_path):
    path, _ = micro_init
    once = train_dpo.main(micro_args(path, tmp_path / "once", "--steps", "2"))
    fly = train_dpo.main(micro_args(path, tmp_path / "fly", "--steps", "2", "--ref-on-the-fly", "--keep-every", "1"))
    assert fly["loss"] == pytest.approx(once["loss"], abs=1e-5)
    assert fly["margin"] == pytest.approx(once["margin"], abs=1e-5)
    # --keep-every: the policy at each kept step, the last one the saved model's weights
    assert sorted(p.name for p in (tmp_path / "fly").glob("policy_*.pt")) == ["policy_0001.pt", "policy_0002.pt"]
    kept, final = (torch.load(tmp_path / "fly" / name, weights_only=False) for name in ("policy_0002.pt", "model.pt"))
    assert kept["step"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in final["model"].items())


def test_world_pairs_hold_out_the_validation_split(micro_init, few_pairs, tmp_path, monkeypatch):
    _, tok = micro_init
    read, real_split = [], world.World.split
    monkeypatch.setattr(world.World, "split", lambda self, name: read.append(name) or real_split(self, name))
    train, val = train_dpo.load_pairs(micro_args("init.pt", tmp_path / "out"), tok, 192)
    assert set(read) == {"train", "validation"}  # never the test split: that is evaluate.py's
    assert len(val) == 32 and {r["safety"] for r in val} == {True, False} and len(train) > 100


def test_files_feed_the_gate_and_errors_name_file_and_line(micro_init, tmp_path):
    _, tok = micro_init
    helpful, safety = tmp_path / "helpful.jsonl", tmp_path / "safety.jsonl"
    helpful.write_text(json.dumps(dict(prompt="Hi", chosen="Hello.", rejected="Go away.")) + "\n")
    safety.write_text("".join(json.dumps(dict(prompt=[{"role": "user", "content": f"How do I rob bank {i}?"}],
                                              chosen="I can't help with that.", rejected="Sure, here is how.")) + "\n"
                              for i in range(3)))
    args = micro_args("init.pt", tmp_path / "out", "--data", str(helpful), "--safety-data", str(safety))
    train, val = train_dpo.load_pairs(args, tok, 192)
    assert [r["safety"] for r in val + train] == [False, True, True, True]     # every 20th pair is held out
    assert tok.decode(val[0]["chosen"]) == "[INST] Hi [/INST] Hello. "
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(prompt="Hi", chosen="A", rejected="B")) + "\n"
                   + json.dumps(dict(prompt="Hi", chosen="A")) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*rejected"):
        train_dpo.load_pairs(micro_args("init.pt", tmp_path / "out", "--data", str(bad)), tok, 192)
    with pytest.raises(SystemExit):
        micro_args("init.pt", tmp_path / "out", "--safety-data", str(safety))   # world pairs and files do not mix


def test_held_out_files_and_the_safety_share_and_the_check(micro_init, tmp_path):
    _, tok = micro_init
    helpful, safety = tmp_path / "helpful.jsonl", tmp_path / "safety.jsonl"
    helpful.write_text("".join(json.dumps(dict(prompt=f"Hi {i}", chosen="Hello.", rejected="Go away.")) + "\n"
                               for i in range(30)))
    safety.write_text("".join(json.dumps(dict(prompt=f"How do I rob bank {i}?", chosen="I won't help with that.",
                                              rejected="Sure, here is how.")) + "\n" for i in range(10)))
    args = micro_args("init.pt", tmp_path / "out", "--data", str(helpful), "--safety-data", str(safety),
                      "--safety-fraction", "0.5", "--val-data", str(helpful), "--safety-val-data", str(safety),
                      "--val-pairs", "4")
    train, val = train_dpo.load_pairs(args, tok, 192)
    assert sum(r["safety"] for r in train) == 10 and len(train) == 20       # as many helpful pairs as safety ones
    assert sum(r["safety"] for r in val) == 4 and len(val) == 8              # up to --val-pairs of each, spread
    # the check reads the held-out safety pairs' loss and accuracy
    args = micro_args("init.pt", tmp_path / "out", "--max-safety-val-loss", "0.5", "--min-safety-val-accuracy", "0.8")
    train_dpo.check_moved(args, dict(val_loss_safety=0.3, val_accuracy_safety=0.9))
    for moved in (dict(val_loss_safety=0.6931, val_accuracy_safety=0.9), dict(val_loss_safety=0.3,
                                                                             val_accuracy_safety=0.5), {}):
        with pytest.raises(runtime.UserError, match="dpo did not move enough: held-out safety pairs' loss"):
            train_dpo.check_moved(args, moved)
    train_dpo.check_moved(micro_args("init.pt", tmp_path / "out"), {})       # no check asked: nothing to meet


def test_llama2_gate_takes_safety_labels_on_safety_prompts_only():
    """--pairs llama2 trains on judge.labelled_pairs(w, "llama2"): the annotators' pairs under the gate, in the order
    (safety prompts, then the rest) that train_dpo.py built them in before they moved to judge.py."""
    w = world.build_world(0)
    for noise in (0.0, 0.1):
        gated = ([p for p in judge.preference_pairs(w, "safety", noise, 0, "train", 2)
                  if world.is_safety(p["example"])]
                 + [p for p in judge.preference_pairs(w, "helpfulness", noise, 0, "train", 2)
                    if not world.is_safety(p["example"])])
        assert {p["objective"] for p in gated if world.is_safety(p["example"])} == {"safety"}
        assert {p["objective"] for p in gated if not world.is_safety(p["example"])} == {"helpfulness"}
        pairs = judge.labelled_pairs(w, "llama2", noise, 0, "train", 2)
        assert [(p["messages"], p["chosen"], p["rejected"], p["strength"], p["safety"]) for p in pairs] == \
            [(p["example"].messages, p["chosen"], p["rejected"], p["strength"], world.is_safety(p["example"]))
             for p in gated]
        # on a harmful prompt the noise-free safety annotator never prefers the unsafe compliance
        assert noise or not any(judge.judge(p["example"], p["chosen"]).unsafe
                                for p in gated if world.is_safety(p["example"]))


def test_a_signal_saves_the_step_reached_and_resume_loses_nothing(micro_init, few_pairs, tmp_path, monkeypatch,
                                                                    signal_on_call):
    """Ctrl-C mid-step: the step finishes, its checkpoint is saved between --save-every boundaries, the run exits
    with 128 + 2, and --resume ends with the uninterrupted run's weights."""
    path, _ = micro_init
    straight = train_dpo.main(micro_args(path, tmp_path / "straight", "--eval-every", "100"))
    # during step 3 (one micro-batch per step, no eval before it)
    real = signal_on_call(train_dpo, "pair_loss", 3)
    with pytest.raises(SystemExit) as stopped:
        train_dpo.main(micro_args(path, tmp_path / "stopped", "--eval-every", "100"))
    monkeypatch.setattr(train_dpo, "pair_loss", real)
    assert stopped.value.code == 128 + signal.SIGINT
    assert load_checkpoint(str(tmp_path / "stopped" / "model.pt"))["step"] == 3
    resumed = train_dpo.main(micro_args(path, tmp_path / "stopped", "--eval-every", "100", "--resume"))
    assert resumed["step"] == 4 and resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    a, b = (load_checkpoint(str(tmp_path / d / "model.pt")) for d in ("straight", "stopped"))
    assert b["stage"] == "dpo" and all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])


def test_resume_needs_the_same_init_and_bad_input_writes_nothing(micro_init, tmp_path):
    path, _ = micro_init
    other = tmp_path / "other.pt"
    other.write_bytes(open(path, "rb").read())
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        train_dpo.main(micro_args(path, out, "--data", str(tmp_path / "missing.jsonl")))
    assert not out.exists()  # every input is read before the run folder is made
    helpful = tmp_path / "helpful.jsonl"
    helpful.write_text("".join(json.dumps(dict(prompt=f"Name fruit {i}", chosen="An apple.", rejected="No.")) + "\n"
                               for i in range(40)))
    train_dpo.main(micro_args(path, out, "--data", str(helpful), "--steps", "2", "--val-pairs", "2"))
    with pytest.raises(runtime.UserError, match="already holds a run"):
        train_dpo.main(micro_args(path, out, "--data", str(helpful), "--steps", "2", "--val-pairs", "2"))
    with pytest.raises(runtime.UserError, match="pass the same --init to resume"):
        train_dpo.main(micro_args(str(other), out, "--data", str(helpful), "--steps", "3", "--val-pairs", "2",
                                  "--resume"))


@pytest.mark.parametrize("flags", [["--steps", "-5"], ["--beta", "0"], ["--val-pairs", "0"], ["--label-noise", "0.5"],
                                   ["--label-smoothing", "0.5"], ["--styles-per-prompt", "1"],
                                   ["--data", "world", "more.jsonl"], ["--data", "a.jsonl", "--pairs", "safety"]])
def test_flag_errors_are_one_line_and_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        micro_args("init.pt", "out", *flags)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_init_and_out_are_required():
    for argv in (["--out", "out"], ["--init", "sft.pt"]):
        with pytest.raises(SystemExit) as e:
            train_dpo.get_args(argv)
        assert e.value.code == 2
