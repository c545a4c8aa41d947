"""Tables, plots and the combination of several seeds: what turns evaluate.py's outputs into tables and figures.

evaluate.py grades the answers and calls this file's writers: metrics.json, metrics.md (cells "27.4 [24.4-30.6]": a
rate and its interval, in percent; the printed table shows "27.4±3.2", ± the larger half-width; below both, the n
behind each rate) and the plots (the violation vs false-refusal trade-off per stage, reward vs KL from the training
logs, the RM score distributions, AdvBench refusals against XSTest false refusals).

--aggregate DIR [DIR ...] --out DIR combines the metrics.json of several seeds' evaluations of the same
checkpoints: per stage, every number x becomes its mean over the seeds, with x_sd (sample standard deviation),
x_min and x_max; each rate also gets x_ci, the 95% Wilson interval over all seeds' prompts pooled (its count
rate * x_n summed over seeds), and x_n, that pooled count (gold scores: no interval); n_* counts are summed;
n_seeds. Labels (split, held_out_attack) must agree between the seeds. Writes
DIR/metrics.json, DIR/metrics.md (cells "mean ± sd [pooled interval]") and the trade-off plot with sd error bars.
An OUT that already holds an evaluation (or a training run) is an error unless --overwrite.

    python report.py --aggregate out/seed0/eval out/seed1/eval out/seed2/eval --out out/eval --overwrite
"""
import json
import math
import os
import statistics
import textwrap

import runtime
import world


# ---------------------------------------------------------------------------------------------- an evaluation folder
PLOTS = ("tradeoff.png", "reward_kl.png", "rm_scores.png")
BENCH_PLOTS = ("benchmark_tradeoff.png",)  # with --benchmarks
EVAL_FILES = ("metrics.json", "metrics.md", "generations.jsonl")  # what an evaluation writes, besides PLOTS
BENCH_FILES = ("benchmark_generations.jsonl",)                    # and with --benchmarks, besides BENCH_PLOTS
RESPONSE_FILES = ("metrics.json", "metrics.md", "graded.jsonl")   # what --responses writes
AGGREGATE_FILES = ("metrics.json", "metrics.md")                  # what --aggregate writes, besides tradeoff.png
# any mode's: --overwrite replaces them all
OUTPUTS = tuple(dict.fromkeys((*EVAL_FILES, *RESPONSE_FILES, *PLOTS, *BENCH_FILES, *BENCH_PLOTS)))


def check_folder(out, overwrite):
    """An evaluation's folder: writable, and holding no evaluation or training run unless overwrite (which replaces
    only evaluation files)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise runtime.UserError(f"--out {out} is a file, not a folder")
    if not runtime.writable(out):
        raise runtime.UserError(f"--out {out}: cannot write there (permission denied)")
    held = [f for f in (*OUTPUTS, *runtime.RUN_FILES) if os.path.exists(os.path.join(out, f))]
    if held and not overwrite:
        raise runtime.UserError(f"{out} already holds {', '.join(held)}; pass --overwrite to replace its evaluation "
                                f"or choose another --out")


def open_folder(out, overwrite):
    """Create out, every evaluation file of any mode already in it removed with overwrite (no stale plot or
    generations.jsonl is left beside the new results)."""
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS if overwrite else ():
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _number(x):
    """Whether x is a finite number (a bool, a null or a NaN is none): what a table or a plot can show."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def json_safe(x):
    """NaN (an empty group, or its interval) becomes null: metrics.json stays valid JSON."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------- tables
# A column: (header, metrics key, sub-key of a per-group dict or None, kind); kind "rate" prints 100 * value with
# its interval, "num" three decimals, "count" a whole number.
MODEL_COLUMNS = [("RM-safe", "rm_safety_mean", None, "num"), ("RM-help", "rm_helpfulness_mean", None, "num"),
                 ("KL-sft", "kl_to_sft", None, "num"), ("win%", "win_rate", None, "rate")]


def columns(rows):
    """The table's columns for rows of a world split's metrics or, when they hold refusal_rate, a prompt file's."""
    if any("refusal_rate" in m for m in rows.values()):
        return file_columns(rows)
    mark = lambda a: a + ("*" if a == world.HELD_OUT_ATTACK else "")
    cols = [("viol%", "violation_rate", None, "rate")]
    cols += [(f"{c}%", "violation_rate_by_category", c, "rate") for c in world.CATEGORIES]
    cols += [(f"{mark(a)}%", "violation_rate_by_attack", a, "rate") for a in world.ATTACKS]
    cols += [(header, key, None, "rate") for header, key in (
        ("FR-border%", "false_refusal_rate"), ("FR-plain%", "false_refusal_rate_plain"),
        ("FR-wrapped%", "false_refusal_rate_wrapped"), ("FR-benign%", "benign_refusal_rate"),
        ("FR-benign-wrapped%", "benign_refusal_rate_wrapped"), ("acc%", "benign_accuracy"),
        ("no-ans%", "no_answer_rate"), ("confused%", "confused_refusal_rate"))]
    return cols + MODEL_COLUMNS


def file_columns(rows):
    """A prompt file's columns, those measured in some row: refusals overall and per kind, violations overall and
    per category and attack (when the file has more than one), accuracy, no answer, confused, the model's."""
    groups = lambda key: list(dict.fromkeys(g for m in rows.values() for g in (m.get(key) or {})))
    cols = [("refused%", "refusal_rate", None, "rate")]
    cols += [(f"refused-{k}%", "refusal_rate_by_kind", k, "rate") for k in world.KINDS
             if k in groups("refusal_rate_by_kind")]
    cols += [("viol%", "violation_rate", None, "rate")]
    for key in ("violation_rate_by_category", "violation_rate_by_attack"):
        cols += [(f"viol-{g}%", key, g, "rate") for g in groups(key)] if len(groups(key)) > 1 else []
    cols += [("acc%", "accuracy", None, "rate"), ("no-ans%", "no_answer_rate", None, "rate"),
             ("confused%", "confused_refusal_rate", None, "rate")] + MODEL_COLUMNS
    return [c for c in cols if any(_get(m, c[1], c[2]) is not None for m in rows.values())]


def benchmark_rows(rows):
    """{name: its benchmarks.run_all metrics} of the rows that ran the benchmarks."""
    return {name: m["benchmarks"] for name, m in rows.items() if isinstance(m.get("benchmarks"), dict)}


def benchmark_columns(bench_rows):
    """The columns of benchmark_rows' flat dicts, in run_all's order: each rate or mean that carries an interval
    ("advbench_refusal%", "truthfulqa_mc2%"; in percent), each BOLD group's mean sentiment ("gender:American_actors",
    in [-1, 1]), any other number as it is. The n_* counts and each metric's n go in the n line, as integers."""
    keys = list(dict.fromkeys(k for m in bench_rows.values() for k in m))
    cols = []
    for key in keys:
        if key.startswith("n_") or key.endswith(("_ci", "_n")) and key.rsplit("_", 1)[0] in keys:
            continue
        values = [m.get(key) for m in bench_rows.values()]
        if any(isinstance(v, dict) for v in values):  # BOLD: one column per group
            groups = dict.fromkeys(g for v in values if isinstance(v, dict) for g in v)
            cols += [(f"{key.removeprefix('bold_')}:{g}", key, g, "num") for g in groups]
        elif any(_number(v) for v in values):
            rate = f"{key}_ci" in keys
            cols.append((key.removesuffix("_rate") + "%" * rate, key, None, "rate" if rate else "num"))
    return cols


def _get(m, key, sub, suffix=""):
    """m[key + suffix], or its entry `sub` when the column is one group of a per-group dict."""
    value = m.get(key + suffix)
    if sub is None:
        return value
    return value.get(sub) if isinstance(value, dict) else None


def _cell(m, column, markdown=False):
    """One table cell. A rate: "27.4 [24.4-30.6]" (markdown) or "27.4±3.1" (printed, ± the larger half-width of
    the 95% interval). Rows combined over seeds (with _sd): "27.4 ± 2.0 [24.4-30.6]", ± the sd over seeds and the
    interval pooled over all seeds' prompts. "-": not measured."""
    _, key, sub, kind = column
    value = _get(m, key, sub)
    if not _number(value):
        return "-"
    if kind == "count":
        return f"{value:.0f}"
    show = (lambda x: f"{100 * x:.1f}") if kind == "rate" else (lambda x: f"{x:.3f}")
    ci = _get(m, key, sub, "_ci")
    ci = ci if isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci)) else None
    interval = f" [{show(ci[0])}-{show(ci[1])}]" if ci else ""
    if f"{key}_sd" in m:  # combined over seeds
        sd = _get(m, key, sub, "_sd")
        return show(value) + (f" ± {show(sd)}" if _number(sd) else "") + interval
    if ci is None or markdown:
        return show(value) + interval
    return f"{show(value)}±{show(max(value - ci[0], ci[1] - value))}"


def table_cells(rows, cols, markdown=False):
    return [[name] + [_cell(m, c, markdown) for c in cols] for name, m in rows.items()]


N_LINE = "n (prompts behind each rate):"


def group_sizes(rows, cols):
    """The count behind each rate column, "header n", once when every row has the same, else per row."""
    parts = []
    for header, key, sub, kind in cols:
        counts = {name: _get(m, key, sub, "_n") for name, m in rows.items()}
        if not any(_number(n) for n in counts.values()):
            continue
        show = lambda n: f"{n:.0f}" if _number(n) else "-"
        if len(set(counts.values())) == 1:
            parts.append(f"{header} {show(next(iter(counts.values())))}")
        else:
            parts.append(f"{header} " + ", ".join(f"{name} {show(n)}" for name, n in counts.items()))
    return parts


def format_table(rows, cols=None, width=120):
    """rows: {name: metrics}. One line per checkpoint, rates in percent with their interval, columns aligned; a
    table wider than `width` goes on below, the stage column repeated. Then the n behind each rate."""
    cols = columns(rows) if cols is None else cols
    head = ["stage"] + [h for h, _, _, _ in cols]
    body = table_cells(rows, cols)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    blocks, block = [], []
    for i in range(1, len(head)):
        if block and widths[0] + sum(widths[j] + 2 for j in block + [i]) > width:
            blocks.append(block)
            block = []
        block.append(i)
    line = lambda cells, block: "  ".join(cells[j].rjust(widths[j]) for j in [0] + block)
    lines = ["\n".join(line(r, b) for r in [head] + body) for b in blocks + [block]]
    parts = group_sizes(rows, cols)
    n_lines = [N_LINE]  # the parts, "; " between them, on lines of at most `width`
    for i, part in enumerate(parts):
        piece = part + (";" if i < len(parts) - 1 else "")
        if len(n_lines[-1]) + 1 + len(piece) > width and n_lines[-1].strip():
            n_lines.append(" ")
        n_lines[-1] += " " + piece
    return "\n\n".join(lines) + ("\n" + "\n".join(n_lines) if parts else "")


def format_markdown(rows, cols=None):
    """rows as a markdown table, cells "27.4 [24.4-30.6]", then the n behind each rate."""
    cols = columns(rows) if cols is None else cols
    head = ["stage"] + [h for h, _, _, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_cells(rows, cols, markdown=True)]
    parts = group_sizes(rows, cols)
    return "\n".join(lines) + (f"\n\n{N_LINE} " + "; ".join(parts) if parts else "")


def legend(rows):
    """What each column of columns(rows) means."""
    cells = ("Rates in percent of the prompts of each group." if any("n_seeds" in m for m in rows.values()) else
             "Rates in percent of the prompts of each group, each with its 95% Wilson interval: [low-high] in "
             "metrics.md; in the printed table ± the larger half-width of it.")
    file_mode = any("refusal_rate" in m for m in rows.values())
    model = any(k in m for m in rows.values() for k in ("rm_safety_mean", "kl_to_sft", "win_rate"))
    return " ".join([cells, FILE_LEGEND if file_mode else LEGEND] + [MODEL_LEGEND] * model
                    + ["'-': not measured. n: the prompts behind each rate."])


LEGEND = (f"viol: unsafe compliance on harmful prompts, overall, per risk category and per attack vector "
          f"(* {world.HELD_OUT_ATTACK}: held out of all training). FR-border: refusals of all borderline prompts "
          f"(benign requests that sound unsafe); FR-plain of those asked plainly, FR-wrapped of those inside an attack "
          f"wrapper. FR-benign: refusals of all benign prompts; FR-benign-wrapped of those inside an attack wrapper. "
          f"acc: correct answers to benign prompts. no-ans: empty or degenerate answers, of all prompts. confused: "
          f"refusals of harmful prompts that name another request and never this one, of all refusals of harmful "
          f"prompts.")
FILE_LEGEND = ("refused: refusals of all prompts; refused-KIND of the prompts of that kind (of benign and borderline "
               "ones: false refusals). viol: unsafe compliance on harmful prompts, overall and per category and attack "
               "of the file. acc: correct answers of the prompts with a gold answer. no-ans: empty or degenerate "
               "answers, of all prompts. confused: refusals of harmful prompts that name another request and never "
               "this one, of all refusals of harmful prompts.")
BENCH_LEGEND = ("Benchmarks (benchmarks.py): advbench_refusal and harmbench_refusal: GCG's refusal phrases found in "
                "the answer to a harmful request (an empty answer is no refusal); xstest_false_refusal: XSTest's "
                "refusal prefixes on its safe prompts, xstest_unsafe_refusal on its unsafe ones; truthfulqa_mc1 and "
                "mc2 by log-likelihood; each in percent with its 95% interval (Wilson; MC2 a mean's normal "
                "interval). DOMAIN:GROUP: BOLD's mean VADER compound sentiment, in [-1, 1], of the model's "
                "continuations of that group's prompts, with the normal 95% interval of the mean. n: the items "
                "behind each.")
MODEL_LEGEND = ("RM-safe / RM-help: mean sigmoid RM score. KL-sft: mean sequence log-ratio to the SFT model. win: "
                "gold-judge win rate against the baseline, ties half.")


def write_tables(out, rows):
    """Write out/metrics.json and out/metrics.md (the table, the n behind each rate, the legend, any benchmarks)
    and print the tables. Rows of the benchmarks only (real checkpoints) get the benchmark table alone."""
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    bench = benchmark_rows(rows)
    bench_cols = benchmark_columns(bench)
    graded = any(k in m for m in rows.values() for k in ("violation_rate", "refusal_rate", "n_seeds"))
    markdown = format_markdown(rows) + "\n\n" + legend(rows) + "\n" if graded else ""
    if bench_cols:
        markdown += ("\nBenchmarks:\n\n" if graded else "") + format_markdown(bench, bench_cols) + "\n\n" \
            + BENCH_LEGEND + "\n"
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(markdown)
    if graded:
        print(format_table(rows))
        print("±: the larger half-width of each rate's 95% Wilson interval; metrics.md gives the intervals and a "
              "legend")
    if bench_cols:
        print(("\nbenchmarks:\n" if graded else "") + format_table(bench, bench_cols))
        print("±: the larger half-width of each 95% interval (Wilson for rates and MC1, normal for MC2 and BOLD's "
              "means); metrics.md gives the intervals and a legend")


# ---------------------------------------------------------------------------------------------- plots
# The first of these keys that a training log's rows hold is plotted: PPO logs its reward (the RM score on the
# logit scale) and the per-sequence KL; DPO logs the implicit reward margin beta * (h_chosen - h_rejected).
REWARD_KEYS = ("reward", "rm_score", "margin")
KL_KEYS = ("kl", "kl_to_ref")


def training_curve(path):
    """(reward key, KL key, [(kl, reward)]) from a metrics.jsonl, or None when it logs no reward and KL."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for rk in REWARD_KEYS:
        for kk in KL_KEYS:
            points = [(r[kk], r[rk]) for r in rows if number(r.get(kk)) and number(r.get(rk))]
            if points:
                return rk, kk, points
    return None


def make_plots(rows, generations, log_paths, out, plots=PLOTS):
    """Write those of `plots` (PLOTS: the trade-off, reward-vs-KL and RM-distribution plots) that there is data for
    into out. Returns (paths written, {plot not written: why})."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], dict.fromkeys(plots, "matplotlib is not installed: pip install matplotlib")
    draw = {"tradeoff.png": (lambda path: tradeoff_plot(plt, rows, path), "no harmful prompt was evaluated"),
            "reward_kl.png": (lambda path: reward_kl_plot(plt, log_paths, path),
                              "no training log with reward and KL keys"),
            "rm_scores.png": (lambda path: rm_scores_plot(plt, rows, generations, path),
                              "no --rm-safety or --rm-helpful given"),
            "benchmark_tradeoff.png": (lambda path: benchmark_tradeoff_plot(plt, rows, path),
                                       "no checkpoint ran both AdvBench and XSTest")}
    written, skipped = [], {}
    for name in plots:
        plot, why_not = draw[name]
        path = plot(os.path.join(out, name))
        if path:
            written.append(path)
        else:
            skipped[name] = why_not
    return written, skipped


def _tradeoff_point(m, suffix=""):
    """(false-refusal rate on borderline prompts, violation rate) of one row, or with suffix "_sd" their sd over
    seeds; a prompt file's row (it has refusal_rate) counts the refusals of its borderline prompts."""
    refused = m.get("false_refusal_rate" + suffix) if "refusal_rate" not in m \
        else (m.get("refusal_rate_by_kind" + suffix) or {}).get("borderline")
    return refused, m.get("violation_rate" + suffix)


def tradeoff_plot(plt, rows, path):
    """The safety/helpfulness trade-off, one point per stage (Llama 2, section 4.2.3: safety without false
    refusals), with error bars of one sd when the rows combine seeds. Returns path, or None when no row has a
    violation rate (no harmful prompt was evaluated)."""
    names = [n for n in rows if _number(rows[n].get("violation_rate"))]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    xs = [100 * (_tradeoff_point(rows[n])[0] or 0) for n in names]
    ys = [100 * rows[n]["violation_rate"] for n in names]
    sds = [[100 * s if _number(s) else 0 for s in _tradeoff_point(rows[n], "_sd")] for n in names]
    seeds = any("n_seeds" in rows[n] for n in names)
    # no line between stages: the later ones each start from SFT, not from each other
    if seeds:
        ax.errorbar(xs, ys, xerr=[s[0] for s in sds], yerr=[s[1] for s in sds], fmt="o", capsize=3)
    else:
        ax.scatter(xs, ys)
    labels = {}  # stages that land on the same point share one label
    for n, x, y in zip(names, xs, ys):
        labels.setdefault((round(x, 1), round(y, 1)), []).append(n)
    for (x, y), group in labels.items():
        ax.annotate(", ".join(group), (x, y), textcoords="offset points", xytext=(5, 4))
    # keep a stage at 0% false refusals, and its error bar, inside the frame
    ax.set_xlim(-2, max(10, 1.2 * max(x + s[0] for x, s in zip(xs, sds))))
    ax.set_ylim(-2, 102)
    ax.set_xlabel("false-refusal rate on borderline prompts (%)")
    ax.set_ylabel("violation rate on harmful prompts (%)")
    ax.set_title("safety / helpfulness trade-off per stage" + ("\n(mean ± sd over seeds)" if seeds else ""))
    return _save(fig, plt, path)


def benchmark_tradeoff_plot(plt, rows, path):
    """The same trade-off on the public benchmarks: AdvBench refusal rate against XSTest's false-refusal rate on
    its safe prompts, one point per checkpoint with its Wilson intervals as error bars. None when no checkpoint
    ran both."""
    keys = ("xstest_false_refusal_rate", "advbench_refusal_rate")
    bench = {n: m for n, m in benchmark_rows(rows).items() if all(_number(m.get(k)) for k in keys)}
    if not bench:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, m in bench.items():
        (x, y), (x_ci, y_ci) = [100 * m[k] for k in keys], [[100 * v for v in m[f"{k}_ci"]] for k in keys]
        ax.errorbar([x], [y], xerr=[[x - x_ci[0]], [x_ci[1] - x]], yerr=[[y - y_ci[0]], [y_ci[1] - y]], fmt="o",
                    capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4))
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("XSTest false-refusal rate, safe prompts (%)")
    ax.set_ylabel("AdvBench refusal rate (%)")
    ax.set_title("refusals of harmful vs safe prompts\n(95% Wilson intervals)")
    return _save(fig, plt, path)


def reward_kl_plot(plt, log_paths, path):
    """Reward against KL to the reference over training, one panel per log (their rewards have different units);
    None when no log holds both."""
    curves = {name: training_curve(p) for name, p in log_paths.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4), squeeze=False)
    for ax, (name, (rk, kk, points)) in zip(axes[0], curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], ".-")
        ax.set_xlabel(f"{kk} (KL to the reference, nats per sequence)")
        ax.set_ylabel(rk)
        ax.set_title(f"{name}: {rk} vs KL during training")
    return _save(fig, plt, path)


def rm_scores_plot(plt, rows, generations, path):
    """RM score distributions per stage: safety RM on harmful prompts, helpfulness RM on the others; None without
    RM scores."""
    panels = [("rm_safety", "harmful", "safety RM score, harmful prompts"),
              ("rm_helpfulness", None, "helpfulness RM score, benign and borderline prompts")]
    if not any(g.get(key) is not None for g in generations for key, _, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, kind, title) in zip(axes, panels):
        for name in rows:
            vals = [g[key] for g in generations if g["stage"] == name and g.get(key) is not None
                    and ((g["kind"] == "harmful") == (kind == "harmful"))]
            if vals:
                ax.hist(vals, bins=20, range=(0, 1), histtype="step", label=name)
        ax.set_title(title)
        ax.set_xlabel("sigmoid(r)")
        ax.legend()
    return _save(fig, plt, path)


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(out, written, skipped):
    """The last line printed: every file written in out, then every plot not written and why."""
    line = f"wrote {out}: " + ", ".join(os.path.basename(p) for p in written)
    reasons = {}
    for name, why in skipped.items():
        reasons.setdefault(why, []).append(name)
    if reasons:
        line += "; not written: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items())
    return line


# ---------------------------------------------------------------------------------------------- several seeds
SCORES = ("gold_safety", "gold_helpfulness")  # mean scores in [0, 1] with a count, not rates: no Wilson interval


def _spread(values):
    """(mean, sample sd, min, max) of the numbers among values (a seed's null is left out); None where undefined."""
    xs = [x for x in values if _number(x)]
    if not xs:
        return None, None, None, None
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, min(xs), max(xs)


def _pooled(values, counts):
    """(95% Wilson interval, n) of every seed's prompts taken together: k = sum of rate * n. The product is rounded
    to the nearest half, which is exact for a count and for win_rate's ties counted half."""
    k = sum(round(2 * x * n) / 2 for x, n in zip(values, counts) if _number(x) and _number(n))
    n = sum(n for n in counts if _number(n))
    return world.wilson(k, n), n


def combine_seeds(stage, metrics, where):
    """One stage's metrics over seeds (one dict per seed; `where` names their files): see the module docstring."""
    out = {"n_seeds": len(metrics)}
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    for key in keys:
        if key.endswith(("_ci", "_n")) and key.rsplit("_", 1)[0] in keys:
            continue  # an interval or count: pooled below, with its rate
        values = [m.get(key) for m in metrics]
        counted, rate = f"{key}_n" in keys, f"{key}_n" in keys and key not in SCORES
        if key.startswith("n_"):
            out[key] = sum(v for v in values if _number(v))
        elif any(isinstance(v, dict) for v in values):  # by category, by attack, by kind, benchmarks
            subs = list(dict.fromkeys(s for v in values if isinstance(v, dict) for s in v))
            spreads = {s: _spread([(v or {}).get(s) for v in values]) for s in subs}
            for i, suffix in enumerate(("", "_sd", "_min", "_max")):
                out[key + suffix] = {s: spreads[s][i] for s in subs}
            if counted:
                counts = [m.get(f"{key}_n") or {} for m in metrics]
                pooled = {s: _pooled([(v or {}).get(s) for v in values], [c.get(s) for c in counts]) for s in subs}
                if rate:
                    out[f"{key}_ci"] = {s: p[0] for s, p in pooled.items()}
                out[f"{key}_n"] = {s: p[1] for s, p in pooled.items()}
        elif all(v is None or _number(v) for v in values):
            out[key], out[f"{key}_sd"], out[f"{key}_min"], out[f"{key}_max"] = _spread(values)
            if counted:
                ci, n = _pooled(values, [m.get(f"{key}_n") for m in metrics])
                if rate:
                    out[f"{key}_ci"] = ci
                out[f"{key}_n"] = n
        elif any(v != values[0] for v in values):  # split, held_out_attack, the baseline: pooling needs them equal
            raise runtime.UserError(f"checkpoint {stage!r}: {key} differs between the evaluations ("
                                    + ", ".join(f"{v!r} in {w}" for v, w in zip(values, where)) + ")")
        else:
            out[key] = values[0]
    return out


def read_evaluations(folders, out):
    """{folder: its metrics.json} for --aggregate, checked: each a per-checkpoint evaluation, the same names."""
    runs = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        if os.path.realpath(folder) == os.path.realpath(out):
            raise runtime.UserError(f"--out {out} is one of the --aggregate folders; write the combination elsewhere")
        if any(os.path.realpath(folder) == os.path.realpath(f) for f in runs):
            raise runtime.UserError(f"--aggregate {folder} is given twice (its prompts would count twice)")
        if not os.path.isfile(path):
            raise runtime.UserError(f"--aggregate {folder}: no metrics.json in it")
        try:
            with open(path) as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise runtime.UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, dict) or not rows or not all(isinstance(m, dict) for m in rows.values()):
            raise runtime.UserError(f"{path}: expected one object of metrics per checkpoint, keyed by its name")
        if any("n_seeds" in m for m in rows.values()):
            raise runtime.UserError(f"{path} already combines seeds; aggregate the seeds' own evaluations")
        first = next(iter(runs.items()), None)
        if first is not None and set(rows) != set(first[1]):
            raise runtime.UserError(f"{path} evaluates {sorted(rows)} but {first[0]} {sorted(first[1])}: aggregate "
                                    f"evaluations of the same checkpoints")
        runs[folder] = rows
    return runs


def aggregate(folders, out, overwrite=False, no_plots=False):
    """--aggregate: combine several seeds' metrics.json into out (metrics.json, metrics.md, trade-off plot)."""
    runs = read_evaluations(folders, out)
    check_folder(out, overwrite)
    where = [os.path.join(f, "metrics.json") for f in runs]
    names = list(next(iter(runs.values())))
    rows = json_safe({name: combine_seeds(name, [r[name] for r in runs.values()], where) for name in names})
    open_folder(out, overwrite)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    note = (f"Combined over {len(runs)} seeds ({', '.join(folders)}): each cell is the mean ± the sample standard "
            f"deviation over seeds [the 95% Wilson interval of all seeds' prompts pooled]; n is pooled too.")
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(format_markdown(rows) + "\n\n" + note + " " + legend(rows) + "\n")
    print(format_table(rows))
    print(textwrap.fill(note, 120))
    written, skipped = list(AGGREGATE_FILES), {"tradeoff.png": "--no-plots"}
    if not no_plots:
        plots, skipped = make_plots(rows, [], {}, out, ("tradeoff.png",))
        written += plots
    print(summary(out, written, skipped))
    return rows


# ---------------------------------------------------------------------------------------------- command line
def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--aggregate", nargs="+", default=None, metavar="DIR", required=True, help="combine the "
                   "metrics.json of these evaluation folders (one per seed, the same checkpoints): mean, sd, min, max "
                   "and pooled intervals; needs --out")
    p.add_argument("--out", default=None, help="folder for the combined metrics.json, metrics.md and trade-off plot")
    p.add_argument("--overwrite", action="store_true", help="replace the evaluation already in OUT (without it, a "
                   "folder that holds an evaluation or a training run is an error)")
    p.add_argument("--no-plots", action="store_true", help="skip the trade-off plot")
    args = runtime.parse_args(p, {}, argv)
    if args.out is None:
        p.error("--aggregate needs --out FOLDER (for metrics.json, metrics.md and the trade-off plot)")
    return args


def main(args):
    return aggregate(args.aggregate, args.out, args.overwrite, args.no_plots)


if __name__ == "__main__":
    runtime.command(main, get_args)
