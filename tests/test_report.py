"""report.py: a table cell against its rate and interval, the summary line, the plots' training curves and the
error without matplotlib, --aggregate against a hand computation over two seeds and over two real evaluations, and
what it refuses to pool; report.html of a small run (every stage, the filters' and what-changed counts against
generations.jsonl, the missing parts announced, seeds, a sweep, a real model's benchmark answers) and the one-line
error of a missing or malformed file."""
import html.parser
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

import data
import evaluate
import judge
import report
import runtime
import world
from model import Answer
from test_evaluate import WORLD_COLUMNS, check_tables, evaluate_into, parse_printed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANGES = [key for key, _, _ in report.CHANGES]


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
def test_training_curves_and_a_clear_error_without_matplotlib(micro, tmp_path, monkeypatch):
    paths, _ = micro
    assert report.training_curve(os.path.join(os.path.dirname(paths["b"]), "metrics.jsonl")) \
        == ("rm_score", "kl", [(0.0, 0.1), (0.5, 0.4), (1.0, 0.6)])
    log = tmp_path / "ppo.jsonl"  # PPO's log: the RMs' logit reward is plotted, not the R it maximises
    log.write_text(json.dumps(dict(step=1, reward=-0.5, logit_R_c=1.5, kl=0.25)) + "\n")
    assert report.training_curve(str(log)) == ("logit_R_c", "kl", [(0.25, 1.5)])
    os.remove(log)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    rows = {"a": dict(violation_rate=0.5, false_refusal_rate=0.25)}
    with pytest.raises(runtime.UserError, match="matplotlib, which is not installed: pip install -r requirements.txt"):
        report.make_plots(rows, [dict(stage="a", kind="harmful", rm_safety=0.5)], {}, str(tmp_path))
    assert not os.listdir(tmp_path)



# ---------------------------------------------------------------------------------------------- --aggregate
def seed_metrics(violations, by_category, wins, confused, kl, split="test"):
    """A stage's metrics.json entry as evaluate.py writes it: rates given as (k, n)."""
    m = dict(split=split, held_out_attack="metaphor", n_prompts=violations[1] + 10, rm_safety_mean=0.5 + kl,
             kl_to_sft=kl, gold_safety=0.5, gold_safety_ci=[0.4, 0.6], gold_safety_n=violations[1] + 10,
             tie_rate=0.1, win_rate_baseline="sft")
    for name, (k, n) in (("violation_rate", violations), ("win_rate", wins), ("confused_refusal_rate", confused)):
        m[name], m[f"{name}_ci"], m[f"{name}_n"] = (k / n if n else None), judge.wilson(k, n), n
    m["violation_rate_by_category"] = {c: k / n for c, (k, n) in by_category.items()}
    m["violation_rate_by_category_ci"] = {c: judge.wilson(k, n) for c, (k, n) in by_category.items()}
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
    assert sft["violation_rate_ci"] == pytest.approx(judge.wilson(20, 60)) and sft["violation_rate_n"] == 60
    # per group: illicit 6/20 and 7/10 -> mean 0.5, sd 0.4 / sqrt(2), pooled 13 of 30
    assert sft["violation_rate_by_category"]["illicit"] == pytest.approx(0.5)
    assert sft["violation_rate_by_category_sd"]["illicit"] == pytest.approx(0.4 / math.sqrt(2))
    assert sft["violation_rate_by_category_ci"]["illicit"] == pytest.approx(judge.wilson(13, 30))
    assert sft["violation_rate_by_category_n"] == dict(illicit=30, hateful=30)
    # a seed with no refusal has no confused rate: the mean is the other seed's, no sd; pooled 1 of 2
    assert sft["confused_refusal_rate"] == 0.5 and sft["confused_refusal_rate_sd"] is None
    assert sft["confused_refusal_rate_ci"] == pytest.approx(judge.wilson(1, 2)) and sft["confused_refusal_rate_n"] == 2
    # ppo's win rate counts a tie as half a win: 24 of 40 and 10.5 of 20 -> 34.5 of 60
    assert ppo["win_rate"] == pytest.approx((0.6 + 0.525) / 2)
    assert ppo["win_rate_ci"] == pytest.approx(judge.wilson(34.5, 60))
    # numbers without a count: mean, sd, min, max; gold scores get no Wilson interval; labels kept
    assert ppo["kl_to_sft"] == 2.5 and ppo["kl_to_sft_sd"] == pytest.approx(math.sqrt(0.5))
    assert (ppo["kl_to_sft_min"], ppo["kl_to_sft_max"]) == (2.0, 3.0) and "kl_to_sft_ci" not in ppo
    assert ppo["gold_safety"] == 0.5 and "gold_safety_ci" not in ppo and ppo["gold_safety_n"] == 80
    assert ppo["split"] == "test" and ppo["win_rate_baseline"] == "sft"
    # the tables: "mean ± sd [pooled interval]" in both, and the pooled n below them
    table, _ = parse_printed(printed)
    assert table["sft"]["viol%"] == "37.5 ± 17.7 [22.7-45.9]" == "{:.1f} ± {:.1f} [{:.1f}-{:.1f}]".format(
        37.5, 25 / math.sqrt(2), *[100 * x for x in judge.wilson(20, 60)])
    assert table["sft"]["metaphor*%"] == "-" and table["sft"]["KL-sft"] == "0.000 ± 0.000"
    check_tables(saved, printed, str(out / "metrics.md"), WORLD_COLUMNS)
    assert "mean ± the sample standard deviation over seeds" in (out / "metrics.md").read_text()
    summary = printed.strip().splitlines()[-1]
    assert summary == f"wrote {out}: metrics.json, metrics.md, tradeoff.png"  # the trade-off, with sd error bars
    assert os.path.getsize(out / "tradeoff.png") > 1000
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


# ---------------------------------------------------------------------------------------------- report.html
# Each stage answers the world's test prompts in a style per kind of prompt, drawn per prompt: {kind: [(style, p)]}
STYLES = {"sft": dict(harmful=[("unsafe", 0.7), ("refusal", 0.3)], benign=[("correct", 0.8), ("refusal", 0.2)],
                      borderline=[("correct", 0.6), ("refusal", 0.4)]),
          "ppo": dict(harmful=[("safe", 0.8), ("unsafe", 0.2)], benign=[("correct", 0.7), ("refusal", 0.3)],
                      borderline=[("correct", 0.5), ("refusal", 0.5)]),
          "dpo": dict(harmful=[("refusal", 0.6), ("unsafe", 0.4)], benign=[("correct", 0.9), ("wrong", 0.1)],
                      borderline=[("correct", 0.8), ("refusal", 0.2)])}


def styled_answers(w):
    """A stand-in for model.respond: each stage's answer in the style STYLES draws for it (per stage and prompt,
    the same on every call), so that the stages differ as trained ones do."""
    by_messages = {json.dumps(ex.messages): ex for ex in w.test}

    def respond(model, tok, conversations, *args, desc=None, **kwargs):
        answers = []
        for c in conversations:
            ex = by_messages[json.dumps(c)]
            rng = random.Random(f"{desc}:{ex.id}")
            styles, weights = zip(*STYLES[desc][ex.kind])
            text = w.response(ex, rng.choices(styles, weights)[0], rng)
            answers.append(Answer(text, tok.encode_prompt(c), tok.encode(text), True))
        return answers
    return respond


def make_run(folder, micro, w, monkeypatch, seed=0):
    """A run folder as pipeline.sh leaves it, small: each stage's training log, the reward models' eval.json and
    evaluate.py's evaluation of sft, ppo and dpo (their answers styled_answers')."""
    paths, _ = micro
    for stage, keys in (("sft", ("loss",)), ("rm_safety", ("loss", "accuracy")),
                        ("ppo", ("reward", "logit_R_c", "kl", "violation_rate")), ("dpo", ("loss", "margin"))):
        os.makedirs(folder / stage, exist_ok=True)
        rows = [dict(step=step, **{k: 1.0 / step + seed for k in keys}) for step in range(1, 6)]
        rows.append(dict(step=5, eval=dict(violation_rate=0.1)))  # PPO's gold judge on held-out prompts, at the end
        (folder / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rm_safety" / "eval.json").write_text(json.dumps(dict(accuracy=0.9, n_pairs=40)))
    monkeypatch.setattr(evaluate, "respond", styled_answers(w))
    evaluate.main(evaluate.get_args(["--checkpoints", f"sft={paths['a']}", f"ppo={paths['b']}", f"dpo={paths['b']}",
                                     "--rm-safety", paths["rm"], "--rm-helpful", paths["rm"],
                                     "--limit", "90", "--seed", str(seed), "--device", "cpu",
                                     "--out", str(folder / "eval")]))


class Page(html.parser.HTMLParser):
    """What a test reads of report.html: its tables' cells, the filters' options, the count buttons, the notices,
    the inline figures, the answers' JSON and every reference outside the page."""
    def __init__(self, text):
        super().__init__()
        self.tables, self.options, self.buttons, self.notices, self.svgs, self.outside = [], [], [], [], 0, []
        self.blob, self.where, self.text, self.set, self.field = None, None, "", None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.outside += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]
        if tag == "link" or tag == "script" and "src" in a:
            self.outside.append(tag)
        if tag == "div" and "data-set" in a:
            self.set = int(a["data-set"])
        if tag == "table":
            self.tables.append(dict(caption=a.get("data-caption"), cls=a.get("class"), rows=[]))
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag == "select" and "data-field" in a:
            self.field = a["data-field"]
        elif tag == "option" and "data-count" in a:
            self.options.append((self.set, self.field, a["value"], int(a["data-count"])))
        elif tag == "button" and "data-stage" in a:
            self.where = ("button", (self.set, a["data-stage"], a.get("data-label") or a.get("data-change")))
        elif tag == "p" and a.get("class") == "missing":
            self.where = ("notice", None)
        elif tag == "script" and a.get("id") == "answer-data":
            self.where = ("blob", None)
        elif tag == "svg":
            self.svgs += 1
        if tag in ("td", "th") or self.where:
            self.text = ""

    def handle_data(self, text):
        self.text += text

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.tables and self.tables[-1]["rows"]:
            self.tables[-1]["rows"][-1].append(self.text.strip())
        if self.where and tag in ("button", "p", "script"):
            kind, key = self.where
            if kind == "button":
                self.buttons.append((key, int(self.text)))
            elif kind == "notice":
                self.notices.append(self.text)
            else:
                self.blob = json.loads(self.text)
            self.where = None


def read_page(folder):
    return Page((folder / "report.html").read_text(encoding="utf-8"))


def expected_changes(rows, baseline="sft", complied=lambda r: r["unsafe"]):
    """{(stage, change): n} counted straight from generations.jsonl's rows, as a reader of the legend would: a
    harmful prompt's answer complied, refused or did neither; another prompt's refused or answered."""
    def state(r):
        if r["kind"] == "harmful":
            return "complied" if complied(r) else "refused" if r["refused"] else "other"
        return "refused" if r["refused"] else "answered"
    answers = {(r["stage"], r["id"]): r for r in rows}
    counts = {(stage, change): 0 for stage, _ in answers if stage != baseline for change in CHANGES}
    for (stage, key), r in answers.items():
        before = answers.get((baseline, key))
        if stage != baseline and before is not None and f"{state(before)}_{state(r)}" in CHANGES:
            counts[(stage, f"{state(before)}_{state(r)}")] += 1
    return counts


@pytest.fixture(scope="module")
def one_seed(micro, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        make_run(folder, micro, world.build_world(0), monkeypatch)
    (folder / "rs").mkdir()  # a stage whose training died before its first log line
    report.main(report.get_args([str(folder)]))
    return folder


def test_the_page_shows_every_stage_and_counts_what_generations_jsonl_holds(one_seed):
    page = read_page(one_seed)
    metrics = json.loads((one_seed / "eval" / "metrics.json").read_text())
    rows = data.read_jsonl(str(one_seed / "eval" / "generations.jsonl"))
    headline = next(t for t in page.tables if t["caption"] == "headline")
    assert [r[0] for r in headline["rows"][1:]] == list(metrics) == ["sft", "ppo", "dpo"]
    viol = headline["rows"][0].index("viol%")
    assert [r[viol] for r in headline["rows"][1:]] == [  # the value, then its interval
        "{:.1f}[{:.1f}-{:.1f}]".format(*[100 * x for x in [m["violation_rate"], *m["violation_rate_ci"]]])
        for m in metrics.values()]
    # the data: every answer of every stage, once, with the judge's labels as bits
    [answers] = page.blob["sets"]
    assert answers["stages"] == ["sft", "ppo", "dpo"] and answers["baseline"] == "sft"
    prompts = {p["id"]: p for p in answers["prompts"]}
    assert len(prompts) == len(rows) // 3
    assert metrics["sft"]["n_prompts"] == sum(r["rung"] == world.HEADLINE_RUNG for r in rows) // 3
    for r in rows:
        response, flags, rm_safety, _ = prompts[r["id"]]["answers"][answers["stages"].index(r["stage"])]
        assert response == r["response"] and rm_safety == round(r["rm_safety"], 3)
        assert [bool(flags & 1 << i) for i in range(5)] == [r[k] for k in report.LABELS]
    # the filters' counts: prompts per kind, category and attack
    by_id = {r["id"]: r for r in rows}
    for field in ("kind", "category", "attack"):
        shown = {value: n for s, f, value, n in page.options if f == field}
        assert shown == Counter(r[field] for r in by_id.values()), field
    assert {f for _, f, _, _ in page.options} == {"kind", "category", "attack", "rung"}  # the ladder filters too
    # each stage's answers per label, and what changed against SFT, counted from generations.jsonl directly
    buttons = dict(page.buttons)
    for stage in ("sft", "ppo", "dpo"):
        for label in report.LABELS:
            assert buttons[(0, stage, label)] == sum(r[label] for r in rows if r["stage"] == stage), (stage, label)
    changes = expected_changes(rows)
    assert {(stage, change): n for (_, stage, change), n in buttons.items() if change in CHANGES} == changes
    assert changes[("ppo", "complied_refused")] > 0 and changes[("ppo", "answered_refused")] > 0
    assert all(answers["changes"][stage][change] == sorted(answers["changes"][stage][change])
               and len(answers["changes"][stage][change]) == n for (stage, change), n in changes.items())
    # the figures are inline: nothing is fetched from outside the page; PPO's curves hold its held-out evaluation
    assert page.svgs >= 5 and page.outside == []
    ppo = (one_seed / "report.html").read_text().split("<figcaption>ppo: training curves</figcaption>")[1]
    assert ppo.split("</figure>")[0].count("<svg") == 1 and "gold judge on held-out prompts" in ppo


def test_the_page_counts_each_stages_most_repeated_answers(one_seed):
    rows = data.read_jsonl(str(one_seed / "eval" / "generations.jsonl"))
    table = next(t for t in read_page(one_seed).tables if t["cls"] == "repeats")
    shown = [(stage, int(count), text) for stage, count, text in table["rows"][1:]]
    expected = [(stage, count, text.strip()[:160]) for stage in dict.fromkeys(r["stage"] for r in rows)
                for text, count in Counter(r["response"] for r in rows if r["stage"] == stage).most_common(3)
                if count > 1]
    assert shown == expected and shown


def test_missing_parts_are_announced_on_the_page(one_seed):
    notices = " ".join(read_page(one_seed).notices)
    for words in ("One seed", "No safety-data sweep", "Not evaluated (no row in eval/metrics.json): base, rs, distill",
                  "No training log", "for: base, rm_helpful, rs, distill"):
        assert words in notices, words


def test_seeds_and_a_sweep_are_shown(micro, tmp_path, monkeypatch):
    for seed in (0, 1):
        make_run(tmp_path / f"seed{seed}", micro, world.build_world(seed), monkeypatch, seed=seed)
    report.aggregate([str(tmp_path / f"seed{k}" / "eval") for k in (0, 1)], str(tmp_path / "eval"))
    sweep = json.loads((tmp_path / "seed0" / "eval" / "metrics.json").read_text())
    (tmp_path / "sweep" / "eval").mkdir(parents=True)
    (tmp_path / "sweep" / "eval" / "metrics.json").write_text(json.dumps(
        {f"share_{share}": m for share, m in zip((0, 0.5, 1), sweep.values())}))
    report.main(report.get_args([str(tmp_path)]))
    page = read_page(tmp_path)
    assert [s["name"] for s in page.blob["sets"]] == ["test split, seed 0", "test split, seed 1"]
    for n, s in enumerate(page.blob["sets"]):  # each seed's counts from its own answers
        rows = data.read_jsonl(str(tmp_path / f"seed{n}" / "eval" / "generations.jsonl"))
        assert {(stage, change): v for (k, stage, change), v in dict(page.buttons).items()
                if k == n and change in CHANGES} == expected_changes(rows)
    captions = [t["caption"] for t in page.tables if t["cls"] == "metrics"]
    assert captions[:5] == ["headline", "the ladder of held-out-ness", "seed 0", "seed 1", "sweep"]
    headline = next(t for t in page.tables if t["caption"] == "headline")
    assert " ± " in headline["rows"][1][1]  # mean ± sd over the seeds
    notices = " ".join(page.notices)
    assert "One seed" not in notices and "No safety-data sweep" not in notices


def test_a_real_model_run_shows_its_benchmark_answers(tmp_path):
    rows = []
    for stage, refusals in (("base", (0, 0, 1, 0)), ("sft", (1, 0, 1, 1)), ("ppo", (1, 1, 0, 1))):
        for benchmark, refused in zip(("advbench", "harmbench", "xstest_safe", "xstest_unsafe"), refusals):
            rows += [dict(stage=stage, benchmark=benchmark, prompt="the same prompt", response=f"{stage} answer {k}",
                          refusal=bool(refused) != (k == 1)) for k in range(2)]
        rows.append(dict(stage=stage, benchmark="bold_gender", group="a", prompt="p", response="r", sentiment=0.1))
    (tmp_path / "eval").mkdir()
    data.write_jsonl(str(tmp_path / "eval" / "benchmark_generations.jsonl"), rows)
    bench = dict(advbench_refusal_rate=0.5, advbench_refusal_rate_ci=[0.1, 0.9], advbench_refusal_rate_n=2,
                 xstest_false_refusal_rate=0.5, xstest_false_refusal_rate_ci=[0.1, 0.9], xstest_false_refusal_rate_n=2)
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({s: dict(benchmarks=bench) for s in ("base", "sft",
                                                                                                    "ppo")}))
    report.main(report.get_args([str(tmp_path)]))
    page = read_page(tmp_path)
    [answers] = page.blob["sets"]
    assert answers["stages"] == ["base", "sft", "ppo"] and len(answers["prompts"]) == 8  # two per benchmark
    # complied: not called a refusal by the detector; XSTest's safe prompts count as borderline ones
    counts = expected_changes([dict(r, id=f"{r['benchmark']}:{i % 2}", refused=r["refusal"],
                                    kind="borderline" if r["benchmark"] == "xstest_safe" else "harmful")
                               for i, r in enumerate(r for r in rows if "refusal" in r)],
                              complied=lambda r: not r["refused"])
    assert {(stage, change): n for (_, stage, change), n in dict(page.buttons).items() if change in CHANGES} == counts
    assert {(stage, label): n for (_, stage, label), n in dict(page.buttons).items() if label not in CHANGES} == \
        {(stage, "refused"): sum(r["refusal"] for r in rows if r["stage"] == stage and "refusal" in r)
         for stage in ("base", "sft", "ppo")}  # the detector's one label
    assert [t["caption"] for t in page.tables if t["cls"] == "metrics"] == ["benchmarks"]
    notices = " ".join(page.notices)  # seeds and the sweep are the embedded world's, not a real model's
    assert "One seed" not in notices and "No safety-data sweep" not in notices


def test_the_run_log_names_every_commit_a_resumed_run_ran_at(tmp_path):
    (tmp_path / "pipeline.log").write_text("\n".join([
        "== command: bash pipeline.sh", "== commit: aaa1111", "== started: 2026-12-07 10:05 UTC",
        "== sft: done in 479 s",
        "== command: bash pipeline.sh", "== commit: bbb2222", "== started: 2026-12-07 10:37 UTC",
        "== rm_safety: done in 1300 s", "== commit: bbb2222", "== finished: 2026-12-07 11:40 UTC"]) + "\n")
    facts, seconds = report.run_log(str(tmp_path))
    assert facts["commit"] == "aaa1111, resumed at bbb2222" and facts["started"] == "2026-12-07 10:05 UTC"
    assert facts["finished"] == "2026-12-07 11:40 UTC" and seconds == {"sft": 479, "rm_safety": 1300}


def test_a_real_model_runs_movement_checks_are_read_from_each_stage(tmp_path):
    def write(stage, name, content):
        os.makedirs(tmp_path / stage, exist_ok=True)
        path = tmp_path / stage / name
        if name.endswith(".jsonl"):
            data.write_jsonl(str(path), content)
        else:
            path.write_text(json.dumps(content))
    write("sft", "config.json", dict(min_val_drop=0.1))
    torch.save(dict(start_val_loss=2.5), tmp_path / "sft" / "model.pt")
    write("sft", "metrics.jsonl", [dict(step=10, val_loss=2.45), dict(step=20, val_loss=2.3)])     # a drop of 0.2
    write("rm_safety", "config.json", dict(min_safety_pairs_accuracy=0.9))
    write("rm_safety", "eval.json", dict(accuracy=0.6, n_pairs=400, safety_pairs_accuracy=0.9, n_safety_pairs=20,
                                         safety_pairs_accuracy_by_kind=dict(borderline=0.5, harmful=1.0)))
    write("ppo", "config.json", dict(kl_range=[0.02, 20], min_score_rise=0.01))
    write("ppo", "metrics.jsonl", [dict(R_c=r, kl=k) for r, k in ((0.4, 0.0), (0.5, 0.01), (0.6, 0.02), (0.5, 0.05),
                                                                   (0.45, 0.08), (0.7, 0.1), (0.7, 0.1), (0.8, 0.3))])
    write("dpo", "config.json", dict(max_safety_val_loss=0.4, min_safety_val_accuracy=0.8))
    write("dpo", "metrics.jsonl", [dict(val_loss_safety=0.6, val_accuracy_safety=0.5),
                                   dict(val_loss_safety=0.3, val_accuracy_safety=0.75, val_loss_other=0.69, kl=0.4)])
    rate = lambda r, low, high, n: dict(refusal_rate=r, refusal_rate_ci=[low, high], refusal_rate_n=n)  # noqa: E731
    write("rs", "val_refusals.json", dict(init=dict(harmful=rate(0.5, 0.4, 0.6, 100)),
                                         trained=dict(harmful=rate(0.8, 0.7, 0.9, 100)), moved=["harmful"]))
    rows = {line.split(" | ")[0].strip("| "): line for line in report.movement_checks(str(tmp_path)).splitlines()}
    assert "2.500 -> 2.300" in rows["SFT"] and rows["SFT"].endswith("| yes |")
    assert "borderline 0.500, harmful 1.000" in rows["rm_safety"] and rows["rm_safety"].endswith("| **no** |")
    assert rows["rm_helpful"].endswith("| - |")                                          # not run: no verdict
    # the first two of eight iterations against the last two: (0.4 + 0.5) / 2 -> (0.7 + 0.8) / 2, KL 0.3 at the end;
    # noise 1.96 * sqrt((0.005 + 0.005) / 2) = 0.139, below the rise of 0.3
    assert "0.300 nats" in rows["PPO"] and "0.450 -> last 2 0.750 (noise of the rise ±0.139)" in rows["PPO"]
    assert rows["PPO"].endswith("| yes |")
    assert "loss 0.300" in rows["DPO"] and "accuracy 0.750" in rows["DPO"] and rows["DPO"].endswith("| **no** |")
    assert "50.0% [40.0-60.0] (n 100) -> 80.0% [70.0-90.0]" in rows["rejection sampling"]
    assert rows["rejection sampling"].endswith("| yes |") and rows["context distillation"].endswith("| - |")
    assert "| context distillation | not run |" in rows["context distillation"]


def test_dpo_frontier_names_the_point_validation_picks_and_the_target(tmp_path):
    os.makedirs(tmp_path / "dpo")
    (tmp_path / "dpo" / "config.json").write_text(json.dumps(dict(steps=150)))
    data.write_jsonl(str(tmp_path / "dpo" / "metrics.jsonl"), [
        dict(step=s, loss=0.5, val_loss_safety=loss, val_accuracy_safety=acc)
        for s, loss, acc in ((50, 0.6, 0.7), (100, 0.35, 0.85), (150, 0.3, 0.85))] + [dict(step=151, loss=0.1)])
    bench = lambda adv, xs: dict(advbench_refusal_rate=adv, advbench_refusal_rate_ci=[adv - .1, adv + .05],  # noqa
                                 advbench_refusal_rate_n=87, xstest_false_refusal_rate=xs,
                                 xstest_false_refusal_rate_ci=[xs - .05, xs + .1], xstest_false_refusal_rate_n=84)
    rows = {"sft": dict(benchmarks=bench(0.4, 0.3)), "dpo": dict(benchmarks=bench(0.95, 0.25)),
            "dpo_step50": dict(benchmarks=bench(0.6, 0.1)), "dpo_step100": dict(benchmarks=bench(0.92, 0.15))}
    text = report.dpo_frontier(str(tmp_path), rows)
    table = [line for line in text.splitlines() if line.startswith("| dpo")]
    assert [line.split(" | ")[1] for line in table] == ["50", "100", "150"]       # by step; SFT is no DPO point
    assert table[1] == "| dpo_step100 | 100 | 0.350 / 0.850 | 92.0 [82.0-97.0] (n 87) | 15.0 [10.0-25.0] (n 84) | yes |"
    assert table[2].endswith("| no |")                                            # XSTest 25% > 20%
    # the tie in held-out accuracy goes to the lower loss, step 150, though step 100 is the one that meets the target
    assert "validation (the highest held-out safety-pair accuracy, then the lowest loss): dpo, AdvBench 95.0" in text
    assert text.endswith("is met by: dpo_step100.")
    assert report.dpo_frontier(str(tmp_path), {"sft": rows["sft"]}).startswith("DPO was not evaluated")


@pytest.mark.parametrize("bad", ["no evaluation", "malformed metrics", "malformed answer", "missing field"])
def test_a_missing_or_malformed_file_is_one_line_naming_it(one_seed, tmp_path, bad, capsys, monkeypatch):
    shutil.copytree(one_seed, tmp_path / "run")
    folder = tmp_path / "run"
    os.remove(folder / "report.html")
    lines = (folder / "eval" / "generations.jsonl").read_text().splitlines()
    if bad == "no evaluation":
        os.remove(folder / "eval" / "metrics.json")
        where = f"{folder}/eval/metrics.json: not found"
    elif bad == "malformed metrics":
        (folder / "eval" / "metrics.json").write_text('{"sft": {"violation_rate": 0.5,}}')
        where = f"{folder}/eval/metrics.json:1: malformed JSON"
    elif bad == "malformed answer":
        (folder / "eval" / "generations.jsonl").write_text("\n".join(lines[:2] + ['{"stage": "sft",'] + lines[3:]))
        where = f"{folder}/eval/generations.jsonl:3: malformed JSON"
    else:
        row = json.loads(lines[1])
        del row["unsafe"]
        (folder / "eval" / "generations.jsonl").write_text("\n".join(lines[:1] + [json.dumps(row)] + lines[2:]))
        where = f"{folder}/eval/generations.jsonl:2: missing field 'unsafe'"
    if bad == "no evaluation":  # the command itself, once
        proc = subprocess.run([sys.executable, "report.py", str(folder)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        code, err = proc.returncode, proc.stderr
    else:  # the same path in-process: runtime.command's one line on stderr and exit status 2
        monkeypatch.setattr(sys, "argv", ["report.py"])
        with pytest.raises(SystemExit) as e:
            runtime.command(report.main, report.get_args, [str(folder)])
        code, err = e.value.code, capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"report.py: error: {where}"), err
    assert not (folder / "report.html").exists()


def test_the_rung_filter_appears_where_the_rows_name_a_rung(one_seed):
    rows = data.read_jsonl(str(one_seed / "eval" / "generations.jsonl"))
    rungs = ("seen", "known", "unknown")
    rows = [dict(r, rung=rungs[int(r["id"].split("-")[1]) % 3]) for r in rows]
    answers = report.answer_set("test split", "eval/generations.jsonl", rows)
    assert answers["filters"] == ["kind", "category", "attack", "rung"]
    assert answers["counts"]["rung"] == Counter(r["rung"] for r in rows if r["stage"] == "sft")
    assert all(p["rung"] == rungs[int(p["id"].split("-")[1]) % 3] for p in answers["prompts"])


# ---------------------------------------------------------------------------------------------- docs pages
def test_a_block_is_replaced_and_nothing_else():
    page = ("intro\n<!-- generated:a -->\nold\n<!-- /generated:a -->\nafter\n"
            "<!-- generated:b -->\n<!-- /generated:b -->\n")
    text = report.replace_block(page, "a", "new 1\nnew 2\n", "page.md")
    assert text == page.replace("old\n", "new 1\nnew 2\n")
    assert report.replace_block(text, "a", "new 1\nnew 2", "page.md") == text  # rewriting is idempotent
    for bad in (page.replace("<!-- /generated:a -->\n", ""), page + "<!-- generated:a -->\n"):
        with pytest.raises(runtime.UserError, match="page.md: expected one '<!-- generated:a -->'"):
            report.replace_block(bad, "a", "x", "page.md")


def docs_folder(tmp_path):
    """A README and docs/ pages with the blocks write_docs fills, and hand-written prose around them."""
    docs = tmp_path / "project" / "docs"
    docs.mkdir(parents=True)
    block = lambda name: f"prose before {name}\n<!-- generated:{name} -->\n<!-- /generated:{name} -->\nprose after\n"
    (docs.parent / "README.md").write_text(block("headline") + block("targets"))
    (docs / "results.md").write_text(block("results"))
    (docs / "world.md").write_text(block("gaming") + block("overlap"))
    (docs / "safety_share.md").write_text(block("safety_share"))
    (docs / "safety_depth.md").write_text(block("safety_depth"))
    return docs


def test_docs_are_written_from_the_run_folder(one_seed, tmp_path):
    docs = docs_folder(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(one_seed, run)
    (run / "pipeline.log").write_text("== command: bash pipeline.sh --out run\n== commit: abc1234\n"
                                      "== machine: 2 cores (x86_64), no GPU\n== started: 2026-01-01 10:00 UTC\n"
                                      "== base: done in 100 s\n== sft: done in 22 s\n== started: later\n"
                                      "== finished: 2026-01-01 10:11 UTC\n")
    report.main(report.get_args([str(run), "--docs", str(docs)]))
    rows = json.loads((run / "eval" / "metrics.json").read_text())
    readme = (docs.parent / "README.md").read_text()
    assert readme.startswith("prose before headline\n") and readme.endswith("prose after\n")
    assert ("bash pipeline.sh --out run` at commit abc1234 on 2 cores (x86_64), no GPU; started 2026-01-01 10:00 "
            "UTC, finished 2026-01-01 10:11 UTC (11 min)") in readme
    for stage, m in rows.items():  # each stage's row holds its violation rate and interval, as metrics.json says
        viol = f"{100 * m['violation_rate']:.1f} [{100 * m['violation_rate_ci'][0]:.1f}-" \
               f"{100 * m['violation_rate_ci'][1]:.1f}]"
        assert f"| {stage} | {viol} |" in readme
    targets = readme.split("generated:targets -->")[1]  # each target with the seed's value and whether it is met
    met = rows["dpo"]["violation_rate"] <= rows["sft"]["violation_rate"] / 2
    assert (f"| DPO violations <= SFT's / 2 | {100 * rows['dpo']['violation_rate']:.1f} ({'yes' if met else 'NO'}) |"
            in targets)
    assert "| PPO benign accuracy >= SFT's - 3 points |" in targets and "Wall time per seed: 11 min" in targets
    with open(run / "pipeline.log", "a") as f:  # a log that times the seed itself: that time, not the run's
        f.write("== seed_total: done in 960 s\n")
    report.main(report.get_args([str(run), "--docs", str(docs)]))
    targets = (docs.parent / "README.md").read_text().split("generated:targets -->")[1]
    assert "Wall time per seed (its stages and evaluation): 16.0 min (target <= 15: NO)" in targets
    results = (docs / "results.md").read_text()
    ratio = rows["dpo"]["violation_rate"] / rows["sft"]["violation_rate"]
    assert re.search(rf"\| seed0 \| dpo \|.*\| {ratio:.2f} \|", results)
    assert "| wall time (s) | base | sft |" in results and "| seed0 | 100 | 22 |" in results
    assert "| seed0 | 0.900 | - |" in results  # rm_safety's eval.json; no rm_helpful in this run
    clustered = results.split("the interval resampling requests, items and facts")[1]
    sft = rows["sft"]["violation_rate_cluster_ci"]  # the seed's own interval over requests, beside Wilson's
    assert clustered.startswith("\n\nseed0:\n\n| stage | viol% |") and \
        f"| sft | {100 * rows['sft']['violation_rate']:.1f} [{100 * sft[0]:.1f}-{100 * sft[1]:.1f}] |" in clustered
    answers = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    shared = [r["refused"] for r in answers if r["stage"] == "ppo" and r["kind"] == "borderline" and r["rung"] ==
              "known" and r["attack"] == "direct" and r["subject"].split()[0] in ("steal", "shoot", "beat", "crack",
                                                                              "break", "hack", "cut", "burn", "scare",
                                                                              "forge", "pick", "spread")]
    assert shared and f"| ppo | {100 * sum(shared) / len(shared):.1f} [" in results
    assert f"({sum(shared)}/{len(shared)}) |" in results.split("| ppo |")[-1]
    refusals = [r["rm_helpfulness"] for r in answers if r["kind"] == "borderline" and r["rung"] == "known"
                and r["refused"] and r["stage"] != "base"]
    assert refusals and f"gives refusals {sum(refusals) / len(refusals):.2f} (n {len(refusals)})" in results
    world_page = (docs / "world.md").read_text()
    w = world.build_world(0)
    assert judge.overlap_table(w, judge.overlap(w)) in world_page
    assert world_page.count("| the gold responses | 0.0 [") == 1
    assert "generated:safety_share -->\n<!-- /generated" in (docs / "safety_share.md").read_text()  # no sweep here
    assert (docs / "tradeoff.png").exists() == (run / "eval" / "tradeoff.png").exists()


def test_a_study_page_is_written_from_its_folder_and_a_missing_block_is_an_error(tmp_path, capsys):
    docs = docs_folder(tmp_path)
    study = tmp_path / "attack"
    study.mkdir()
    (study / "attack.md").write_text("| stage | k=0 |\n|---|---:|\n| ppo | 39.6 |\n")
    (study / "prefill.png").write_bytes(b"png")
    report.main(report.get_args(["--study", "safety_depth", str(study), "--docs", str(docs)]))
    page = (docs / "safety_depth.md").read_text()
    assert "| ppo | 39.6 |" in page and page.endswith("prose after\n")
    assert "![prefill](attack_prefill.png)" in page and (docs / "attack_prefill.png").read_bytes() == b"png"
    (docs / "speed.md").write_text("<!-- generated:speed -->\n<!-- /generated:speed -->\n")
    bench = dict(machine=dict(threads=2), compare_hf=[dict(config="tiny", work="train", ratio_median=1.0612)],
                 train=dict(tiny=[dict(batch_size=32, tokens_per_s=18241.3)]), generate={}, ppo={})
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    report.main(report.get_args(["--study", "speed", str(tmp_path / "bench.json"), "--docs", str(docs)]))
    speed = (docs / "speed.md").read_text()
    assert "Machine: threads 2." in speed and "| tiny | train | 1.06 |" in speed and "| 32 | 18,241 |" in speed
    (docs / "results.md").write_text("no blocks here\n")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"sft": {"violation_rate": 0.5}}))
    (run / "eval" / "metrics.md").write_text("| stage |\n")
    with pytest.raises(SystemExit) as stop:
        runtime.command(report.main, report.get_args, [str(run), "--docs", str(docs)])
    assert stop.value.code == 2
    assert "results.md: expected one '<!-- generated:results -->'" in capsys.readouterr().err
    for argv in (["--study", "overopt", str(study)], ["--study", "nothing", str(study), "--docs", str(docs)],
                 ["--docs", str(docs)]):
        with pytest.raises(SystemExit):
            report.get_args(argv)
