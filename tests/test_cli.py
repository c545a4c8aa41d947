"""The command line as a new user meets it: every default in --help; a user error is one line on stderr, exit
status 2, and leaves nothing behind; a run folder is never overwritten without --resume or --overwrite; Ctrl-C
saves a checkpoint at the step reached and --resume continues with no lost step and no repeated log row."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tokenizer
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py", "distill.py", "evaluate.py", "report.py",
           "chat.py", "benchmarks.py", "bench.py", "loaders.py", "overopt.py", "attack.py"]


def run(argv, timeout=120, **popen):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    tok = tokenizer.world_tokenizer(512, cache_dir=os.path.join(ROOT, ".cache"))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=96)
    path = str(tmp_path_factory.mktemp("init") / "model.pt")
    save_checkpoint(path, dict(model=Transformer(config).state_dict(), model_config=vars(config),
                               tokenizer=tok.to_dict(), step=0, stage="base"))
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    proc = run([script, "--help"])
    assert proc.returncode == 0, proc.stderr
    section = proc.stdout.split("\noptions:\n")[1].split("\n\n")[0]      # up to the epilog
    entries, current = [], None
    for line in section.splitlines():
        if line.startswith("  -"):                                        # an option's first line
            current = [line]
            entries.append(current)
        elif current is not None:
            current.append(line)
    flags = [" ".join(" ".join(e).split()) for e in entries]
    missing = [f.split()[0] for f in flags if "(default" not in f and "(required)" not in f
               and not f.startswith("-h, --help")]
    assert len(flags) > 3 and not missing, f"{script}: no default shown for {missing}"


def assert_user_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--steps", "-5"], ["--steps", "must be > 0"]),
    (["--device", "cuda"], ["no CUDA device"] if not torch.cuda.is_available() else []),
    (["--init", "absent.pt"], ["no checkpoint at absent.pt"]),
    (["--data", "BAD"], ["BAD.jsonl:2", "malformed JSON"]),
])
def test_user_errors_are_one_line_exit_2_and_leave_nothing(init, tmp_path, argv, words):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bad = tmp_path / "BAD.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    argv = [str(bad) if a == "BAD" else a for a in argv]
    base = {"--init": init, "--steps": "2", "--device": "cpu", "--data": "world"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    out = tmp_path / "run"
    proc = run(["train_sft.py", "--stage", "sft", "--out", str(out), *[x for kv in base.items() for x in kv]])
    assert_user_error(proc, *words)
    assert not out.exists()


def test_a_run_folder_is_never_overwritten_or_resumed_from_nothing(init, tmp_path):
    out = str(tmp_path / "run")
    argv = ["train_sft.py", "--stage", "sft", "--init", init, "--out", out, "--steps", "2", "--batch-size", "8",
            "--eval-every", "100", "--device", "cpu"]
    assert_user_error(run(argv + ["--resume"]), "--resume: nothing to resume", out)
    assert not os.path.exists(out)
    assert run(argv).returncode == 0
    before = open(os.path.join(out, "metrics.jsonl")).read()
    assert_user_error(run(argv), "already holds a run", "--resume", "--overwrite")
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    assert run(argv + ["--overwrite"]).returncode == 0
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]


def read_steps(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_reached_and_resume_loses_nothing(init, tmp_path, sig):
    argv = ["train_sft.py", "--stage", "sft", "--init", init, "--steps", "60", "--batch-size", "8",
            "--eval-every", "1000", "--save-every", "1000", "--device", "cpu"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    assert run(argv + ["--out", straight]).returncode == 0
    proc = subprocess.Popen([sys.executable, *argv, "--out", broken], cwd=ROOT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are logged, then interrupt
        path = os.path.join(broken, "metrics.jsonl")
        if os.path.exists(path) and len(open(path).readlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr and "continue with --resume" in stdout + stderr
    reached = load_checkpoint(os.path.join(broken, "model.pt"))["step"]
    assert 5 <= reached < 60 and read_steps(broken) == list(range(1, reached + 1))
    assert run(argv + ["--out", broken, "--resume"]).returncode == 0
    assert read_steps(broken) == list(range(1, 61))                      # no step lost, none repeated
    a, b = (load_checkpoint(os.path.join(d, "model.pt"))["model"] for d in (straight, broken))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
