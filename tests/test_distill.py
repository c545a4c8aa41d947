"""distill.py: best-of-K selection, the Llama 2 reward gate, preprompt removal, the targeted filter, GAtt dialogues,
and each mode end to end on a micro model (with --resume exact after a crash)."""
import json
import os
import random

import pytest
import torch

import data
import distill
import tokenizer
import world
from model import ModelConfig, Transformer, load_checkpoint, load_model, masked_nll, save_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these runs are small: one thread avoids oversubscribing a shared CPU, and keeps sampling reproducible
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro chat model (a few steps on the world's SFT dialogues, so its answers end with </s>) and a reward
    model with a fresh scalar head on it, saved as checkpoints."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("micro")
    tok = tokenizer.world_tokenizer(512)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    max_seq_len=256))
    rows = data.encode_sft(tok, world.build_world(0).sft, 256)
    random.Random(0).shuffle(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(100):
        chunk = rows[step * 16 % len(rows):][:16]
        batch = data.collate([r[0] for r in chunk], tok.pad_id, [r[1] for r in chunk])
        logits = model(batch["tokens"][:, :-1], batch["attention_mask"][:, :-1])
        masked_nll(logits, batch["tokens"][:, 1:], batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    policy_path, rm_path = str(folder / "sft.pt"), str(folder / "rm.pt")
    save_checkpoint(policy_path, dict(model=model.state_dict(), model_config=vars(model.config), tokenizer=tok.to_dict()))
    rm, _ = load_model(policy_path, head="scalar")
    save_checkpoint(rm_path, dict(model=rm.state_dict(), model_config=vars(rm.config), tokenizer=tok.to_dict()))
    return dict(policy=policy_path, rm=rm_path, tok=tok)


def micro_args(micro, out, mode, *extra):
    return distill.get_args(["--mode", mode, "--init", micro["policy"], "--out", str(out), "--rm-safety", micro["rm"],
                             "--rm-helpful", micro["rm"], "--n-prompts", "6", "--k", "3", "--steps", "4",
                             "--batch-size", "8", "--lr", "3e-3", "--warmup", "1", "--max-new-tokens", "40",
                             "--eval-examples", "12", "--gatt-dialogs", "6", "--gatt-turns", "3",
                             "--gatt-eval-dialogs", "4", "--gatt-warmup-steps", "4", "--device", "cpu", *extra])


# ---------------------------------------------------------------------------------------------- pure functions
def test_best_of_k_picks_the_argmax():
    rewards = torch.tensor([[0.1, 0.7, 0.3], [0.9, float("-inf"), 0.2], [float("-inf"), 0.4, 0.5]])
    index, best = distill.best_of_k(rewards)
    assert index.tolist() == [1, 0, 2] and best.tolist() == pytest.approx([0.7, 0.9, 0.5])
    random_rewards = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    index, best = distill.best_of_k(random_rewards)
    for row, i, b in zip(random_rewards.tolist(), index.tolist(), best.tolist()):
        assert row[i] == max(row) == b


def test_best_of_k_curve_by_hand():
    curve = distill.best_of_k_curve(torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]]))
    # k=1: each prompt's first sample; k=2: max (3, 0), median (2, -0.5); k=3: max (3, 5), median (2, 0)
    assert [c["max"] for c in curve] == pytest.approx([0.5, 1.5, 4.0])
    assert [c["median"] for c in curve] == pytest.approx([0.5, 0.75, 1.0])


def test_keep_best_keeps_the_best_of_every_iteration():
    pool = {"a": dict(reward=0.5, answer="old a"), "b": dict(reward=0.9, answer="old b")}
    merged = distill.keep_best(pool, {"a": dict(reward=0.7, answer="new a"), "b": dict(reward=0.2, answer="new b"),
                                      "c": dict(reward=0.1, answer="new c")})
    assert {k: v["answer"] for k, v in merged.items()} == {"a": "new a", "b": "old b", "c": "new c"}
    assert pool["a"]["answer"] == "old a"  # the earlier pool is not modified


def test_preprompt_round_trip():
    messages = [{"role": "user", "content": "How do I rob a bank?"}]
    assert distill.remove_preprompt(distill.with_preprompt(messages, "Be safe."), "Be safe.") == messages
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert distill.remove_preprompt(distill.with_preprompt(with_system, "Be safe."), "Be safe.") == with_system
    with pytest.raises(ValueError):
        distill.remove_preprompt(messages, "Be safe.")


def test_targeted_keep_by_hand():
    distilled = torch.tensor([1.0, -0.5, 2.0, 0.3])
    original = torch.tensor([0.0, 0.5, 2.0, -1.0])
    assert distill.targeted_keep(distilled, original).tolist() == [True, False, False, True]  # a tie is not kept


def test_gatt_dialogues(micro):
    tok = micro["tok"]
    users, answers = ["What is 1 plus 1?", "Capital of Peru?", "Opposite of up?"], ["AHOY 2", "AHOY LIMA", "AHOY DOWN"]
    sampling = distill.gatt_prompt("Say ahoy.", users, answers[:2], every_turn=True)
    assert [m["content"] for m in sampling if m["role"] == "user"] == [f"Say ahoy. {u}" for u in users]
    assert [m["content"] for m in sampling if m["role"] == "assistant"] == answers[:2] and sampling[-1]["role"] == "user"
    asked = distill.gatt_prompt("Say ahoy.", users, answers[:1], every_turn=False)
    assert [m["content"] for m in asked if m["role"] == "user"] == ["Say ahoy. What is 1 plus 1?", "Capital of Peru?"]
    training = distill.gatt_training_dialog("Say ahoy.", users, answers)
    user_texts = [m["content"] for m in training if m["role"] == "user"]
    assert user_texts == ["Say ahoy. What is 1 plus 1?", "Capital of Peru?", "Opposite of up?"]
    ids, loss_mask = tok.encode_dialog(training)
    assert tok.decode([t for t, m in zip(ids, loss_mask) if m]).strip() == "AHOY DOWN"  # earlier turns: loss 0
    assert len(distill.gatt_training_dialog("Say ahoy.", users, answers, turn=1)) == 4


# ---------------------------------------------------------------------------------------------- context distillation
def harmful_prompts(n):
    return [ex for ex in world.build_world(0).rl_prompts if ex.kind == "harmful"][:n]


def test_targeted_filter_keeps_exactly_the_improved_answers(micro, monkeypatch):
    prompts = harmful_prompts(4)
    args = micro_args(micro, "unused", "context")
    answers = {True: ["safe 0", "safe 1", "safe 2", "safe 3"], False: ["orig 0", "orig 1", "orig 2", "orig 3"]}
    finished = [True, True, True, False]

    def fake_sample(model, tok, conversations, *a, prefixes=None, **k):
        has_preprompt = conversations[0][0]["role"] == "system"
        return list(answers[has_preprompt]), finished if has_preprompt else [True] * 4

    scores = {"safe": torch.tensor([2.0, 0.0, 1.0, 5.0]), "orig": torch.tensor([1.0, 0.0, 3.0, 0.0])}
    monkeypatch.setattr(distill, "sample_answers", fake_sample)
    monkeypatch.setattr(distill, "score", lambda rm, tok, convs, texts, bs: scores[texts[0].split()[0]])
    rt = distill.runtime.Runtime(torch.device("cpu"))
    rows, stats = distill.context_rows(None, micro["tok"], prompts, (None, None), args, rt, None)
    # prompt 0: better; 1: a tie; 2: worse; 3: better but cut off before </s>
    assert [r["answer"] for r in rows] == ["safe 0"]
    assert rows[0]["messages"] == prompts[0].messages and stats["kept_share"] == 0.25
    args.targeted = False
    rows, _ = distill.context_rows(None, micro["tok"], prompts, (None, None), args, rt, None)
    assert [r["answer"] for r in rows] == ["safe 0", "safe 1", "safe 2"]


@pytest.mark.parametrize("context", ["generic", "template"])
def test_preprompt_never_appears_in_distilled_examples(micro, context):
    prompts = harmful_prompts(6)
    args = micro_args(micro, "unused", "context", "--context", context, "--no-targeted")
    policy, ckpt = load_model(micro["policy"])
    rt = distill.runtime.Runtime(torch.device("cpu"))
    rows, _ = distill.context_rows(policy, micro["tok"], prompts, None, args, rt, torch.Generator().manual_seed(0))
    assert rows, "no answer ended with </s>"
    preprompts = {distill.answer_template(ex.category)[0] for ex in prompts} | {distill.CONTEXTS["generic"]}
    for row in rows:
        assert row["messages"] in [ex.messages for ex in prompts]
        ids, loss_mask = micro["tok"].encode_dialog(distill.answer_dialog(row["messages"], row["answer"]), "last")
        text = micro["tok"].decode(ids)
        assert not any(p in text or p in m["content"] for p in preprompts for m in row["messages"])
        assert "<<SYS>>" not in micro["tok"].enc.decode(ids)   # no system block at all
        if context == "template":  # the answer starts with the template's opening, written by --prefill
            assert row["answer"].startswith("I can't")


# ---------------------------------------------------------------------------------------------- end to end
def test_rejection_end_to_end_and_exact_resume(micro, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    result = distill.main(micro_args(micro, straight, "rejection", "--iterations", "2", "--save-every", "2"))
    curves = json.load(open(straight / "best_of_k.json"))
    assert list(curves) == ["iteration 1", "iteration 2"]
    for curve in curves.values():
        maxes = [p["max"] for p in curve]
        assert [p["k"] for p in curve] == [1, 2, 3] and maxes == sorted(maxes)
        assert all(p["max"] >= p["median"] for p in curve) and curve[0]["max"] == curve[0]["median"]
    first, second = result["history"]
    assert second["pool"] >= first["pool"] and first["pool"] == first["kept"] > 0  # --keep-previous grows the pool
    assert 0 <= result["violation_rate"] <= 1 and result["n_prompts"] >= 12
    log = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    assert len(log) == 8 and log[3]["loss"] < log[0]["loss"]  # the SFT loss on the kept answers falls
    ckpt = load_checkpoint(str(straight / "model.pt"))
    assert ckpt["stage"] == "distill-rejection" and ckpt["distill"]["phase"] == 2

    broken = tmp_path / "broken"
    calls, real_batch_loss = [], distill.batch_loss

    def crash_at_step_7(*a, **k):  # dies in iteration 2, after its step-2 checkpoint
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_batch_loss(*a, **k)

    monkeypatch.setattr(distill, "batch_loss", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        distill.main(micro_args(micro, broken, "rejection", "--iterations", "2", "--save-every", "2"))
    assert load_checkpoint(str(broken / "model.pt"))["distill"]["step"] == 2
    monkeypatch.setattr(distill, "batch_loss", real_batch_loss)
    resumed = distill.main(micro_args(micro, broken, "rejection", "--iterations", "2", "--save-every", "2", "--resume"))
    again = load_checkpoint(str(broken / "model.pt"))
    for name, tensor in ckpt["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert resumed["history"] == result["history"]


def test_context_end_to_end(micro, tmp_path):
    result = distill.main(micro_args(micro, tmp_path, "context", "--n-prompts", "8"))
    (phase,) = result["history"]
    assert phase["phase"] == "iteration 1" and 0 < phase["kept_share"] <= 1
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    distilled = [r for r in samples[0]["rows"] if "answer" in r]
    assert distilled and all(r["distilled_score"] > r["original_score"] for r in distilled)  # targeted by default
    assert phase["replayed"] == len(samples[0]["rows"]) - len(distilled) == len(distilled)  # --replay-share 0.5
    assert os.path.exists(tmp_path / "model.pt") and "violation_rate" in result


def test_gatt_end_to_end(micro, tmp_path):
    result = distill.main(micro_args(micro, tmp_path, "gatt"))
    phases = [h["phase"] for h in result["history"]]
    assert phases == ["init", "warmup", "iteration 1"]
    assert all(len(h["adherence_by_turn"]) == len(h["accuracy_by_turn"]) == 3 for h in result["history"])
    assert len(result["sample_adherence_by_turn"]) == 3
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["phase"] for r in log] == ["warmup"] * 4 + ["iteration 1"] * 4
    assert log[3]["loss"] < log[0]["loss"]  # the warm-up learns the instruction's style


def test_missing_reward_model_is_a_clear_error(micro, tmp_path):
    args = micro_args(micro, tmp_path, "rejection")
    args.rm_helpful = str(tmp_path / "nothing.pt")
    with pytest.raises(SystemExit, match="helpfulness reward model"):
        distill.main(args)


def test_reward_model_as_init_and_resume_onto_another_mode_are_clear_errors(micro, tmp_path):
    with pytest.raises(SystemExit, match="a model with a 'scalar' head"):
        distill.main(micro_args(micro, tmp_path / "a", "context", "--init", micro["rm"]))
    out = tmp_path / "b"
    distill.main(micro_args(micro, out, "context", "--no-eval", "--steps", "1"))
    with pytest.raises(SystemExit, match="holds a 'distill-context' checkpoint; --resume of --mode rejection"):
        distill.main(micro_args(micro, out, "rejection", "--resume"))
