"""The layout of DESIGN.md: three floors of files (library, stages, tools), imports only downwards, no cycle;
each stage's main() short enough to read as its algorithm; no line over 120 characters."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {"model", "tokenizer", "data", "world", "judge", "reward", "runtime", "loaders"}
STAGES = {"train_sft", "train_rm", "train_ppo", "train_dpo", "distill"}
TOOLS = {"evaluate", "report", "chat", "benchmarks", "bench", "overopt", "attack"}


def project_imports(name):
    """Every project module that module `name` imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & (LIBRARY | STAGES | TOOLS)


def test_every_top_level_file_has_a_floor():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert files == LIBRARY | STAGES | TOOLS


@pytest.mark.parametrize("name", sorted(LIBRARY | STAGES))
def test_imports_go_only_down_a_floor(name):
    imported = project_imports(name)
    assert imported <= LIBRARY, f"{name}.py imports {sorted(imported - LIBRARY)}, which are not library files"


def test_no_import_cycle():
    graph = {name: project_imports(name) for name in LIBRARY | STAGES | TOOLS}
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_main_reads_in_about_80_lines(name):
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 85, f"{name}.main is {main.end_lineno - main.lineno + 1} lines"


def test_no_line_over_120_characters():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py")) \
        + [os.path.join(ROOT, "pipeline.sh"), os.path.join(ROOT, ".ci", "run")]
    long = [f"{os.path.relpath(path, ROOT)}:{i}" for path in files
            for i, line in enumerate(open(path, encoding="utf-8"), 1) if len(line.rstrip("\n")) > 120]
    assert not long, long
