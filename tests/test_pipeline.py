"""pipeline.sh: every stage in order, finished stages reused, an interrupted one resumed, evaluation rerun only
when a checkpoint is newer than its metrics. The Python scripts are replaced by a stand-in that records its
arguments and writes the files each stage leaves, so this runs in a second."""
import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
out=""
prev=""
for a in "$@"; do
  [[ $prev == --out ]] && out=$a
  prev=$a
done
case "$1" in
  evaluate.py) if [[ $2 == --checkpoints ]]; then mkdir -p "$out" && echo '{}' > "$out/metrics.json"; fi ;;
  -c) ;;
  *) mkdir -p "$out" && touch "$out/model.pt" ;;
esac
"""


def run_pipeline(tmp_path, jobs=1, check=True, fake_python=FAKE_PYTHON):
    fake = tmp_path / "fake_python"
    fake.write_text(fake_python)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), CALLS=str(calls), JOBS=str(jobs))
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh")], env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return [line.split() for line in calls.read_text().splitlines()], result


def test_stages_run_in_order_then_are_reused(tmp_path):
    calls, _ = run_pipeline(tmp_path)
    stage_of = lambda c: c[c.index("--out") + 1].rsplit("/", 1)[-1] if "--out" in c else c[1]
    assert [(c[0], stage_of(c)) for c in calls] == [
        ("evaluate.py", "--audit"), ("train_sft.py", "base"), ("train_sft.py", "sft"), ("train_rm.py", "rm_safety"),
        ("train_rm.py", "rm_helpful"), ("train_ppo.py", "ppo"), ("train_dpo.py", "dpo"), ("distill.py", "rs"),
        ("distill.py", "distill"), ("evaluate.py", "eval")]
    evaluated = calls[-1][calls[-1].index("--checkpoints") + 1:]
    assert [c.split("=")[0] for c in evaluated[:evaluated.index("--baseline")]] == \
        ["base", "sft", "ppo", "dpo", "rs", "distill"]
    out = tmp_path / "out"
    for stage in ("base", "sft", "rm_safety", "rm_helpful", "ppo", "dpo", "rs", "distill"):
        assert (out / stage / "model.pt").exists() and not (out / stage / ".running").exists()
    assert (out / "eval" / "metrics.json").exists()

    # everything finished: a second run trains nothing and prints the saved table
    calls, result = run_pipeline(tmp_path)
    assert [c[:2] for c in calls] == [["evaluate.py", "--audit"], ["-c", calls[1][1]]]  # the audit, then the table from metrics.json
    assert result.stdout.count("reusing") == 9


def test_interrupted_stages_resume_or_restart_and_reevaluate(tmp_path):
    run_pipeline(tmp_path)
    out = tmp_path / "out"
    (out / "dpo" / ".running").touch()         # as if the DPO run had been killed after a checkpoint
    os.utime(out / "dpo" / "model.pt", (2e9, 2e9))
    (out / "rs" / "model.pt").unlink()           # and the rejection-sampling run before its first checkpoint
    (out / "rs" / "metrics.jsonl").write_text('{"step": 1}\n')
    calls, _ = run_pipeline(tmp_path)
    trained = [c for c in calls if c[0].startswith("train") or c[0] == "distill.py"]
    assert [c[0] for c in trained] == ["train_dpo.py", "distill.py"]
    assert trained[0][-1] == "--resume" and "--resume" not in trained[1]
    assert not (out / "rs" / "metrics.jsonl").exists()  # started clean, not appended to the dead run's log
    assert calls[-1][:2] == ["evaluate.py", "--checkpoints"]


def test_side_by_side_stages_wait_for_what_they_read(tmp_path):
    calls, result = run_pipeline(tmp_path, jobs=2)
    stages = [c[c.index("--out") + 1].rsplit("/", 1)[-1] for c in calls if "--out" in c]
    assert stages[:2] == ["base", "sft"] and stages[-1] == "eval"
    assert set(stages[2:4]) == {"rm_safety", "rm_helpful"}          # the two RMs together, before what reads them
    assert set(stages[4:6]) == {"ppo", "dpo"} and set(stages[6:8]) == {"rs", "distill"}
    for name in ("rm_safety", "rm_helpful", "ppo", "dpo", "rs", "distill"):
        assert f"== {name}: done in" in result.stdout                  # each finished stage reported from its log
        assert (tmp_path / "out" / "logs" / f"{name}.log").exists()
    calls, result = run_pipeline(tmp_path, jobs=2)
    assert result.stdout.count("reusing") == 9


def test_a_failed_side_by_side_stage_stops_the_pipeline(tmp_path):
    run_pipeline(tmp_path, jobs=2)
    (tmp_path / "out" / "dpo" / "model.pt").unlink()                 # DPO must run again, and this time it fails
    failing = FAKE_PYTHON.replace('case "$1" in', 'case "$1" in\n  train_dpo.py) exit 3 ;;')
    calls, result = run_pipeline(tmp_path, jobs=2, check=False, fake_python=failing)
    assert result.returncode != 0
    assert "dpo: failed, see" in result.stderr
    assert not any(c[:2] == ["evaluate.py", "--checkpoints"] for c in calls)
