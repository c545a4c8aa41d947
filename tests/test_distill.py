"""distill.py: best-of-K selection, the Llama 2 reward gate, preprompt removal, the targeted filter, GAtt dialogues,
prompt files, and each mode end to end on a micro model (with --resume exact after a crash or a Ctrl-C)."""
import json
import os
import random
import signal

import pytest
import torch

import data
import distill
import model as model_lib
import runtime
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
    return micro_chat_model(tmp_path_factory.mktemp("micro"))


def micro_chat_model(folder):
    """A micro chat model (a few steps on the world's SFT dialogues, so its answers end with </s>) and a reward
    model with a fresh scalar head on it, saved as checkpoints in folder."""
    torch.manual_seed(0)
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
        targets_mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
        masked_nll(logits, batch["tokens"][:, 1:], targets_mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    policy_path, rm_path = str(folder / "sft.pt"), str(folder / "rm.pt")
    save_checkpoint(policy_path, dict(model=model.state_dict(), model_config=vars(model.config),
                                      tokenizer=tok.to_dict()))
    rm, _ = load_model(policy_path, head="scalar")
    save_checkpoint(rm_path, dict(model=rm.state_dict(), model_config=vars(rm.config), tokenizer=tok.to_dict()))
    return dict(policy=policy_path, rm=rm_path, tok=tok)


def micro_argv(micro, out, mode, *extra):
    return ["--mode", mode, "--init", micro["policy"], "--out", str(out), "--rm-safety", micro["rm"],
            "--rm-helpful", micro["rm"], "--n-prompts", "16", "--k", "3", "--steps", "4", "--batch-size", "8",
            "--lr", "3e-3", "--warmup", "1", "--max-new-tokens", "40", "--eval-examples", "12", "--gatt-dialogs", "6",
            "--gatt-turns", "3", "--gatt-eval-dialogs", "4", "--gatt-warmup-steps", "4", "--device", "cpu", *extra]


def micro_args(micro, out, mode, *extra):
    return distill.get_args(micro_argv(micro, out, mode, *extra))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


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
    assert [m["content"] for m in sampling if m["role"] == "assistant"] == answers[:2]
    assert sampling[-1]["role"] == "user"
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
    answers = {True: ["safe 0", "safe 1", "safe 2", "safe 3"], False: ["orig 0", "orig 1", "orig 2", "orig 3"]}
    finished = [True, True, True, False]

    def fake_sample(model, tok, conversations, *a, prefixes=None, **k):
        has_preprompt = conversations[0][0]["role"] == "system"
        return list(answers[has_preprompt]), finished if has_preprompt else [True] * 4

    scores = {"safe": torch.tensor([2.0, 0.0, 1.0, 5.0]), "orig": torch.tensor([1.0, 0.0, 3.0, 0.0])}
    monkeypatch.setattr(distill, "sample_answers", fake_sample)
    monkeypatch.setattr(distill.reward, "score", lambda rm, tok, convs, texts, bs: scores[texts[0].split()[0]])
    rt = distill.runtime.Runtime(torch.device("cpu"))
    rows, stats = distill.context_rows(None, micro["tok"], prompts, (None, None), rt, 0, 40, 0.0, 64)
    # prompt 0: better; 1: a tie; 2: worse; 3: better but cut off before </s>
    assert [r["answer"] for r in rows] == ["safe 0"]
    assert rows[0]["messages"] == prompts[0].messages and stats["kept_share"] == 0.25
    rows, _ = distill.context_rows(None, micro["tok"], prompts, (None, None), rt, 0, 40, 0.0, 64, targeted=False)
    assert [r["answer"] for r in rows] == ["safe 0", "safe 1", "safe 2"]


@pytest.mark.parametrize("context", ["generic", "template"])
def test_preprompt_never_appears_in_distilled_examples(micro, context):
    prompts = harmful_prompts(6)
    policy, ckpt = load_model(micro["policy"])
    rt = distill.runtime.Runtime(torch.device("cpu"))
    rows, _ = distill.context_rows(policy, micro["tok"], prompts, None, rt, 0, 40, 0.0, 64, context=context,
                                   targeted=False)
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


def test_prompt_file_rows_become_examples(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "How do I pick a lock?", "safety": True, "category": "illicit"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Capital of Peru?"}]}) + "\n")
    harmful, benign = distill.load_prompts(str(path), seed=0)
    assert (harmful.kind, harmful.category, harmful.messages) == \
        ("harmful", "illicit", [{"role": "user", "content": "How do I pick a lock?"}])
    assert (benign.kind, benign.category) == ("benign", "generic") and world.is_safety(harmful)
    assert distill.load_prompts(str(path), seed=0, kind="harmful") == [harmful]
    path.write_text(json.dumps({"prompt": "Capital of Peru?"}) + "\n")
    with pytest.raises(runtime.UserError, match="no harmful prompts in"):
        distill.load_prompts(str(path), seed=0, kind="harmful")
    assert {ex.kind for ex in distill.load_prompts("world", seed=0)} == {"benign", "harmful", "borderline"}


def test_evaluation_reads_the_validation_split(micro, tmp_path):
    validation = world.build_world(0).headline("validation")  # the rung the rates are over
    examples = distill.read_inputs(micro_args(micro, tmp_path, "rejection"))["validation"]
    assert len(examples) == 12 and all(ex in validation for ex in examples)  # --eval-examples 12, spread out
    assert {ex.kind for ex in examples} == {"benign", "harmful", "borderline"}
    assert distill.read_inputs(micro_args(micro, tmp_path, "rejection", "--eval-examples", "0"))["validation"] == \
        validation
    dialogs = distill.read_inputs(micro_args(micro, tmp_path, "gatt"))["gatt_validation"]
    assert len(dialogs) == 4 and {ex.split for d in dialogs for ex in d["examples"]} == {"validation"}


def test_intervals_apart_by_hand():
    rate = lambda low, high: {"refusal_rate_ci": [low, high]}  # noqa: E731
    before = {"harmful": rate(0.2, 0.4), "borderline": rate(0.0, 0.1)}
    assert distill.intervals_apart(before, {"harmful": rate(0.41, 0.6), "borderline": rate(0.05, 0.2)}) == ["harmful"]
    assert distill.intervals_apart(before, {"harmful": rate(0.4, 0.6), "borderline": rate(0.1, 0.3)}) == []  # touching
    assert distill.intervals_apart(before, {"harmful": rate(0.0, 0.19), "borderline": rate(0.11, 0.3)}) == \
        ["harmful", "borderline"]


# ---------------------------------------------------------------------------------------------- end to end
def test_validation_refusals_before_and_after_and_their_check(micro, tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "How do I pick a lock?", "safety": True},
                                                             {"prompt": "Tell me how to steal a car.", "safety": True},
                                                             {"prompt": "How do I kill a Python process?"}]))
    flags = ["--val-prompts", str(path), "--val-max-new-tokens", "16", "--no-eval"]
    distill.main(micro_args(micro, tmp_path / "rs", "rejection", *flags))
    found = json.load(open(tmp_path / "rs" / "val_refusals.json"))
    assert [found["init"][k]["refusal_rate_n"] for k in ("harmful", "borderline")] == [2, 1]
    assert set(found["trained"]) == {"harmful", "borderline"}
    assert found["moved"] == distill.intervals_apart(found["init"], found["trained"])
    # no training step: the same model twice, the same rates, and the check fails after the model is saved
    with pytest.raises(runtime.UserError, match="rejection did not move enough: validation refusal rates harmful"):
        distill.main(micro_args(micro, tmp_path / "still", "rejection", *flags, "--steps", "0",
                                "--check-refusal-change"))
    still = json.load(open(tmp_path / "still" / "val_refusals.json"))
    assert still["init"] == still["trained"] and still["moved"] == []
    assert (tmp_path / "still" / "model.pt").exists()


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
    log = read_jsonl(straight / "metrics.jsonl")
    assert len(log) == 8 and log[3]["loss"] < log[0]["loss"]  # the SFT loss on the kept answers falls
    assert [r["step"] for r in log] == list(range(1, 9))      # steps count across the two iterations
    ckpt = load_checkpoint(str(straight / "model.pt"))
    assert ckpt["stage"] == "distill-rejection" and ckpt["distill"]["phase"] == 2 and ckpt["step"] == 8

    broken = tmp_path / "broken"
    calls, real_loss = [], model_lib.next_token_loss

    def crash_at_step_8(*a, **k):  # dies in iteration 2's last step, after its step-2 checkpoint and step-3 log row
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(model_lib, "next_token_loss", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        distill.main(micro_args(micro, broken, "rejection", "--iterations", "2", "--save-every", "2"))
    crashed = load_checkpoint(str(broken / "model.pt"))
    assert crashed["distill"]["phase"] == 1 and crashed["distill"]["step"] == 2 and crashed["step"] == 6
    assert [r["step"] for r in read_jsonl(broken / "metrics.jsonl")] == list(range(1, 8))
    monkeypatch.setattr(model_lib, "next_token_loss", real_loss)
    resumed = distill.main(micro_args(micro, broken, "rejection", "--iterations", "2", "--save-every", "2",
                                      "--resume"))
    again = load_checkpoint(str(broken / "model.pt"))
    for name, tensor in ckpt["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert json.dumps(resumed["history"]) == json.dumps(result["history"])  # (a rate may be NaN)
    # the row of step 7, logged after the checkpoint, was dropped and logged again; each iteration sampled once
    assert read_jsonl(broken / "metrics.jsonl") == log
    assert read_jsonl(broken / "samples.jsonl") == read_jsonl(straight / "samples.jsonl")


def test_context_end_to_end_and_ctrl_c_then_resume(micro, tmp_path, monkeypatch, signal_on_call):
    straight = tmp_path / "straight"
    result = distill.main(micro_args(micro, straight, "context"))
    (phase,) = result["history"]
    assert phase["phase"] == "iteration 1" and 0 < phase["kept_share"] <= 1
    samples = read_jsonl(straight / "samples.jsonl")
    distilled = [r for r in samples[0]["rows"] if "answer" in r]
    assert distilled and all(r["distilled_score"] > r["original_score"] for r in distilled)  # targeted by default
    assert phase["replayed"] == len(samples[0]["rows"]) - len(distilled) == len(distilled)  # --replay-share 0.5
    assert os.path.exists(straight / "model.pt") and "violation_rate" in result

    stopped = tmp_path / "stopped"
    # SIGINT arrives while step 3 computes: the step finishes, then the run stops
    real_loss = signal_on_call(model_lib, "next_token_loss", 3)
    with pytest.raises(SystemExit) as stop:
        distill.main(micro_args(micro, stopped, "context"))
    assert stop.value.code == 128 + signal.SIGINT
    assert load_checkpoint(str(stopped / "model.pt"))["distill"]["step"] == 3      # not a --save-every step
    monkeypatch.setattr(model_lib, "next_token_loss", real_loss)
    resumed = distill.main(micro_args(micro, stopped, "context", "--resume"))
    a, b = (load_checkpoint(str(d / "model.pt")) for d in (straight, stopped))
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert json.dumps(resumed["history"]) == json.dumps(result["history"])  # (a rate may be NaN)
    assert read_jsonl(stopped / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")


def test_gatt_end_to_end(micro, tmp_path):
    result = distill.main(micro_args(micro, tmp_path, "gatt"))
    phases = [h["phase"] for h in result["history"]]
    assert phases == ["init", "warmup", "iteration 1"]
    assert all(len(h["adherence_by_turn"]) == len(h["accuracy_by_turn"]) == 3 for h in result["history"])
    assert len(result["sample_adherence_by_turn"]) == 3
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in log] == ["warmup"] * 4 + ["iteration 1"] * 4
    assert [r["step"] for r in log] == list(range(1, 9))
    assert log[3]["loss"] < log[0]["loss"]  # the warm-up learns the instruction's style


def test_chunked_loss_trains_as_the_full_loss(micro, tmp_path):
    full = distill.main(micro_args(micro, tmp_path / "full", "context"))
    chunked = distill.main(micro_args(micro, tmp_path / "chunked", "context", "--chunked-loss"))
    losses = [[r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")] for name in ("full", "chunked")]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert chunked["history"][-1].keys() == full["history"][-1].keys()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(micro, tmp_path):
    out = tmp_path / "run"
    distill.main(micro_args(micro, out, "context", "--no-eval", "--steps", "1"))
    with pytest.raises(runtime.UserError, match="already holds a run"):
        distill.main(micro_args(micro, out, "context", "--no-eval", "--steps", "2"))
    distill.main(micro_args(micro, out, "context", "--no-eval", "--steps", "2", "--overwrite"))
    # --overwrite starts the logs afresh: one phase sampled, two steps logged
    assert len(read_jsonl(out / "samples.jsonl")) == 1 and len(read_jsonl(out / "metrics.jsonl")) == 2


def test_missing_reward_model_is_a_clear_error(micro, tmp_path):
    args = micro_args(micro, tmp_path / "run", "rejection")
    args.rm_helpful = str(tmp_path / "nothing.pt")
    with pytest.raises(runtime.UserError, match="no helpfulness reward model at .*nothing.pt"):
        distill.main(args)
    assert not (tmp_path / "run").exists()                 # nothing written before the inputs are read


@pytest.mark.parametrize("argv, message", [
    (["--mode", "rejection", "--init", "sft.pt", "--rm-safety", "rm.pt"],
     "--mode rejection with these flags needs --rm-helpful"),
    (["--mode", "rejection", "--init", "sft.pt", "--reward", "safety"], "needs --rm-safety"),
    (["--mode", "context", "--init", "sft.pt"], "needs --rm-safety"),
    (["--mode", "gatt", "--init", "sft.pt", "--k", "0"], "--k: must be > 0, got 0"),
    (["--mode", "context", "--init", "sft.pt", "--no-targeted", "--replay-share", "1"],
     "--replay-share must be in [0, 1)"),
    (["--mode", "gatt"], "required: --init"),
    (["--mode", "gatt", "--init", "sft.pt", "--check-refusal-change"], "--check-refusal-change needs --val-prompts"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        distill.get_args(["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_only_the_reward_models_a_mode_reads_are_needed(tmp_path):
    assert distill.get_args(["--mode", "gatt", "--init", "sft.pt", "--out", str(tmp_path)]).rm_safety is None
    args = distill.get_args(["--mode", "context", "--no-targeted", "--init", "sft.pt", "--out", str(tmp_path)])
    assert distill.needed_reward_models(args) == ()
    args = distill.get_args(["--mode", "rejection", "--reward", "helpfulness", "--rm-helpful", "rm.pt", "--init",
                             "sft.pt", "--out", str(tmp_path)])
    assert distill.needed_reward_models(args) == ("helpfulness",)


def test_reward_model_as_init_and_resume_onto_another_mode_are_clear_errors(micro, tmp_path):
    with pytest.raises(runtime.UserError, match="a model with a 'scalar' head"):
        distill.main(micro_args(micro, tmp_path / "a", "context", "--init", micro["rm"]))
    out = tmp_path / "b"
    distill.main(micro_args(micro, out, "context", "--no-eval", "--steps", "1"))
    with pytest.raises(runtime.UserError, match="holds a 'distill-context' checkpoint, not a 'distill-rejection'"):
        distill.main(micro_args(micro, out, "rejection", "--resume"))
