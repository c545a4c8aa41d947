"""train_sft.py end to end on a micro config: base pre-training then SFT, the loss falls, --resume is exact (after a
crash or a Ctrl-C), held-out loss and samples on the validation split, --safety-share, the command line and the run
folder's rules."""
import json
import os
import signal

import pytest
import torch

import data
import loaders
import model as model_lib
import runtime
import train_sft
import world
from model import load_checkpoint

# A micro model and a small world tokenizer: seconds on two CPU cores.
MICRO = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1", "--max-seq-len", "128",
         "--batch-size", "8", "--vocab-size", "512", "--device", "cpu"]


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base"))
    result = train_sft.main(train_sft.get_args(["--stage", "base", "--out", out, "--steps", "80", "--lr", "1e-2",
                                                "--warmup", "5", "--eval-every", "40", *MICRO]))
    return out, result


def test_base_training_lowers_the_loss(base):
    out, result = base
    log = read_metrics(out)
    first = sum(r["loss"] for r in log[:3]) / 3
    assert result["step"] == 80 and len(log) == 80
    assert result["loss"] < 0.6 * first  # from ~log(512) = 6.2 towards the corpus entropy
    evals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["stage"] == "base" and ckpt["step"] == 80
    assert json.load(open(os.path.join(out, "config.json")))["stage"] == "base"


def sft_args(base_out, out, steps, *extra):
    return train_sft.get_args(["--stage", "sft", "--init", os.path.join(base_out, "model.pt"), "--out", out,
                               "--steps", str(steps), "--lr", "2e-3", "--warmup", "2", "--eval-every", "100",
                               "--save-every", "4", *MICRO, *extra])


def test_chunked_loss_trains_as_the_full_loss(base, tmp_path):
    # --chunked-loss computes the same loss and gradient in another order: the runs agree up to rounding
    full, chunked = str(tmp_path / "full"), str(tmp_path / "chunked")
    train_sft.main(sft_args(base[0], full, 6, "--eval-every", "3"))
    train_sft.main(sft_args(base[0], chunked, 6, "--eval-every", "3", "--chunked-loss"))
    rows = list(zip(read_metrics(full), read_metrics(chunked), strict=True))
    assert all(a.keys() == b.keys() for a, b in rows) and sum("val_loss" in a for a, _ in rows) == 2
    for key in ("loss", "val_loss"):
        assert [b[key] for a, b in rows if key in a] == pytest.approx([a[key] for a, b in rows if key in a], rel=1e-4)


def test_sft_lowers_the_answer_loss(base, tmp_path):
    result = train_sft.main(sft_args(base[0], str(tmp_path), 40))
    log = read_metrics(str(tmp_path))
    first, last = [sum(r["loss"] for r in rows) / len(rows) for rows in (log[:3], log[-10:])]
    assert result["step"] == 40 and last < 0.8 * first  # answer tokens only; batches of 8 are noisy, so window means
    assert load_checkpoint(str(tmp_path / "model.pt"))["stage"] == "sft"


def test_min_val_drop_checks_the_validation_loss_fell_on_a_file(base, tmp_path):
    dialogs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(d) + "\n" for d in dialogs[:32]))
    val.write_text("".join(json.dumps(d) + "\n" for d in dialogs[32:]))
    files = ["--data", str(train), "--val-data", str(val)]
    result = train_sft.main(sft_args(base[0], str(tmp_path / "moved"), 12, *files, "--min-val-drop", "0.1"))
    assert result["val_loss"] < result["start_val_loss"] - 0.1
    with pytest.raises(runtime.UserError, match="sft did not move: validation loss"):
        train_sft.main(sft_args(base[0], str(tmp_path / "still"), 2, *files, "--lr", "1e-9", "--min-val-drop", "0.1"))
    assert load_checkpoint(str(tmp_path / "still" / "model.pt"))["step"] == 2   # saved before the check failed


def test_safety_share_keeps_that_share_of_the_safety_demonstrations(base, monkeypatch):
    w = world.build_world(0)
    harmful = [ex.messages for ex in w.sft_examples if ex.kind == "harmful"]
    _, tok, _ = loaders.load_policy(os.path.join(base[0], "model.pt"), "cpu")
    encoded = []
    monkeypatch.setattr(data, "encode_sft", lambda tok, dialogs, max_len: encoded.append(dialogs) or [])
    kept = {}
    for share in (0.0, 0.25, 0.5, 1.0):
        train_sft.load_text_data(sft_args(base[0], "unused", 1, "--safety-share", str(share)), tok)
        train, val = encoded[-2:]
        kept[share] = [d for d in train if d[:-1] in harmful]
        assert len(kept[share]) == round(share * len(harmful))                   # that share of the safety demos
        assert len(train) - len(kept[share]) == len(w.sft) - len(harmful)        # and every other demonstration
        # held out: validation prompts with their gold answers, whatever the share
        assert [d[:-1] for d in val] == [ex.messages for ex in w.validation[::2]]
        assert all(d[-1]["role"] == "assistant" and d[-1]["content"] for d in val)
    assert kept[1.0] == [d for d in w.sft if d[:-1] in harmful] and len(harmful) > 10
    assert all(d in kept[0.5] for d in kept[0.25])                               # a smaller share: a subset


def test_sft_samples_validation_prompts_and_records_the_share(base, tmp_path, monkeypatch):
    asked, real_respond = [], model_lib.respond
    monkeypatch.setattr(model_lib, "respond", lambda m, tok, prompts, *a, **k: asked.append(prompts) or
                        real_respond(m, tok, prompts, *a, **k))
    train_sft.main(sft_args(base[0], str(tmp_path), 2, "--safety-share", "0.5"))
    validation = [ex.messages for ex in world.build_world(0).validation]
    assert len(asked) == 1 and len(asked[0]) == 4 and all(p in validation for p in asked[0])
    assert json.load(open(tmp_path / "config.json"))["safety_share"] == 0.5


def test_resume_ends_with_the_same_weights(base, tmp_path, monkeypatch):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train_sft.main(sft_args(base[0], straight, 8))

    calls, real_loss = [], model_lib.next_token_loss

    def crash_at_step_6(*a, **k):  # the process dies mid-run, after the step-4 checkpoint was written
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(model_lib, "next_token_loss", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(sft_args(base[0], broken, 8))
    assert load_checkpoint(os.path.join(broken, "model.pt"))["step"] == 4
    assert [r["step"] for r in read_metrics(broken)] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(model_lib, "next_token_loss", real_loss)
    train_sft.main(sft_args(base[0], broken, 8, "--resume"))

    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, broken))
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    # the row of step 5, logged after the checkpoint, was dropped and logged again: no step twice, same losses
    assert read_metrics(broken) == read_metrics(straight)


def test_ctrl_c_saves_the_step_reached_and_resume_continues(base, tmp_path, monkeypatch, signal_on_call):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train_sft.main(sft_args(base[0], straight, 6))
    # SIGINT arrives while step 3 computes: the step finishes, then the run stops
    real_loss = signal_on_call(model_lib, "next_token_loss", 3)
    with pytest.raises(SystemExit) as stop:
        train_sft.main(sft_args(base[0], stopped, 6))
    assert stop.value.code == 128 + signal.SIGINT
    assert load_checkpoint(os.path.join(stopped, "model.pt"))["step"] == 3      # not a --save-every step
    monkeypatch.setattr(model_lib, "next_token_loss", real_loss)
    train_sft.main(sft_args(base[0], stopped, 6, "--resume"))
    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, stopped))
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert read_metrics(stopped) == read_metrics(straight)


def test_a_folder_holding_a_run_needs_resume_or_overwrite(base, tmp_path):
    out = str(tmp_path / "run")
    train_sft.main(sft_args(base[0], out, 2))
    with pytest.raises(runtime.UserError, match="already holds a run"):
        train_sft.main(sft_args(base[0], out, 3))
    assert load_checkpoint(os.path.join(out, "model.pt"))["step"] == 2            # left as it was
    result = train_sft.main(sft_args(base[0], out, 3, "--overwrite"))
    assert result["step"] == 3 and [r["step"] for r in read_metrics(out)] == [1, 2, 3]   # a fresh log


def test_sft_without_init_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_sft.get_args(["--stage", "sft", "--out", str(tmp_path), *MICRO])
    assert stop.value.code == 2 and "--stage sft needs --init" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--stage", "base", "--out", "OUT", "--init", "x.pt"], "--stage base trains a fresh model"),
    (["--stage", "base", "--out", "OUT", "--steps", "-5"], "--steps: must be > 0, got -5"),
    (["--stage", "base", "--out", "OUT", "--lr", "0"], "--lr: must be > 0.0, got 0"),
    (["--stage", "base"], "required: --out"),
    (["--stage", "base", "--out", "OUT", "--safety-share", "0.5"], "--safety-share is for --stage sft on --data world"),
    (["--stage", "sft", "--init", "x.pt", "--out", "OUT", "--data", "d.jsonl", "--safety-share", "0"],
     "--safety-share is for --stage sft on --data world"),
    (["--stage", "sft", "--init", "x.pt", "--out", "OUT", "--safety-share", "1.5"], "--safety-share must be 0 to 1"),
    (["--stage", "sft", "--init", "x.pt", "--out", "OUT", "--safety-share", "-0.1"],
     "--safety-share: must be >= 0.0, got -0.1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        train_sft.get_args([str(tmp_path) if a == "OUT" else a for a in argv] + MICRO)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_batch_that_does_not_split_is_a_user_error_and_writes_nothing(base, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(runtime.UserError, match="--batch-size 8 does not split into --grad-accum 3"):
        train_sft.main(sft_args(base[0], str(out), 2, "--grad-accum", "3"))
    assert not out.exists()
