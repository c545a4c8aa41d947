"""pipeline.sh: every stage in order, finished stages reused, an interrupted one resumed, evaluation rerun only
when a checkpoint is newer than its metrics; several seeds and their aggregate, the SFT safety-data sweep; its command
line, the progress of side-by-side stages and the closing summary. The Python scripts are replaced by a stand-in that
records its arguments and writes the files each stage leaves, so each run takes a fraction of a second."""
import os
import re
import signal
import stat
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base", "sft", "rm_safety", "rm_helpful", "ppo", "dpo", "rs", "distill")
SHARES = ("0", "0.1", "0.25", "0.5", "1")
PROBE = ["-c", "import", "matplotlib"]  # the summary's check for matplotlib when no plot was written

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
out=""
prev=""
for a in "$@"; do
  [[ $prev == --out ]] && out=$a
  prev=$a
done
case "$1" in
  evaluate.py)
    if [[ $2 == --checkpoints ]]; then mkdir -p "$out" && echo '{}' > "$out/metrics.json"; fi ;;
  report.py)
    if [[ $2 == --aggregate ]]; then mkdir -p "$out" && echo '{}' > "$out/metrics.json"
    else touch "$2/report.html"; fi ;;
  -c) ;;
  loaders.py) ;;
  benchmarks.py) mkdir -p "$out" && echo '{}' > "$out/sources.json" ;;
  *) mkdir -p "$out" && touch "$out/model.pt" ;;
esac
"""


def run_pipeline(tmp_path, jobs=1, check=True, fake_python=FAKE_PYTHON, args=(), cwd=ROOT, **env_vars):
    """Run pipeline.sh with the stand-in python; returns its calls (the matplotlib probe left out) and the result."""
    fake = tmp_path / "fake_python"
    fake.write_text(fake_python)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), CALLS=str(calls), JOBS=str(jobs))
    env.update(env_vars)
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), *args], env=env, cwd=cwd,
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return [line.split() for line in calls.read_text().splitlines() if line.split() != PROBE], result


def summary(result):
    """The closing lines, from '== done:' (or '== stopped') on."""
    start = max(result.stdout.find("== done: "), result.stdout.find("== stopped "))
    assert start >= 0, result.stdout
    return result.stdout[start:]


def test_stages_run_in_order_then_are_reused(tmp_path):
    calls, result = run_pipeline(tmp_path)
    stage_of = lambda c: c[c.index("--out") + 1].rsplit("/", 1)[-1] if "--out" in c else c[1]
    assert [(c[0], stage_of(c)) for c in calls] == [
        ("evaluate.py", "--audit"), ("train_sft.py", "base"), ("train_sft.py", "sft"), ("train_rm.py", "rm_safety"),
        ("train_rm.py", "rm_helpful"), ("train_ppo.py", "ppo"), ("train_dpo.py", "dpo"), ("distill.py", "rs"),
        ("distill.py", "distill"), ("evaluate.py", "eval"), ("report.py", str(tmp_path / "out"))]
    assert "--overwrite" not in calls[-2]  # nothing to replace on a first evaluation
    # one seed: the commands of every stage as they always were, seed 0 by default, no sweep
    assert not any(flag in c for c in calls for flag in ("--seed", "--world-seed", "--aggregate", "--safety-share"))
    evaluated = calls[-2][calls[-2].index("--checkpoints") + 1:]
    assert [c.split("=")[0] for c in evaluated[:evaluated.index("--baseline")]] == \
        ["base", "sft", "ppo", "dpo", "rs", "distill"]
    out = tmp_path / "out"
    for stage in STAGES:
        assert (out / stage / "model.pt").exists() and not (out / stage / ".running").exists()
    assert (out / "eval" / "metrics.json").exists()
    assert summary(result).splitlines()[-1] == f"== report: {out}/report.html" and (out / "report.html").exists()
    # pipeline.log: what the docs pages cite; the machine's cores whatever threads the stages are given
    log = (out / "pipeline.log").read_text().splitlines()
    assert log[0] == "== command: bash pipeline.sh" and log[1].startswith("== commit: ")
    assert log[2].startswith(f"== machine: {len(os.sched_getaffinity(0))} cores (")
    assert [line.split(":")[0] for line in log[4:-1]] == [f"== {stage}" for stage in STAGES] + ["== seed_total"]
    assert log[3].startswith("== started: 20") and log[-1].startswith("== finished: 20")
    assert sum(int(line.split()[-2]) for line in log[4:-2]) <= int(log[-2].split()[-2])  # the seed's whole time

    # everything finished: a second run trains nothing, prints the saved table and writes the report again
    calls, result = run_pipeline(tmp_path)
    # the audit, then the table from metrics.json, then the report
    assert [c[:2] for c in calls] == [["evaluate.py", "--audit"], ["-c", calls[1][1]], ["report.py", str(out)]]
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
    assert calls[-2][:2] == ["evaluate.py", "--checkpoints"]
    assert calls[-2][-1] == "--overwrite"  # its folder holds the older metrics.json, which evaluate.py keeps otherwise


def test_side_by_side_stages_wait_for_what_they_read(tmp_path):
    calls, result = run_pipeline(tmp_path, jobs=2)
    stages = [c[c.index("--out") + 1].rsplit("/", 1)[-1] for c in calls if "--out" in c]
    assert stages[:2] == ["base", "sft"] and stages[-1] == "eval" and calls[-1][0] == "report.py"
    assert set(stages[2:4]) == {"rm_safety", "rm_helpful"}          # the two RMs together, before what reads them
    assert set(stages[4:6]) == {"ppo", "dpo"} and set(stages[6:8]) == {"rs", "distill"}
    for name in ("rm_safety", "rm_helpful", "ppo", "dpo", "rs", "distill"):
        assert f"== {name}: done in" in result.stdout                  # each finished stage reported from its log
        assert (tmp_path / "out" / "logs" / f"{name}.log").exists()
    calls, result = run_pipeline(tmp_path, jobs=2)
    assert result.stdout.count("reusing") == 9


def test_a_side_by_side_stage_starts_as_soon_as_a_slot_frees(tmp_path):
    slow_ppo = FAKE_PYTHON.replace('case "$1" in', 'case "$1" in\n  train_ppo.py) sleep 2; mkdir -p "$out" && '
                                   'touch "$out/model.pt"; echo ppo-ended >> "$CALLS" ;;')
    calls, _ = run_pipeline(tmp_path, jobs=2, fake_python=slow_ppo)
    order = [c[2] if c[0] == "distill.py" else "eval" if c[:2] == ["evaluate.py", "--checkpoints"] else c[0]
             for c in calls]
    # DPO ends at once: rejection sampling, then distillation, take its slot while PPO still runs
    assert order.index("rejection") < order.index("context") < order.index("ppo-ended") < order.index("eval")


def test_a_failed_side_by_side_stage_stops_the_pipeline(tmp_path):
    run_pipeline(tmp_path, jobs=2)
    (tmp_path / "out" / "dpo" / "model.pt").unlink()                 # DPO must run again, and this time it fails
    failing = FAKE_PYTHON.replace('case "$1" in', 'case "$1" in\n  train_dpo.py) exit 3 ;;')
    calls, result = run_pipeline(tmp_path, jobs=2, check=False, fake_python=failing)
    assert result.returncode != 0
    assert "dpo: failed, see" in result.stderr
    assert not any(c[:2] == ["evaluate.py", "--checkpoints"] for c in calls) and calls[-1][0] != "report.py"
    lines = summary(result).splitlines()
    assert lines[0].startswith("== stopped (exit 1): ")
    assert lines[-1] == f"== report: {tmp_path}/out/report.html, from an earlier run (python report.py " \
        f"{tmp_path}/out writes it anew)"
    assert "==   ppo         reused" in lines and "==   dpo         missing" in lines
    assert "==   eval        not run" in lines


def flag(call, name):
    """The value after --name in a recorded call, or None."""
    return call[call.index(name) + 1] if name in call else None


def test_seeds_run_every_stage_once_per_seed_then_aggregate(tmp_path):
    calls, result = run_pipeline(tmp_path, args=["--seeds", "2"])
    out = tmp_path / "out"
    assert calls[0] == ["evaluate.py", "--audit"] and sum(c[:2] == ["evaluate.py", "--audit"] for c in calls) == 1
    for seed in (0, 1):  # seed 0's stages and evaluation, then seed 1's
        run = out / f"seed{seed}"
        mine = calls[1 + 9 * seed:10 + 9 * seed]
        assert [flag(c, "--out") for c in mine] == [f"{run}/{name}" for name in (*STAGES, "eval")]
        assert all(flag(c, "--seed") == str(seed) for c in mine)          # every script, evaluate.py too
        assert flag(mine[4], "--world-seed") == str(seed)                   # PPO's world is its SFT model's
        assert all(flag(c, "--init") == f"{run}/sft/model.pt" for c in mine[2:8])
        assert f"sft={run}/sft/model.pt" in mine[-1] and flag(mine[-1], "--sft") == f"{run}/sft/model.pt"
        assert all((run / stage / "model.pt").exists() for stage in STAGES)
        assert (run / "eval" / "metrics.json").exists()
    assert calls[-2] == ["report.py", "--aggregate", f"{out}/seed0/eval", f"{out}/seed1/eval", "--out",
                         f"{out}/eval", "--overwrite"]
    assert calls[-1] == ["report.py", str(out)]  # the report of all seeds
    assert not any((out / stage).exists() for stage in STAGES)           # nothing in the one-seed places
    lines = summary(result).splitlines()
    assert lines[0] == f"== done: {out}" and lines[1] == f"== seed 0: {out}/seed0"
    assert [line.split()[1:] for line in lines[2:10]] == [[name, "trained", "now"] for name in STAGES]
    assert lines[10] == "==   eval        evaluated now"
    assert f"== seed 1: {out}/seed1" in lines and f"==   written in {out}/seed1/eval/: metrics.json" in lines
    assert lines[lines.index(f"== all 2 seeds: {out}/eval") + 1] == \
        "==   aggregate   aggregated now over seeds 0 to 1"
    assert lines[-1] == f"== report: {out}/report.html"

    # a rerun reuses every stage and evaluation of both seeds; the aggregate is remade from them
    (out / "seed1" / "dpo" / ".running").touch()                        # seed 1's DPO was interrupted
    calls, result = run_pipeline(tmp_path, jobs=2, SEEDS="2")
    trained = [c for c in calls if c[0].startswith("train") or c[0] == "distill.py"]
    assert len(trained) == 1 and flag(trained[0], "--out") == f"{out}/seed1/dpo" and trained[0][-1] == "--resume"
    assert [c[:2] for c in calls if c[0] in ("evaluate.py", "report.py")] == \
        [["evaluate.py", "--audit"], ["evaluate.py", "--checkpoints"], ["report.py", "--aggregate"],
         ["report.py", str(out)]]
    assert flag(calls[-3], "--out") == f"{out}/seed1/eval" and calls[-3][-1] == "--overwrite"
    assert "== seed0/eval: reusing" in result.stdout and "== seed1/dpo: an earlier run was interrupted" in \
        (out / "seed1" / "logs" / "dpo.log").read_text()


def test_sweep_trains_five_sft_models_and_evaluates_them_together(tmp_path):
    calls, result = run_pipeline(tmp_path, args=["--sweep"])
    out = tmp_path / "out"
    assert [flag(c, "--out").rsplit("/", 1)[-1] for c in calls if "--out" in c][:9] == [*STAGES, "eval"]
    sweep = [c for c in calls if "--safety-share" in c]
    assert [flag(c, "--safety-share") for c in sweep] == list(SHARES)
    for share, c in zip(SHARES, sweep):  # SFT from seed 0's base model, one folder per share
        assert c[:4] == ["train_sft.py", "--stage", "sft", "--preset"] and "--seed" not in c
        assert flag(c, "--init") == f"{out}/base/model.pt" and flag(c, "--out") == f"{out}/sweep/share_{share}"
        assert (out / "sweep" / f"share_{share}" / "model.pt").exists()
    evaluated = calls[-2]
    assert evaluated[:2] == ["evaluate.py", "--checkpoints"] and calls.index(sweep[-1]) == len(calls) - 3
    assert calls[-1] == ["report.py", str(out)]  # after the sweep: the report shows it
    assert evaluated[2:7] == [f"share_{s}={out}/sweep/share_{s}/model.pt" for s in SHARES]
    assert flag(evaluated, "--rm-safety") == f"{out}/rm_safety/model.pt"
    assert flag(evaluated, "--out") == f"{out}/sweep/eval" and "--overwrite" not in evaluated   # nothing there yet
    lines = summary(result).splitlines()
    start = lines.index(f"== sweep: {out}/sweep")
    assert [line.split()[1:] for line in lines[start + 1:start + 6]] == \
        [[f"share_{s}", "trained", "now"] for s in SHARES]
    assert lines[start + 6] == "==   eval        evaluated now"

    calls, result = run_pipeline(tmp_path, SWEEP="1")                  # all there: nothing trained, nothing judged
    assert not any("--safety-share" in c for c in calls) and "== sweep/share_0.25: reusing" in result.stdout
    assert f"== sweep/eval: reusing {out}/sweep/eval/metrics.json (no checkpoint is newer)" in result.stdout
    os.utime(out / "sweep" / "share_0.5" / "model.pt", (2e9, 2e9))      # a newer share: the sweep is judged again
    calls, _ = run_pipeline(tmp_path, SWEEP="1")
    assert flag(calls[-2], "--out") == f"{out}/sweep/eval" and calls[-2][-1] == "--overwrite"
    assert not any(flag(c, "--out") == f"{out}/eval" for c in calls)   # the main evaluation had nothing newer


def test_sweep_with_seeds_starts_from_seed_0s_base_model(tmp_path):
    calls, _ = run_pipeline(tmp_path, jobs=2, args=["--seeds", "2", "--sweep"])
    out = tmp_path / "out"
    sweep = [c for c in calls if "--safety-share" in c]
    assert len(sweep) == 5 and all(flag(c, "--init") == f"{out}/seed0/base/model.pt" for c in sweep)
    assert flag(calls[-2], "--rm-helpful") == f"{out}/seed0/rm_helpful/model.pt"
    assert calls.index(sweep[0]) > next(i for i, c in enumerate(calls) if "--aggregate" in c)


def test_an_unknown_or_invalid_argument_is_one_line_and_exit_2(tmp_path):
    for args in (["--bogus"], ["stray"], ["FOO=1"], ["--out"], ["--out", "--preset"], ["--jobs", "0"],
                 ["JOBS=two"], ["--preset", "huge"], ["PRESET=7b"], ["--seeds", "0"], ["--seeds"], ["SEEDS=two"],
                 ["--seeds=1.5"], ["--seeds", "-2"], ["SWEEP=yes"], ["--sweep=1"], ["--sweep", "3"],
                 ["--scale", "huge"], ["--preset", "smollm2", "--seeds", "2"], ["PRESET=smollm2", "--sweep"]):
        calls, result = run_pipeline(tmp_path, check=False, args=args)
        assert result.returncode == 2, args
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("pipeline.sh: "), result.stderr
        assert calls == [] and not (tmp_path / "out").exists()  # nothing ran, nothing was written
    calls, result = run_pipeline(tmp_path, check=False, JOBS="-1")  # the environment is checked the same way
    assert result.returncode == 2 and "JOBS" in result.stderr and calls == []
    calls, result = run_pipeline(tmp_path, check=False, SEEDS="0")
    assert result.returncode == 2 and result.stderr == "pipeline.sh: --seeds/SEEDS must be a positive integer, " \
        "not '0' (see pipeline.sh --help)\n" and calls == []


def test_help_prints_the_headers_usage(tmp_path):
    calls, result = run_pipeline(tmp_path, args=["--help"])
    assert calls == [] and not (tmp_path / "out").exists()
    for form in ("--out DIR", "OUT=DIR", "--preset NAME", "PRESET=NAME", "--jobs N", "JOBS=N", "--seeds N",
                 "SEEDS=N", "--sweep", "SWEEP=1", "--python CMD", "PYTHON=CMD", "PROGRESS=S", "-h, --help",
                 "OUT/seed<k>/<stage>", "report.py --aggregate", "OUT/sweep/share_<S>", "--safety-share",
                 "OUT/report.html"):
        assert form in result.stdout, form
    assert not result.stdout.startswith("#!") and "set -euo" not in result.stdout


def test_out_preset_and_jobs_as_flags_or_name_value_arguments(tmp_path):
    # the environment's OUT (tmp_path/out) and the default (out/ in the working folder) must both stay untouched
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args, where in ((["--out", str(tmp_path / "a")], tmp_path / "a"), ([f"OUT={tmp_path / 'b'}"], tmp_path / "b"),
                        ([f"--out={tmp_path / 'c'}"], tmp_path / "c"), (["--out", "rel"], cwd / "rel"),
                        (["OUT=rel2"], cwd / "rel2")):
        calls, _ = run_pipeline(tmp_path, args=[*args, "--preset", "small"], cwd=cwd)
        assert all((where / stage / "model.pt").exists() for stage in STAGES), args
        assert (where / "eval" / "metrics.json").exists()
        assert all(c[c.index("--preset") + 1] == "small" for c in calls if "--preset" in c)
        assert all(c[c.index("--out") + 1].startswith(str(where)) for c in calls if "--out" in c)
        assert not (tmp_path / "out").exists() and not (cwd / "out").exists()
        assert not os.path.exists(os.path.join(ROOT, "rel")) and not os.path.exists(os.path.join(ROOT, "rel2"))
    calls, _ = run_pipeline(tmp_path, jobs=1, args=["--jobs", "2", "PRESET=tiny"], cwd=cwd)  # the argument wins
    assert (tmp_path / "out" / "ppo" / "model.pt").exists() and (tmp_path / "out" / "logs" / "ppo.log").exists()
    assert all(c[c.index("--preset") + 1] == "tiny" for c in calls if "--preset" in c)


SLOW_PPO_AND_DPO = FAKE_PYTHON.replace('case "$1" in', '''case "$1" in
  train_ppo.py|train_dpo.py)
    name=${1#train_}; name=${name%.py}
    printf '%s:  10%%|#         | 1/10 [00:00<00:09,  1.00it/s]\\r' "$name"
    printf '%s:  40%%|####      | 4/10 [00:01<00:02,  2.00it/s]   \\r' "$name"
    sleep 2.5
    mkdir -p "$out" && touch "$out/model.pt" ;;''')


def test_the_main_log_shows_the_progress_of_side_by_side_stages(tmp_path):
    _, result = run_pipeline(tmp_path, jobs=2, fake_python=SLOW_PPO_AND_DPO, PROGRESS="1")
    lines = result.stdout.splitlines()
    for name in ("ppo", "dpo"):  # 2.5 s at PROGRESS=1: at least two lines each, the last tqdm update, stripped
        assert lines.count(f"== {name}: {name}:  40%|####      | 4/10 [00:01<00:02,  2.00it/s]") >= 2, result.stdout
        assert lines.index(f"== {name}: started, log in {tmp_path}/out/logs/{name}.log") < \
            lines.index(f"== {name}: {name}:  40%|####      | 4/10 [00:01<00:02,  2.00it/s]") < \
            next(i for i, line in enumerate(lines) if line.startswith(f"== {name}: done in"))
    assert not any(f"{name}:  10%" in line for line in lines for name in ("ppo", "dpo"))


def test_a_rerun_keeps_the_logs_of_reused_stages_and_continues_a_resumed_ones(tmp_path):
    run_pipeline(tmp_path, jobs=2)
    logs = tmp_path / "out" / "logs"
    before = {name: (logs / f"{name}.log").read_text() for name in STAGES[2:]}
    assert all(f"== {name}: done in" in text for name, text in before.items())
    (tmp_path / "out" / "dpo" / ".running").touch()  # DPO interrupted after a checkpoint: its log goes on
    _, result = run_pipeline(tmp_path, jobs=2)
    for name in STAGES[2:]:
        text = (logs / f"{name}.log").read_text()
        if name == "dpo":
            assert text.startswith(before[name]) and "an earlier run was interrupted; resuming it" in text
        else:
            assert text == before[name] and f"== {name}: reusing" in result.stdout


def test_the_summary_names_what_was_and_was_not_produced(tmp_path):
    no_matplotlib = FAKE_PYTHON.replace("  -c) ;;", '  -c) [[ $2 == "import matplotlib" ]] && exit 1 ;;')
    _, result = run_pipeline(tmp_path, jobs=2, fake_python=no_matplotlib)
    lines = summary(result).splitlines()
    out = tmp_path / "out"
    assert lines[0] == f"== done: {out}"
    assert [line.split()[1:] for line in lines[1:9]] == [[name, "trained", "now"] for name in STAGES]
    assert "==   eval        evaluated now" in lines
    assert f"==   written in {out}/eval/: metrics.json" in lines               # the stand-in writes only metrics.json
    assert "==   not written: metrics.md, generations.jsonl" in lines
    assert "==   no plots: matplotlib is not installed (pip install matplotlib)" in lines
    assert ".png" not in result.stdout and "and plots" not in result.stdout

    _, result = run_pipeline(tmp_path, jobs=2)  # matplotlib there, yet evaluate.py wrote no plot: no claim either
    lines = summary(result).splitlines()
    assert [line.split()[1:] for line in lines[1:9]] == [[name, "reused"] for name in STAGES]
    assert lines[9].startswith("==   eval        reused")
    assert f"==   no plots in {out}/eval/ (evaluate.py says why when it runs; --no-plots skips them)" in lines

    (out / "eval" / "tradeoff.png").touch()  # a plot present is named, and then no excuse is given
    _, result = run_pipeline(tmp_path, jobs=2)
    lines = summary(result).splitlines()
    assert f"==   written in {out}/eval/: metrics.json, tradeoff.png" in lines and "no plots" not in result.stdout

    os.utime(out / "eval" / "tradeoff.png", (1e9, 1e9))  # re-evaluated without writing plots: the old one is flagged
    os.utime(out / "ppo" / "model.pt", (2e9, 2e9))
    _, result = run_pipeline(tmp_path, jobs=2)
    lines = summary(result).splitlines()
    assert f"==   written in {out}/eval/: metrics.json, tradeoff.png (older than metrics.json)" in lines


def test_sigterm_reaches_the_side_by_side_stages_and_waits_for_their_save(tmp_path):
    """A SIGTERM to the pipeline while PPO and DPO run side by side: each stage gets it, saves (here: writes a
    marker) and exits 143; the pipeline waits for them, then stops with 143 and names them interrupted."""
    saving = FAKE_PYTHON.replace('  *) mkdir -p "$out" && touch "$out/model.pt" ;;', """  train_ppo.py|train_dpo.py)
    mkdir -p "$out" && touch "$out/model.pt"
    trap 'sleep 0.5; touch "$out/saved"; exit 143' TERM
    touch "$out/started"
    for i in $(seq 600); do sleep 0.1; done ;;
  *) mkdir -p "$out" && touch "$out/model.pt" ;;""")
    fake = tmp_path / "fake_python"
    fake.write_text(saving)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), CALLS=str(tmp_path / "calls.txt"), JOBS="2")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "pipeline.sh")], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while not all((out / s / "started").exists() for s in ("ppo", "dpo")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert all((out / s / "saved").exists() for s in ("ppo", "dpo"))      # both saved before the pipeline ended
    assert "interrupted: rerun to resume" in stdout and "== stopped (exit 143)" in stdout


def test_the_real_model_preset_runs_every_stage_from_smollm2_on_the_data_files(tmp_path):
    # DPO keeps its policy every 10 of 40 steps (--keep-every): the last kept one is its model.pt
    dpo = FAKE_PYTHON.replace("  *) mkdir", """  train_dpo.py) mkdir -p "$out"
    touch "$out/model.pt" "$out/policy_0010.pt" "$out/policy_0040.pt"
    printf '{\\n "lr": 5e-05,\\n "steps": 40,\\n "warmup": 4\\n}' > "$out/config.json" ;;
  *) mkdir""")
    calls, result = run_pipeline(tmp_path, fake_python=dpo,
                                 args=["--preset", "smollm2", "--data", str(tmp_path / "data")])
    gguf = ".gl/SmolLM2-135M-Instruct.Q4_1.gguf"
    scripts = [c[0] for c in calls if c[0] != "loaders.py"]  # the fetch runs where the GGUF is missing
    assert scripts == ["benchmarks.py", "train_sft.py", "train_rm.py", "train_rm.py", "train_ppo.py", "train_dpo.py",
                       "distill.py", "distill.py", "evaluate.py", "report.py"]
    calls = [c for c in calls if c[0] != "loaders.py"]
    flag = lambda c, name: c[c.index(name) + 1]  # noqa: E731
    out, data = tmp_path / "out", tmp_path / "out" / "data"
    assert flag(calls[0], "--make-real-data") == str(tmp_path / "data") and flag(calls[0], "--checkpoint") == gguf
    assert flag(calls[1], "--init") == gguf and flag(calls[1], "--data") == f"{data}/sft.jsonl"
    assert flag(calls[2], "--eval-data") == f"{data}/rm_safety_eval.jsonl"
    assert flag(calls[3], "--eval-data") == f"{data}/rm_helpful_eval.jsonl"
    assert all(flag(c, "--init") == f"{out}/sft/model.pt" for c in calls[2:8])
    # the CPU scale, by default: 20 of 30 blocks trained in the RMs and DPO, 10 elsewhere; bf16 where the CPU has it
    assert [flag(c, "--freeze-layers") for c in calls[1:8]] == ["20", "10", "10", "20", "10", "20", "20"]
    cpu_bf16 = os.path.exists("/proc/cpuinfo") and re.search(r"avx512_bf16|amx_bf16", open("/proc/cpuinfo").read())
    assert all(("--cpu-bf16" in c) == bool(cpu_bf16) for c in calls[1:8])
    assert flag(calls[2], "--data") == f"{data}/safety_pairs_train.jsonl"  # the constructed pairs alone
    # every stage reads validation files and checks there that it moved
    assert flag(calls[1], "--val-data") == f"{data}/sft_val.jsonl" and "--min-val-drop" in calls[1]
    assert all(flag(c, "--safety-eval-data") == f"{data}/safety_pairs_val.jsonl" and "--head-lr" in c
               and "--min-safety-pairs-accuracy" in c for c in calls[2:4])
    assert "--kl-range" in calls[4] and "--min-score-rise" in calls[4] and flag(calls[4], "--lam") == "1.0"
    assert flag(calls[5], "--safety-val-data") == f"{data}/safety_pairs_val.jsonl"
    assert "--max-safety-val-loss" in calls[5] and "--min-safety-val-accuracy" in calls[5]
    assert flag(calls[5], "--keep-every") == "50" and flag(calls[3], "--mix-fraction") == "0.5"
    assert all(flag(c, "--val-prompts") == f"{data}/prompts_val.jsonl" and "--check-refusal-change" in c
               for c in calls[6:8])
    evaluated = calls[-2][calls[-2].index("--checkpoints") + 1:calls[-2].index("--benchmarks")]
    assert evaluated == [f"base={gguf}"] + [f"{n}={out}/{n}/model.pt" for n in ("sft", "ppo", "dpo", "rs", "distill")] \
        + [f"dpo_step10={out}/dpo/policy_0010.pt"]
    assert not any(c[:2] == ["evaluate.py", "--audit"] for c in calls)  # the world's corpus audit is not run
    assert "==   distill     trained now" in summary(result)
    assert summary(result).splitlines()[-1] == f"== report: {out}/report.html" and calls[-1] == ["report.py", str(out)]
    # a rerun reuses the data and every stage
    calls, result = run_pipeline(tmp_path, args=["--preset", "smollm2", "--data", str(tmp_path / "data")])
    assert [c[0] for c in calls if c[0] not in ("loaders.py", "-c")] == ["report.py"]
    assert "== data: reusing" in result.stdout and result.stdout.count(": reusing") == 9


def test_the_gpu_scale_puts_every_real_model_step_on_cuda(tmp_path):
    calls, _ = run_pipeline(tmp_path, args=["--preset", "smollm2", "--scale", "gpu"])
    calls = [c for c in calls if c[0] not in ("loaders.py", "report.py")]  # the report needs no device
    assert len(calls) == 9 and all(c[c.index("--device") + 1] == "cuda" for c in calls)
    assert not any("--freeze-layers" in c or "--cpu-bf16" in c for c in calls)
    assert calls[2][calls[2].index("--data") + 1].endswith("/rm_safety_train.jsonl")  # beside harmless-base pairs
