import json
import math
import random
import signal

import pytest
import torch

import data
import judge
import reward
import runtime
import tokenizer
import train_rm
import world
from model import ModelConfig, Transformer, last_token_values, save_checkpoint


def sig(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- the loss
def test_ranking_loss_by_hand_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    loss, stats = train_rm.ranking_loss(chosen, rejected, torch.zeros(2))
    # gaps r_c - r_r are 1 and -1
    assert loss.item() == pytest.approx((-math.log(sig(1.0)) - math.log(sig(-1.0))) / 2, rel=1e-6)
    assert stats["accuracy"].item() == 0.5 and stats["reward_gap"].item() == pytest.approx(0.0)


def test_ranking_loss_by_hand_with_margin():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    margin = torch.tensor([1.0, 1 / 3])  # "significantly better" and "slightly better" in the small table
    loss, _ = train_rm.ranking_loss(chosen, rejected, margin)
    # 1 - 1 = 0 and -1 - 1/3 = -4/3
    assert loss.item() == pytest.approx((-math.log(sig(0.0)) - math.log(sig(-4 / 3))) / 2, rel=1e-6)
    # the margin asks for a wider gap: the same scores cost more with it
    assert loss.item() > train_rm.ranking_loss(chosen, rejected, torch.zeros(2))[0].item()


def test_ranking_loss_falls_as_the_chosen_score_rises():
    losses = [train_rm.ranking_loss(torch.tensor([c]), torch.tensor([0.0]), torch.tensor([0.5]))[0].item()
              for c in (-2.0, 0.0, 1.0, 3.0)]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_margin_table_file_margin_and_off():
    small, large = train_rm.MARGINS["small"], train_rm.MARGINS["large"]
    assert [small[s] for s in judge.STRENGTHS] == pytest.approx([1, 2 / 3, 1 / 3, 0])  # Llama 2, Table 28
    assert [large[s] for s in judge.STRENGTHS] == [3, 2, 1, 0]
    assert train_rm.margin_of({"strength": "better"}, small) == pytest.approx(2 / 3)
    assert train_rm.margin_of({"strength": "better", "margin": 0.25}, small) == 0.25  # the file's own margin wins
    assert train_rm.margin_of({"strength": None}, small) == 0.0
    assert train_rm.margin_of({"strength": "significantly better", "margin": 2.0}, None) == 0.0  # --margin off


def test_mix_takes_the_requested_share_of_the_other_objective():
    own, other = [("own", i) for i in range(90)], [("other", i) for i in range(50)]
    mixed = train_rm.mix(own, other, 0.1, seed=0)
    assert mixed[:90] == own and len(mixed) == 100 and all(p[0] == "other" for p in mixed[90:])
    assert train_rm.mix(own, other, 0.0, seed=0) == own
    with pytest.warns(UserWarning, match="only 50 pairs to mix in"):
        assert len(train_rm.mix(own, other, 0.5, seed=0)) == 140


# ---------------------------------------------------------------------------------------------- micro models
@pytest.fixture(scope="module")
def tok():
    w = world.build_world(0)
    texts = [m["content"] for ex in w.preference_prompts[::4] for m in ex.messages]
    texts += [w.response(ex, s, random.Random(0)) for ex in w.preference_prompts[::8] for s in world.STYLES]
    return tokenizer.Tokenizer(tokenizer.train_bpe(texts, 256 + 1000), name="micro")


def micro_checkpoint(path, tok, head="lm", seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    max_seq_len=160, head=head))
    save_checkpoint(str(path), dict(model=model.state_dict(), model_config=vars(model.config), tokenizer=tok.to_dict()))
    return str(path), model


def test_score_reads_the_last_real_token_under_left_and_right_padding(tok, tmp_path):
    path, model = micro_checkpoint(tmp_path / "rm.pt", tok, head="scalar")
    with torch.no_grad():
        model.score.bias.fill_(0.3)
    save_checkpoint(path, dict(model=model.state_dict(), model_config=vars(model.config), tokenizer=tok.to_dict()))
    reward_model, rm_tok = reward.load_reward_model(path)
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "How do I steal a car?"}],
                     [{"role": "user", "content": "Opposite of hot?"}]]
    responses = ["The capital of France is Paris.", "I can't help you steal a car.", "Cold."]
    rows = [reward.encode_scored(rm_tok, c, r) for c, r in zip(conversations, responses)]
    assert all(row[-1] == rm_tok.eos_id for row in rows)  # the score is read at the response's </s>
    # training encodes through the same function: the RM learns at the token score() reads
    pairs = [dict(messages=c, chosen=r, rejected="No.") for c, r in zip(conversations, responses)]
    assert [row["chosen"] for row in train_rm.encode_rows(rm_tok, pairs, None, 160)] == rows
    with torch.no_grad():
        alone = torch.stack([reward_model(torch.tensor([row]))[0, -1] for row in rows])  # no padding at all
        by_side = {}
        for side in ("left", "right"):
            batch = data.collate(rows, rm_tok.pad_id, side=side)
            values = reward_model(batch["tokens"], batch["attention_mask"])
            by_side[side] = last_token_values(values, batch["attention_mask"])
    scored = reward.score(reward_model, rm_tok, conversations, responses, batch_size=2)  # two batches, left pads
    assert scored.dtype == torch.float32 and scored.shape == (3,)
    for got in (by_side["left"], by_side["right"], scored):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    assert len(set(alone.tolist())) == 3  # distinct rows: a wrong index would show


def test_load_reward_model_is_frozen_and_refuses_an_lm_checkpoint(tok, tmp_path):
    path, _ = micro_checkpoint(tmp_path / "rm.pt", tok, head="scalar")
    reward_model, _ = reward.load_reward_model(path)
    assert not reward_model.training and not any(p.requires_grad for p in reward_model.parameters())
    lm_path, _ = micro_checkpoint(tmp_path / "lm.pt", tok, head="lm")
    with pytest.raises(ValueError, match="not a reward model's scalar head"):
        reward.load_reward_model(lm_path)


# ---------------------------------------------------------------------------------------------- training runs
def micro_args(init, out, *extra):
    return train_rm.get_args(["--objective", "safety", "--init", init, "--out", str(out), "--device", "cpu",
                              "--batch-size", "16", "--lr", "3e-3", "--warmup", "3", "--eval-every", "1000",
                              "--max-train-pairs", "320", "--max-eval-pairs", "400", *extra])


def test_micro_run_lowers_loss_and_raises_accuracy(tok, tmp_path):
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    before = train_rm.main(micro_args(init, tmp_path / "before", "--steps", "0"))
    after = train_rm.main(micro_args(init, tmp_path / "after", "--steps", "25"))
    log = [json.loads(line) for line in open(tmp_path / "after" / "metrics.jsonl")]
    losses = [row["loss"] for row in log]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert log[-1]["val_accuracy"] == after["val_accuracy"]  # the held-out evaluation, logged at the last step
    assert after["val_accuracy"] > before["val_accuracy"] + 0.15, (before["val_accuracy"], after["val_accuracy"])
    assert after["val_safe_over_unsafe"] > 0.9
    # the evaluation files: accuracy per category, attack and strength; histograms of every response style
    result = json.load(open(tmp_path / "after" / "eval.json"))
    assert set(result["accuracy_by_category"]) == {"illicit", "hateful", "advice", "benign", "borderline"}
    # held out: the validation split, every training attack vector; the test split's held-out one is evaluate.py's
    assert set(result["accuracy_by_attack"]) == set(result["safe_over_unsafe_by_attack"]) == set(world.TRAIN_ATTACKS)
    assert set(result["accuracy_by_strength"]) <= set(judge.STRENGTHS)
    hist = json.load(open(tmp_path / "after" / "histograms.json"))
    assert {"harmful/safe", "harmful/unsafe"} <= set(hist["counts"])
    n_harmful = sum(ex.kind == "harmful" for ex in world.build_world(0).validation)
    assert sum(hist["counts"]["harmful/unsafe"]) == n_harmful == len(hist["scores"]["harmful/unsafe"])
    # the saved RM loads through the scoring interface and gives the numbers the run measured
    reward_model, rm_tok = reward.load_reward_model(str(tmp_path / "after" / "model.pt"))
    assert reward_model.config.head == "scalar"
    held_out = judge.labelled_pairs(world.build_world(0), "safety", 0.0, 0, "validation", 3)
    held_out = held_out[::math.ceil(len(held_out) / 400)]  # --max-eval-pairs 400
    assert train_rm.pair_accuracy(reward_model, rm_tok, held_out)["accuracy"] == result["accuracy"]
    assert result["n_pairs"] == len(held_out)


def test_cpu_bf16_run_learns_like_float32(tok, tmp_path):
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    results = {}
    for name, flags in (("fp32", ()), ("bf16", ("--cpu-bf16",))):
        results[name] = train_rm.main(micro_args(init, tmp_path / name, "--steps", "25", *flags))
        losses = [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, name
    assert json.load(open(tmp_path / "bf16" / "config.json"))["cpu_bf16"] is True
    # bf16's rounding changes the weights a little, not what the RM learnt
    assert abs(results["bf16"]["val_accuracy"] - results["fp32"]["val_accuracy"]) < 0.1, results


def fruit_pairs(path):
    rows = [{"prompt": f"Is {x} a fruit?", "chosen": f"Yes, {x} is a fruit.", "rejected": "No. I can't say."}
            for x in ("apple", "pear", "plum", "fig", "lime", "kiwi", "mango", "grape", "lemon", "peach")] * 6
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_head_lr_leaves_the_trunk_at_lr_and_safety_pairs_are_checked(tok, tmp_path):
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    pairs = fruit_pairs(tmp_path / "prefs.jsonl")
    kinds = tmp_path / "kinds.jsonl"  # the same pairs, tagged with the constructed pairs' two kinds
    kinds.write_text("".join(json.dumps(dict(json.loads(line), category=("harmful", "borderline")[i % 2])) + "\n"
                             for i, line in enumerate(open(pairs))))
    args = ["--data", pairs, "--safety-eval-data", str(kinds), "--steps", "3", "--lr", "1e-9", "--head-lr", "1e-2"]
    result = train_rm.main(micro_args(init, tmp_path / "head", *args))
    before = torch.load(init, weights_only=False)["model"]
    after = torch.load(tmp_path / "head" / "model.pt", weights_only=False)["model"]
    trunk = "layers.0.attention.wq.weight"
    assert (after[trunk] - before[trunk]).abs().max() < 1e-6                    # the trunk at --lr barely moves
    assert result["val_n_safety_pairs"] == 60 and 0 <= result["val_safety_pairs_accuracy"] <= 1
    by_kind = json.load(open(tmp_path / "head" / "eval.json"))["safety_pairs_accuracy_by_kind"]
    assert set(by_kind) == {"harmful", "borderline"}                           # 30 pairs of each kind
    assert result["val_safety_pairs_accuracy"] == pytest.approx((by_kind["harmful"] + by_kind["borderline"]) / 2)
    logged = [json.loads(line) for line in open(tmp_path / "head" / "metrics.jsonl")]
    assert [r["safety_pairs_accuracy_by_kind"] for r in logged if "val_accuracy" in r] == [by_kind]  # in the log too
    with pytest.raises(runtime.UserError, match=r"rm \(safety\) did not move enough: accuracy .* of kind "
                                                r"(harmful|borderline) \(all 60: "):
        train_rm.main(micro_args(init, tmp_path / "check", *args, "--min-safety-pairs-accuracy", "1.01"))
    assert (tmp_path / "check" / "model.pt").exists()                          # saved before the check failed


def test_resume_continues_to_the_same_weights(tok, tmp_path, monkeypatch):
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    args = ["--steps", "6", "--save-every", "3", "--data", fruit_pairs(tmp_path / "prefs.jsonl")]
    train_rm.main(micro_args(init, tmp_path / "straight", *args))

    calls = {"n": 0}
    real_loss = train_rm.ranking_loss

    def crashing_loss(*a):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_loss(*a)

    monkeypatch.setattr(train_rm, "ranking_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        train_rm.main(micro_args(init, tmp_path / "resumed", *args))
    monkeypatch.setattr(train_rm, "ranking_loss", real_loss)
    assert torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["step"] == 3
    result = train_rm.main(micro_args(init, tmp_path / "resumed", *args, "--resume"))
    assert result["step"] == 6
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["model"]
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["model"]
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)


def test_trains_on_a_generic_preference_file(tok, tmp_path):
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    path = fruit_pairs(tmp_path / "prefs.jsonl")
    result = train_rm.main(micro_args(init, tmp_path / "file", "--data", path, "--steps", "15"))
    assert result["val_n_pairs"] == 3 and result["val_accuracy"] == 1.0  # every 20th pair held out
    assert not (tmp_path / "file" / "histograms.json").exists()  # style histograms need the world's responses


def test_a_signal_saves_the_step_reached_and_resume_loses_nothing(tok, tmp_path, monkeypatch, signal_on_call):
    """SIGTERM mid-step: the step finishes, its checkpoint is saved (no --save-every boundary needed), the run exits
    with 128 + 15, and --resume ends with the uninterrupted run's weights and one log row per step."""
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    args = ["--steps", "6", "--save-every", "100", "--data", fruit_pairs(tmp_path / "prefs.jsonl")]
    train_rm.main(micro_args(init, tmp_path / "straight", *args))
    # during step 4 (one micro-batch per step)
    real_loss = signal_on_call(train_rm, "ranking_loss", 4, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        train_rm.main(micro_args(init, tmp_path / "stopped", *args))
    monkeypatch.setattr(train_rm, "ranking_loss", real_loss)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "stopped" / "model.pt", weights_only=False)["step"] == 4
    assert train_rm.main(micro_args(init, tmp_path / "stopped", *args, "--resume"))["step"] == 6
    assert [json.loads(line)["step"] for line in open(tmp_path / "stopped" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)
    resumed = torch.load(tmp_path / "stopped" / "model.pt", weights_only=False)
    assert resumed["stage"] == "rm" and resumed["objective"] == "safety"
    for name in straight["model"]:
        torch.testing.assert_close(resumed["model"][name], straight["model"][name], atol=1e-6, rtol=0)


def test_bad_input_writes_nothing_and_a_run_is_never_replaced_by_mistake(tok, tmp_path):
    init, _ = micro_checkpoint(tmp_path / "init.pt", tok)
    out, fruit = tmp_path / "run", fruit_pairs(tmp_path / "prefs.jsonl")
    with pytest.raises(FileNotFoundError):
        train_rm.main(micro_args(init, out, "--data", str(tmp_path / "missing.jsonl")))
    assert not out.exists()  # every input is read before the run folder is made
    train_rm.main(micro_args(init, out, "--data", fruit, "--steps", "2"))
    with pytest.raises(runtime.UserError, match="already holds a run"):
        train_rm.main(micro_args(init, out, "--data", fruit, "--steps", "2"))
    with pytest.raises(runtime.UserError, match="not --objective helpfulness"):
        train_rm.main(micro_args(init, out, "--data", fruit, "--steps", "4", "--resume", "--objective", "helpfulness"))
    train_rm.main(micro_args(init, out, "--data", fruit, "--steps", "3", "--overwrite"))
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]  # the old log is gone


@pytest.mark.parametrize("flags", [["--steps", "-5"], ["--batch-size", "0"], ["--lr", "nan"], ["--mix-fraction", "1"],
                                   ["--label-noise", "0.5"], ["--styles-per-prompt", "1"],
                                   ["--eval-data", "held_out.jsonl"], ["--data", "world", "more.jsonl"]])
def test_flag_errors_are_one_line_and_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        micro_args("init.pt", "out", *flags)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_init_and_out_are_required(capsys):
    for argv in (["--objective", "safety", "--out", "out"], ["--objective", "safety", "--init", "sft.pt"]):
        with pytest.raises(SystemExit) as e:
            train_rm.get_args(argv)
        assert e.value.code == 2


def test_world_seed_fixes_the_pairs_while_seed_moves_the_rest():
    def pairs(*flags):
        args = train_rm.get_args(["--objective", "safety", "--init", "x", "--out", "y", "--max-train-pairs", "40",
                                  *flags])
        train, held_out, _ = train_rm.load_preference_data(args, world.build_world(train_rm.data_seed(args)))
        return [(p["messages"], p["chosen"], p["rejected"]) for p in train + held_out]

    # an ensemble member (--seed 1 --world-seed 0) learns the same pairs as the seed-0 model; --seed 1 alone
    # builds world 1, whose pairs differ
    assert pairs("--seed", "1", "--world-seed", "0") == pairs("--seed", "0")
    assert pairs("--seed", "1") != pairs("--seed", "0")
