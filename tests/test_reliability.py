"""Reliability of the train scripts: data parallel equals one process, kill -9 then --resume is exact, checkpoints
are written atomically, and bad input gets a clear error naming the problem (and file:line) or a counted warning,
without losing the last good checkpoint. Micro configs on CPU; the multi-process runs go through torchrun."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model as model_lib
import runtime
import tokenizer
import train_sft
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--eval-every", "1000", "--device", "cpu"]


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=rtol, msg=name)


def micro_checkpoint(path, tok, vocab_size=None, seed=0, **config):
    """A freshly initialised micro model saved as train_sft.py saves one: enough to --init an SFT run."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size or tok.vocab_size,
                         **{**dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=96), **config})
    save_checkpoint(path, dict(model=Transformer(config).state_dict(), model_config=vars(config),
                               tokenizer=tok.to_dict(), step=0, stage="base"))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models gain nothing from a second thread, and on a CPU shared with other jobs two threads that wait
    on each other make a run several times slower; the subprocesses get OMP_NUM_THREADS=1 to match."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tokenizer.world_tokenizer(512, cache_dir=os.path.join(ROOT, ".cache"))


@pytest.fixture(scope="module")
def init(tok, tmp_path_factory):
    return micro_checkpoint(str(tmp_path_factory.mktemp("init") / "model.pt"), tok)


def sft_argv(init, out, steps, *extra):
    return ["--stage", "sft", "--init", init, "--out", out, "--steps", str(steps), *MICRO, *extra]


def run_script(argv, nproc=1, timeout=240):
    """Run a train script in a fresh interpreter (through torchrun when nproc > 1); fail with its output."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run(launcher + argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------- data parallel
def test_sft_two_processes_match_one_process(tok, init, tmp_path):
    """Same global batch of 8: one process, one process with 2 accumulation steps, and torchrun with 2 ranks
    (gloo) of 4 rows each. train_sft normalises by the global answer-token count, so the loss curves agree
    although each rank's rows hold different numbers of answer tokens."""
    one, accum, two = (str(tmp_path / name) for name in ("one", "accum", "two"))
    args = train_sft.get_args(sft_argv(init, one, 4))
    args.max_seq_len = 96                                  # as main() clips it to the model's context
    rows, _ = train_sft.load_text_data(args, tok)
    answer_tokens = [sum(sum(rows[i][1]) for i in data.step_indices(len(rows), 8, 0, args.seed, rank, 2))
                     for rank in (0, 1)]
    assert answer_tokens[0] != answer_tokens[1]            # so a per-rank mean would weight tokens differently
    train_sft.main(train_sft.get_args(sft_argv(init, one, 4)))
    train_sft.main(train_sft.get_args(sft_argv(init, accum, 4, "--grad-accum", "2")))
    run_script(["train_sft.py", *sft_argv(init, two, 4)], nproc=2)
    curves = {name: [r["loss"] for r in read_metrics(folder)] for name, folder in
              (("one", one), ("accum", accum), ("two", two))}
    assert len(curves["one"]) == 4 and curves["one"][-1] < curves["one"][0]
    for name in ("accum", "two"):
        # measured: equal to ~1e-7; normalising by each rank's own token count instead moves step 1 by 1.3e-4
        assert curves[name] == pytest.approx(curves["one"], rel=1e-5), name
    weights = {name: load_checkpoint(os.path.join(folder, "model.pt"))["model"] for name, folder in
               (("one", one), ("two", two))}
    assert_same_weights(weights["one"], weights["two"], atol=2e-5, rtol=1e-4)


def dpo_argv(init, out, steps, *extra):
    return ["--init", init, "--out", out, "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--warmup", "1",
            "--eval-every", "1000", "--val-pairs", "8", "--kl-prompts", "2", "--max-new-tokens", "4",
            "--device", "cpu", *extra]


def test_dpo_two_processes_match_one_process(init, tmp_path):
    """train_dpo.py's loss is a mean over the pairs of the global batch: 2 ranks of 4 pairs, and 2 accumulation
    steps of 4, give the curve of one process with 8."""
    import train_dpo
    one, accum, two = (str(tmp_path / name) for name in ("one", "accum", "two"))
    train_dpo.main(train_dpo.get_args(dpo_argv(init, one, 3)))
    train_dpo.main(train_dpo.get_args(dpo_argv(init, accum, 3, "--grad-accum", "2")))
    run_script(["train_dpo.py", *dpo_argv(init, two, 3)], nproc=2)
    curves = {name: [r["loss"] for r in read_metrics(folder)] for name, folder in
              (("one", one), ("accum", accum), ("two", two))}
    assert len(curves["one"]) == 3 and curves["one"][0] == pytest.approx(math.log(2), rel=1e-4)  # policy = reference
    assert curves["one"][-1] < curves["one"][0]
    for name in ("accum", "two"):
        assert curves[name] == pytest.approx(curves["one"], rel=1e-5), name
    weights = {name: load_checkpoint(os.path.join(folder, "model.pt"))["model"] for name, folder in
               (("one", one), ("two", two))}
    assert_same_weights(weights["one"], weights["two"], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- resume
def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(init, tmp_path):
    """SIGKILL a train_sft.py run as soon as its first checkpoint lands, --resume it, compare bit for bit."""
    steps, straight, broken = 30, str(tmp_path / "straight"), str(tmp_path / "broken")
    argv = sft_argv(init, broken, steps, "--save-every", "2")
    # one thread, as in this process: CPU kernels may split a reduction differently with more threads
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_sft.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(broken, "model.pt")
    deadline = time.time() + 180
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(ckpt)["step"]
    assert 2 <= killed_at < steps

    train_sft.main(train_sft.get_args(argv + ["--resume"]))
    train_sft.main(train_sft.get_args(sft_argv(init, straight, steps, "--save-every", "2")))
    a, b = (load_checkpoint(os.path.join(d, "model.pt")) for d in (straight, broken))
    assert a["step"] == b["step"] == steps
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])


def test_resume_of_a_finished_run_is_a_no_op(init, tmp_path):
    out = str(tmp_path / "done")
    first = train_sft.main(train_sft.get_args(sft_argv(init, out, 2)))
    again = train_sft.main(train_sft.get_args(sft_argv(init, out, 2, "--resume")))
    assert again["step"] == first["step"] == 2
    assert len(read_metrics(out)) == 2                                       # no step was run again


# ---------------------------------------------------------------------------------------------- atomic save
CRASH_MID_SAVE = """
import sys, time, torch, model
path = sys.argv[1]
model.save_checkpoint(path, dict(model={"w": torch.ones(4)}, model_config={}, step=1))
def torn_save(state, f):  # the first bytes reach the disk, then the process hangs until it is killed
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
torch.save = torn_save
model.save_checkpoint(path, dict(model={"w": torch.zeros(4)}, model_config={}, step=2))
"""


def test_kill_9_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    proc = subprocess.Popen([sys.executable, "-c", CRASH_MID_SAVE, path], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert os.path.getsize(path + ".tmp") > 0           # the torn write went to the side file...
    ckpt = load_checkpoint(path)                         # ...and the checkpoint itself is the whole previous one
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(4))
    save_checkpoint(path, dict(model={"w": torch.zeros(4)}, model_config={}, step=3))  # a later save still works
    assert load_checkpoint(path)["step"] == 3 and not os.path.exists(path + ".tmp")


def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, dict(model={"w": torch.ones(2)}, model_config={}, step=1))

    def disk_full(state, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, dict(model={"w": torch.zeros(2)}, model_config={}, step=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and not os.path.exists(path + ".tmp")


def test_truncated_checkpoint_is_a_clear_error(init, tmp_path):
    cut = tmp_path / "cut.pt"
    with open(init, "rb") as f:
        cut.write_bytes(f.read()[:1000])
    with pytest.raises(ValueError, match=f"{cut} is not a readable checkpoint"):
        train_sft.main(train_sft.get_args(sft_argv(str(cut), str(tmp_path / "out"), 2)))


# ---------------------------------------------------------------------------------------------- bad input
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def dialog(i):
    return json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."})


def test_malformed_json_line_names_file_and_line(init, tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [dialog(1), dialog(2), '{"prompt": "cut off', dialog(3)])
    with pytest.raises(ValueError, match=f"{path}:3: malformed JSON"):
        train_sft.main(train_sft.get_args(sft_argv(init, str(tmp_path / "out"), 2, "--data", path)))


def test_missing_field_names_file_and_line(init, tmp_path):
    sft = write_lines(tmp_path / "sft.jsonl", [dialog(1), dialog(2), json.dumps({"prompt": "no answer"})])
    with pytest.raises(ValueError, match=f"{sft}:3: expected a 'messages' field or 'prompt' and 'response'"):
        train_sft.main(train_sft.get_args(sft_argv(init, str(tmp_path / "out"), 2, "--data", sft)))
    corpus = write_lines(tmp_path / "corpus.jsonl", [json.dumps({"text": "a b c"}), json.dumps({"body": "d e"})])
    with pytest.raises(ValueError, match=f"{corpus}:2: missing field 'text'"):
        train_sft.main(train_sft.get_args(["--stage", "base", "--data", corpus, "--out", str(tmp_path / "base"),
                                           "--vocab-size", "512", "--dim", "32", "--n-layers", "1", "--n-heads",
                                           "2", "--n-kv-heads", "1", "--steps", "1", *MICRO]))


def test_missing_field_after_a_blank_line_names_the_right_line(init, tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [dialog(1), "", dialog(2), json.dumps({"prompt": "no answer"})])
    with pytest.raises(ValueError, match=f"{path}:4: expected a 'messages' field"):
        train_sft.main(train_sft.get_args(sft_argv(init, str(tmp_path / "out"), 2, "--data", path)))


def test_empty_file_is_a_clear_error(init, tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=f"{path}: empty file"):
        train_sft.main(train_sft.get_args(sft_argv(init, str(tmp_path / "out"), 2, "--data", path)))


def test_example_longer_than_the_context_is_skipped_with_a_count(init, tmp_path):
    too_long = json.dumps({"prompt": "Repeat this: " + "word " * 200, "response": "No."})
    path = write_lines(tmp_path / "sft.jsonl", [dialog(i) for i in range(1, 8)] + [too_long])
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="skipped 1 of 7 dialogs longer than 96 tokens"):
        result = train_sft.main(train_sft.get_args(sft_argv(init, out, 2, "--data", path)))
    assert result["step"] == 2 and math.isfinite(result["loss"])
    # nothing but over-long examples: nothing to train on is an error, not an empty run
    only_long = write_lines(tmp_path / "long.jsonl", [too_long, too_long])
    with pytest.warns(UserWarning, match="skipped 1 of 1"), \
            pytest.raises(runtime.UserError, match="no training examples"):
        train_sft.main(train_sft.get_args(sft_argv(init, str(tmp_path / "out2"), 2, "--data", only_long)))


def test_checkpoint_whose_weights_do_not_match_its_architecture(tok, tmp_path):
    path = str(tmp_path / "bad.pt")
    ckpt = load_checkpoint(micro_checkpoint(path, tok))
    ckpt["model_config"]["dim"] = 64                     # the config says 64 wide, the weights are 32 wide
    save_checkpoint(path, ckpt)
    with pytest.raises(ValueError, match=f"{path}: weights do not match model_config"):
        train_sft.main(train_sft.get_args(sft_argv(path, str(tmp_path / "out"), 2)))


def test_checkpoint_with_another_tokenizer_is_a_clear_error(tmp_path):
    big_tok = tokenizer.world_tokenizer(2048, cache_dir=os.path.join(ROOT, ".cache"))
    path = micro_checkpoint(str(tmp_path / "other_tok.pt"), big_tok, vocab_size=512)
    with pytest.raises(runtime.UserError,
                       match=f"{path}: its tokenizer has 2048 tokens but the model's embedding has 512"):
        train_sft.main(train_sft.get_args(sft_argv(path, str(tmp_path / "out"), 2)))


def test_reward_model_as_init_is_a_clear_error(tok, tmp_path):
    path = micro_checkpoint(str(tmp_path / "rm.pt"), tok, head="scalar")
    with pytest.raises(runtime.UserError, match=f"{path}: a model with a 'scalar' head"):
        train_sft.main(train_sft.get_args(sft_argv(path, str(tmp_path / "out"), 2)))


def test_resume_onto_another_stages_checkpoint_is_a_clear_error(init, tmp_path):
    out = str(tmp_path / "out")
    train_sft.main(train_sft.get_args(sft_argv(init, out, 2, "--save-every", "1")))
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    ckpt["stage"] = "base"                               # as if OUT held a base run
    save_checkpoint(os.path.join(out, "model.pt"), ckpt)
    with pytest.raises(runtime.UserError, match="holds a 'base' checkpoint, not a 'sft' one"):
        train_sft.main(train_sft.get_args(sft_argv(init, out, 4, "--resume")))
    assert load_checkpoint(os.path.join(out, "model.pt"))["step"] == 2     # left as it was


def inject(monkeypatch, at_call, poison):
    """Make model.next_token_loss return poison(loss, model) on its at_call-th call (0-based)."""
    real, calls = model_lib.next_token_loss, []

    def next_token_loss(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls.append(1)
        return poison(loss, model) if len(calls) - 1 == at_call else loss
    monkeypatch.setattr(model_lib, "next_token_loss", next_token_loss)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(init, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    inject(monkeypatch, 5, lambda loss, model: loss * float("nan"))   # the 6th step's loss
    with pytest.raises(SystemExit, match=r"loss became nan at step 5; the last good checkpoint is .*model.pt"):
        train_sft.main(train_sft.get_args(sft_argv(init, out, 10, "--save-every", "2")))
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def nan_gradient(loss, model):
    """The same loss value, but every gradient NaN: d/dz 0 * sqrt(z) at z = 0 is 0 * inf (as an overflow in a
    bf16 backward pass can do while the forward loss looks fine)."""
    zero = sum(p.sum() for p in model.parameters()) * 0
    return loss + 0 * torch.sqrt(zero)


def test_nan_gradient_never_reaches_the_checkpoint(init, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    inject(monkeypatch, 3, nan_gradient)                   # the 4th step; step 4 would be a checkpoint step
    with pytest.raises(SystemExit,
                       match=r"gradient norm became nan at step 3; the last good checkpoint is .*model.pt"):
        train_sft.main(train_sft.get_args(sft_argv(init, out, 10, "--save-every", "2")))
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_ppo_nan_gradient_never_reaches_the_checkpoint(tok, init, tmp_path, monkeypatch):
    import train_ppo
    rm = micro_checkpoint(str(tmp_path / "rm.pt"), tok, seed=1, head="scalar")
    real, calls = train_ppo.policy_loss, []

    def policy_loss(logp, *args):
        loss, stats = real(logp, *args)
        calls.append(1)
        return (loss + 0 * torch.sqrt(logp.sum() * 0) if len(calls) == 4 else loss), stats
    monkeypatch.setattr(train_ppo, "policy_loss", policy_loss)
    out = str(tmp_path / "ppo")
    argv = ["--init", init, "--rm-safety", rm, "--rm-helpful", rm, "--out", out, "--iterations", "3",
            "--batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "4",
            "--save-every", "1", "--eval-prompts", "0", "--device", "cpu"]
    # 2 minibatches per iteration: the 4th call is the last one of iteration 2, which is then saved
    with pytest.raises(SystemExit, match=r"gradient norm became nan, .* at iteration 1; the last good checkpoint is"):
        train_ppo.main(train_ppo.get_args(argv))
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["step"] == 1
    for weights in (ckpt["model"], ckpt["value_model"]):
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_dpo_nan_gradient_never_reaches_the_checkpoint(init, tmp_path, monkeypatch):
    import train_dpo
    real, calls = train_dpo.pair_loss, []

    def pair_loss(args, logps, *rest):
        loss, stats = real(args, logps, *rest)
        calls.append(1)
        return (loss + 0 * torch.sqrt(logps.sum() * 0) if len(calls) == 4 else loss), stats
    monkeypatch.setattr(train_dpo, "pair_loss", pair_loss)
    out = str(tmp_path / "dpo")
    with pytest.raises(SystemExit, match="gradient norm became nan at step 3; the last good checkpoint is"):  # 4th step
        train_dpo.main(train_dpo.get_args(dpo_argv(init, out, 10, "--save-every", "2")))
    ckpt = load_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
