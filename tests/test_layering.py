"""The import rule of the package, read from the source (no import executed).

Each module of ``nemo_jax/_src`` belongs to one layer (``LAYERS``, lowest first) and
imports only modules of its own layer or below; there is no import cycle; ``_src`` never
imports the public modules; no project import sits inside a function (``cli.py`` may
defer its imports for start-up time; third-party ones such as matplotlib, evosax, onnx,
tfds and torch may load lazily anywhere).
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "nemo_jax")

LAYERS = (
    ("base", ("validate", "config_file", "quant", "pareto", "faults", "data", "distributed")),
    ("contract", ("spec", "qconfig")),
    ("model", ("layers", "models", "intercept", "nnx_models", "checkpoint", "convert",
               "train")),
    ("cost", ("workload", "precision", "graph", "costs")),
    ("evaluation", ("calibration", "tables", "schemes", "evaluator", "export", "emomc.masks",
                    "emomc.io")),
    ("problem", ("problem",)),
    ("search", ("search",)),
    ("run", ("registries", "run")),
    ("apps", ("finetune", "emomc")),
)
"""Layer name, module prefixes under ``nemo_jax._src`` (lowest layer first)."""


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in MODULES:
      return ".".join(parts[:i])
  return None


def imports(module: str) -> list[tuple[str, int, bool]]:
  """``(imported project module, line, inside a function)`` of one module."""
  path = MODULES[module]
  tree = ast.parse(open(path).read())
  parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    found = {_resolve(n) for n in names if n.startswith("nemo_jax")} - {None, module}
    if not found:
      continue
    inside, p = False, node
    while p in parents:
      p = parents[p]
      if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inside = True
        break
    out += [(m, node.lineno, inside) for m in sorted(found)]
  return out


def layer_of(module: str) -> int | None:
  if not module.startswith("nemo_jax._src."):
    return None
  name = module[len("nemo_jax._src."):]
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(name == p or name.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"{module} is in no layer of tests/test_layering.py:LAYERS")


SRC = sorted(m for m in MODULES if m.startswith("nemo_jax._src."))


def test_every_src_module_has_a_layer():
  for m in SRC:
    layer_of(m)


@pytest.mark.parametrize("module", SRC)
def test_src_imports_only_its_layer_or_below(module):
  mine = layer_of(module)
  for target, line, _ in imports(module):
    assert target.startswith("nemo_jax._src"), (
        f"{module}:{line} imports the public module {target}; _src imports only _src")
    theirs = layer_of(target)
    assert theirs <= mine, (
        f"{module}:{line} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), a "
        "higher layer")


def test_no_project_import_inside_a_function():
  found = [f"{m}:{line} -> {t}" for m in MODULES if m != "nemo_jax.cli"
           for t, line, inside in imports(m) if inside]
  assert not found, f"function-local project imports: {found}"


def test_no_import_cycle():
  graph = {m: {t for t, _, inside in imports(m) if not inside} for m in MODULES}
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for t in graph[m]:
      if state.get(t) == 1:
        cycle = stack[stack.index(t):] + [t]
        raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
      if t not in state:
        visit(t, stack + [t])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_the_rule_catches_violations(tmp_path, monkeypatch):
  # The checks above can fail: an upward import and a function-local one are found.
  fake = tmp_path / "fake.py"
  fake.write_text("from nemo_jax._src.run import search\n"
                  "def f():\n  from nemo_jax._src import quant\n")
  monkeypatch.setitem(MODULES, "nemo_jax._src.quant_fake", str(fake))
  found = imports("nemo_jax._src.quant_fake")
  assert ("nemo_jax._src.run.search", 1, False) in found
  assert ("nemo_jax._src.quant", 3, True) in found
  assert layer_of("nemo_jax._src.run.search") > layer_of("nemo_jax._src.quant")
