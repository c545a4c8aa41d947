"""train_sft.py end to end on a micro config: base pre-training then SFT, the loss falls, --resume is exact."""
import json
import os

import pytest
import torch

import train_sft
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


def test_sft_lowers_the_answer_loss(base, tmp_path):
    result = train_sft.main(sft_args(base[0], str(tmp_path), 40))
    log = read_metrics(str(tmp_path))
    first, last = [sum(r["loss"] for r in rows) / len(rows) for rows in (log[:3], log[-10:])]
    assert result["step"] == 40 and last < 0.8 * first  # answer tokens only; batches of 8 are noisy, so window means
    assert load_checkpoint(str(tmp_path / "model.pt"))["stage"] == "sft"


def test_resume_ends_with_the_same_weights(base, tmp_path, monkeypatch):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train_sft.main(sft_args(base[0], straight, 8))

    calls, real_batch_loss = [], train_sft.batch_loss

    def crash_at_step_6(*a, **k):  # the process dies mid-run, after the step-4 checkpoint was written
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_batch_loss(*a, **k)

    monkeypatch.setattr(train_sft, "batch_loss", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(sft_args(base[0], broken, 8))
    assert load_checkpoint(os.path.join(broken, "model.pt"))["step"] == 4
    monkeypatch.setattr(train_sft, "batch_loss", real_batch_loss)
    train_sft.main(sft_args(base[0], broken, 8, "--resume"))

    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, broken))
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in read_metrics(broken)]
    assert steps[-4:] == [5, 6, 7, 8]


def test_sft_without_init_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--init"):
        train_sft.main(train_sft.get_args(["--stage", "sft", "--out", str(tmp_path), *MICRO]))
