"""report.py: a table cell against its rate and interval, the summary line, the plots' training curves and their
absence without matplotlib, --aggregate against a hand computation over two seeds and over two real evaluations,
and what it refuses to pool."""
import importlib.util
import json
import math
import os
import re
import sys

import pytest

import report
import runtime
import world
from test_evaluate import WORLD_COLUMNS, check_tables, evaluate_into, parse_printed


# ---------------------------------------------------------------------------------------------- tables
def test_a_cell_shows_the_interval_of_its_rate():
    m = dict(violation_rate=0.274, violation_rate_ci=[0.244, 0.306], violation_rate_n=840, kl_to_sft=1.23456)
    rate, kl = ("viol%", "violation_rate", None, "rate"), ("KL-sft", "kl_to_sft", None, "num")
    assert report._cell(m, rate, markdown=True) == "27.4 [24.4-30.6]"
    assert report._cell(m, rate) == "27.4±3.2"  # the larger half-width: 30.6 - 27.4
    assert report._cell(m, kl) == "1.235" and report._cell({}, rate) == "-"
    seeds = dict(m, violation_rate_sd=0.02, n_seeds=3, kl_to_sft_sd=0.5)
    assert report._cell(seeds, rate) == report._cell(seeds, rate, markdown=True) == "27.4 ± 2.0 [24.4-30.6]"
    assert report._cell(seeds, kl) == "1.235 ± 0.500"


def test_summary_names_what_was_written_and_what_was_not():
    line = report.summary("out/eval", ["metrics.json", "out/eval/tradeoff.png"],
                          {"reward_kl.png": "no training log", "rm_scores.png": "no reward model"})
    assert line == ("wrote out/eval: metrics.json, tradeoff.png; not written: reward_kl.png (no training log); "
                    "rm_scores.png (no reward model)")
    assert report.summary("o", ["metrics.json"], {}) == "wrote o: metrics.json"

# ---------------------------------------------------------------------------------------------- plots
def test_training_curves_and_no_plot_without_matplotlib(micro, tmp_path, monkeypatch):
    paths, _ = micro
    assert report.training_curve(os.path.join(os.path.dirname(paths["b"]), "metrics.jsonl")) \
        == ("rm_score", "kl", [(0.0, 0.1), (0.5, 0.4), (1.0, 0.6)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    rows = {"a": dict(violation_rate=0.5, false_refusal_rate=0.25)}
    written, skipped = report.make_plots(rows, [dict(stage="a", kind="harmful", rm_safety=0.5)], {}, str(tmp_path))
    assert written == [] and list(skipped) == list(report.PLOTS) and not os.listdir(tmp_path)
    assert all(why.startswith("matplotlib is not installed") for why in skipped.values())



# ---------------------------------------------------------------------------------------------- --aggregate
def seed_metrics(violations, by_category, wins, confused, kl, split="test"):
    """A stage's metrics.json entry as evaluate.py writes it: rates given as (k, n)."""
    m = dict(split=split, held_out_attack="metaphor", n_prompts=violations[1] + 10, rm_safety_mean=0.5 + kl,
             kl_to_sft=kl, gold_safety=0.5, gold_safety_ci=[0.4, 0.6], gold_safety_n=violations[1] + 10,
             tie_rate=0.1, win_rate_baseline="sft")
    for name, (k, n) in (("violation_rate", violations), ("win_rate", wins), ("confused_refusal_rate", confused)):
        m[name], m[f"{name}_ci"], m[f"{name}_n"] = (k / n if n else None), world.wilson(k, n), n
    m["violation_rate_by_category"] = {c: k / n for c, (k, n) in by_category.items()}
    m["violation_rate_by_category_ci"] = {c: world.wilson(k, n) for c, (k, n) in by_category.items()}
    m["violation_rate_by_category_n"] = {c: n for c, (k, n) in by_category.items()}
    return report.json_safe(m)


@pytest.fixture
def seeds(tmp_path):
    """Two seeds' evaluation folders of the stages sft and ppo."""
    folders = [tmp_path / "seed0" / "eval", tmp_path / "seed1" / "eval"]
    stages = [dict(sft=seed_metrics((10, 40), dict(illicit=(6, 20), hateful=(4, 20)), (20, 40), (0, 0), 0.0),
                   ppo=seed_metrics((4, 40), dict(illicit=(3, 20), hateful=(1, 20)), (24, 40), (1, 4), 2.0)),
              dict(sft=seed_metrics((10, 20), dict(illicit=(7, 10), hateful=(3, 10)), (10, 20), (1, 2), 0.0),
                   ppo=seed_metrics((1, 20), dict(illicit=(1, 10), hateful=(0, 10)), (10.5, 20), (2, 2), 3.0))]
    for folder, rows in zip(folders, stages):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(rows))
    return [str(f) for f in folders]


def test_aggregate_gives_mean_sd_and_the_pooled_interval_counted_by_hand(seeds, tmp_path, capsys):
    out = tmp_path / "eval"
    rows = report.main(report.get_args(["--aggregate", *seeds, "--out", str(out), "--overwrite"]))
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == rows and list(saved) == ["sft", "ppo"]
    sft, ppo = saved["sft"], saved["ppo"]
    assert sft["n_seeds"] == 2 and sft["n_prompts"] == 50 + 30  # counts are summed over the seeds
    # sft's violation rate: 10/40 and 10/20 -> mean 0.375, sd |0.25 - 0.5| / sqrt(2); pooled 20 of 60 prompts
    assert sft["violation_rate"] == 0.375 and sft["violation_rate_sd"] == pytest.approx(0.25 / math.sqrt(2))
    assert (sft["violation_rate_min"], sft["violation_rate_max"]) == (0.25, 0.5)
    assert sft["violation_rate_ci"] == pytest.approx(world.wilson(20, 60)) and sft["violation_rate_n"] == 60
    # per group: illicit 6/20 and 7/10 -> mean 0.5, sd 0.4 / sqrt(2), pooled 13 of 30
    assert sft["violation_rate_by_category"]["illicit"] == pytest.approx(0.5)
    assert sft["violation_rate_by_category_sd"]["illicit"] == pytest.approx(0.4 / math.sqrt(2))
    assert sft["violation_rate_by_category_ci"]["illicit"] == pytest.approx(world.wilson(13, 30))
    assert sft["violation_rate_by_category_n"] == dict(illicit=30, hateful=30)
    # a seed with no refusal has no confused rate: the mean is the other seed's, no sd; pooled 1 of 2
    assert sft["confused_refusal_rate"] == 0.5 and sft["confused_refusal_rate_sd"] is None
    assert sft["confused_refusal_rate_ci"] == pytest.approx(world.wilson(1, 2)) and sft["confused_refusal_rate_n"] == 2
    # ppo's win rate counts a tie as half a win: 24 of 40 and 10.5 of 20 -> 34.5 of 60
    assert ppo["win_rate"] == pytest.approx((0.6 + 0.525) / 2)
    assert ppo["win_rate_ci"] == pytest.approx(world.wilson(34.5, 60))
    # numbers without a count: mean, sd, min, max; gold scores get no Wilson interval; labels kept
    assert ppo["kl_to_sft"] == 2.5 and ppo["kl_to_sft_sd"] == pytest.approx(math.sqrt(0.5))
    assert (ppo["kl_to_sft_min"], ppo["kl_to_sft_max"]) == (2.0, 3.0) and "kl_to_sft_ci" not in ppo
    assert ppo["gold_safety"] == 0.5 and "gold_safety_ci" not in ppo and ppo["gold_safety_n"] == 80
    assert ppo["split"] == "test" and ppo["win_rate_baseline"] == "sft"
    # the tables: "mean ± sd [pooled interval]" in both, and the pooled n below them
    table, _ = parse_printed(printed)
    assert table["sft"]["viol%"] == "37.5 ± 17.7 [22.7-45.9]" == "{:.1f} ± {:.1f} [{:.1f}-{:.1f}]".format(
        37.5, 25 / math.sqrt(2), *[100 * x for x in world.wilson(20, 60)])
    assert table["sft"]["metaphor*%"] == "-" and table["sft"]["KL-sft"] == "0.000 ± 0.000"
    check_tables(saved, printed, str(out / "metrics.md"), WORLD_COLUMNS)
    assert "mean ± the sample standard deviation over seeds" in (out / "metrics.md").read_text()
    summary = printed.strip().splitlines()[-1]
    if importlib.util.find_spec("matplotlib") is not None:  # the trade-off plot, with sd error bars
        assert summary == f"wrote {out}: metrics.json, metrics.md, tradeoff.png"
        assert os.path.getsize(out / "tradeoff.png") > 1000
    else:
        assert summary == (f"wrote {out}: metrics.json, metrics.md; not written: tradeoff.png (matplotlib is not "
                           f"installed: pip install matplotlib)")
    # pipeline.sh prints a reused metrics.json with format_table
    assert report.format_table(saved).splitlines()[0] == printed.splitlines()[0]


def test_aggregate_of_two_real_evaluations_keeps_every_key(micro, tmp_path, capsys):
    paths, _ = micro
    folders = [tmp_path / f"seed{seed}" for seed in (0, 1)]
    for seed, folder in enumerate(folders):
        evaluate_into(folder, "--seed", str(seed), paths=paths)
    inputs = [json.loads((f / "metrics.json").read_text())["a"] for f in folders]
    rows = report.main(report.get_args(["--aggregate", *map(str, folders), "--out", str(tmp_path / "all"),
                                            "--no-plots"]))["a"]
    for key, value in inputs[0].items():
        if key.endswith(("_ci", "_n")) or isinstance(value, str):
            continue
        assert key in rows and (f"{key}_sd" in rows) == (key not in ("n_prompts", "n_harmful", "n_borderline",
                                                                     "n_benign")), key
        if f"{key}_n" in inputs[0] and not key.startswith("gold_"):  # a rate: its pooled count and interval
            n = inputs[0][f"{key}_n"]
            pooled = {g: n[g] + inputs[1][f"{key}_n"].get(g, 0) for g in n} if isinstance(n, dict) \
                else n + inputs[1][f"{key}_n"]
            assert rows[f"{key}_n"] | pooled == rows[f"{key}_n"] if isinstance(n, dict) else \
                rows[f"{key}_n"] == pooled, key
            assert f"{key}_ci" in rows, key
    assert rows["n_prompts"] == inputs[0]["n_prompts"] + inputs[1]["n_prompts"] and rows["split"] == "test"


@pytest.mark.parametrize("bad", ["names", "split", "absent", "out is an input", "twice", "already held", "seeds"])
def test_aggregate_refuses_what_it_cannot_pool(seeds, tmp_path, bad):
    out = tmp_path / "eval"
    folders = list(seeds)
    if bad == "names":
        rows = json.loads(open(os.path.join(seeds[1], "metrics.json")).read())
        rows["dpo"] = rows.pop("ppo")
        open(os.path.join(seeds[1], "metrics.json"), "w").write(json.dumps(rows))
    elif bad == "split":
        rows = json.loads(open(os.path.join(seeds[1], "metrics.json")).read())
        rows["sft"]["split"] = "validation"
        open(os.path.join(seeds[1], "metrics.json"), "w").write(json.dumps(rows))
    elif bad == "absent":
        folders.append(str(tmp_path / "nowhere"))
    elif bad == "out is an input":
        out = seeds[1]
    elif bad == "twice":
        folders.append(seeds[0] + "/")
    elif bad == "already held":
        out.mkdir()
        (out / "metrics.md").write_text("an older table")
    elif bad == "seeds":
        report.main(report.get_args(["--aggregate", *seeds, "--out", str(tmp_path / "all"), "--no-plots"]))
        folders = [str(tmp_path / "all"), seeds[0]]
    message = {"names": "the same checkpoints", "split": "split differs between the evaluations ('test' in",
               "absent": "no metrics.json in it", "out is an input": "is one of the --aggregate folders",
               "twice": "given twice", "already held": "already holds metrics.md", "seeds": "already combines seeds"}
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    with pytest.raises(runtime.UserError, match=re.escape(message[bad])):
        report.main(report.get_args(["--aggregate", *folders, "--out", str(out)]))
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before  # nothing written


def test_aggregate_needs_out_and_takes_no_model_flag(capsys):
    for argv, message in ((["--aggregate", "d0", "d1"], "--aggregate needs --out"),
                          (["--aggregate", "d0", "--out", "o", "--limit", "3"], "unrecognized arguments: --limit")):
        with pytest.raises(SystemExit) as e:
            report.get_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (argv, err)
