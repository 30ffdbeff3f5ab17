"""The package's shape, derived from the source: layers whose imports point only down, no import cycles,
no private name imported from another module, and no function longer than MAX_LINES.

The layers, bottom to top (a package may import its own modules, the layers below, and ``ftctl`` itself
for ``__version__``; packages of one layer do not import each other):"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ftctl"
LAYERS = [
    ("core",),                                # errors, paths, registry, atomic writes, consoles, progress, memory
    ("data", "models", "methods"),            # rows → tokens → batches; model loading; adaptation methods
    ("config",),                              # schema, compose, validate
    ("rundir",),                              # the run directory: files, manifest, metrics, opening a finished run
    ("report",),                              # plots and HTML pages of run directories and sweep folders
    ("objectives",),                          # sft, the DPO family, reward (a registry)
    ("tasks",),                               # causal generation, seq2seq, classification
    ("evaluate",),                            # generation, metrics, eval runs
    ("train",),                               # the loop, engines, checkpoints, launch, trackers
    ("post", "experiments"),                  # merge/quantize/chat; sweeps, runs, plan, preview
    ("cli",),                                 # one module per command
]
MAX_LINES = 60
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, mod: str, is_pkg: bool):
    """(line, imported module, imported name or None) for every ftctl import, at any depth."""
    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module or ""]).rstrip(".") if node.level \
                else node.module or ""
            if base == "ftctl" or base.startswith("ftctl."):
                for a in node.names:
                    yield node.lineno, base, a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ftctl"):
                    yield node.lineno, a.name, None


def check(root: Path = SRC) -> list[str]:
    """Every violation, as 'file:line: what'."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    problems, edges = [], {m: set() for m in files}
    for mod, path in files.items():
        rel = path.relative_to(root.parent)
        for line, target, name in _imports(ast.parse(path.read_text()), mod, path.name == "__init__.py"):
            full = f"{target}.{name}" if name else target
            dep = full if full in files else target
            if name and name.startswith("_") and not name.startswith("__") and full not in files and dep != mod:
                problems.append(f"{rel}:{line}: private name {name} imported from {target}")
            if dep == mod or dep == "ftctl":
                continue
            edges[mod].add(dep)
            src_top, dst_top = mod.split(".")[1], dep.split(".")[1]
            if src_top == dst_top:
                continue
            a, b = LAYER_OF.get(src_top), LAYER_OF.get(dst_top)
            if a is None or b is None:
                problems.append(f"{rel}:{line}: {mod if a is None else dep} is in no layer (tests/test_architecture.py)")
            elif b >= a:
                what = "a package of the same layer" if a == b else "an upper layer"
                problems.append(f"{rel}:{line}: {mod} (layer {a}: {src_top}) imports {dep} from {what} "
                                f"(layer {b}: {dst_top})")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return problems


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def long_functions(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.name} is {n} lines")
    return out


def test_layers_point_down_without_cycles_or_private_imports():
    problems = check()
    assert not problems, "\n".join(problems)


def test_no_function_over_the_limit():
    problems = long_functions()
    assert not problems, f"functions over {MAX_LINES} lines:\n" + "\n".join(problems)


def test_every_package_is_in_a_layer():
    tops = {p.name if p.is_dir() else p.stem for p in SRC.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert tops == set(LAYER_OF), f"not in LAYERS: {tops - set(LAYER_OF)}; gone: {set(LAYER_OF) - tops}"


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "ftctl"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_checker_fails_on_an_upward_import_a_cycle_and_a_private_name(tmp_path):
    root = _copy(tmp_path)
    before = set(check(root))
    f = root / "core" / "errors.py"
    f.write_text(f.read_text() + "\n\ndef _late():\n    from ftctl.train import checkpoint  # planted\n")
    (root / "data" / "batches.py").write_text((root / "data" / "batches.py").read_text() +
                                               "\nfrom ftctl.data.pipeline import _save\n")
    problems = sorted(set(check(root)) - before)
    upward = [p for p in problems if "imports ftctl.train.checkpoint from an upper layer" in p]
    assert upward and upward[0].startswith("ftctl/core/errors.py:"), problems
    assert any("private name _save imported from ftctl.data.pipeline" in p for p in problems), problems
    assert any(p.startswith("import cycle:") and "ftctl.core.errors" in p for p in problems), problems


def test_the_length_check_fails_on_a_long_function(tmp_path):
    root = _copy(tmp_path)
    before = set(long_functions(root))
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (root / "core" / "long.py").write_text(f"def too_long():\n{body}")
    assert sorted(set(long_functions(root)) - before) == [f"ftctl/core/long.py:1: too_long is {MAX_LINES + 1} lines"]


def test_the_architecture_page_lists_every_module_and_layer():
    """docs/architecture.md's module tree names every module of the package (and nothing that is gone), and
    its layer table has the layers above, in order."""
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    tree = page.split("## Modules", 1)[1].split("```")[1]
    listed, folder = set(), ""
    for line in tree.splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        if name.endswith("/"):
            folder = name
        elif name.endswith(".py"):
            listed.add((folder if line.startswith("  ") else "") + name)
    actual = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
              if p.name != "__init__.py" or p.parent == SRC or (p.parent.name in ("cli", "objectives", "tasks"))}
    assert listed == actual, f"missing from the page: {sorted(actual - listed)}; gone: {sorted(listed - actual)}"
    rows = [line.split("|")[2] for line in page.split("## Layers", 1)[1].split("##", 1)[0].splitlines()
            if line.startswith("|") and line.split("|")[1].strip().isdigit()]
    assert [tuple(x.strip(" `/").removesuffix(".py") for x in r.split(",")) for r in rows] == LAYERS
