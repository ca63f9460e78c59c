"""Repository contracts: the README's commands, CI, packaging, the extension example."""

from __future__ import annotations

import os
import re
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  return [l for l in block.splitlines() if l and not l.startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
  main_job, test_cmd = _readme_commands()[:2]
  assert "nemo-jax search" in main_job and "pytest" in test_cmd
  ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
  assert test_cmd in ci


def test_package_ships_data_checkpoint_and_licence():
  assets = os.path.join(REPO, "nemo_jax", "assets")
  for f in ("fashion_mnist_subset.npz", "FASHION_MNIST_LICENSE.txt",
            "resnet20_fashion_mnist.msgpack", "resnet20_fashion_mnist.json"):
    assert os.path.exists(os.path.join(assets, f)), f
  size = sum(os.path.getsize(os.path.join(assets, f)) for f in os.listdir(assets))
  assert size < 10 * 2**20
  assert '"assets/*"' in open(os.path.join(REPO, "pyproject.toml")).read()


def test_custom_objective_and_species_example_runs(tmp_path):
  mod = runpy.run_path(os.path.join(REPO, "experiments", "custom_objective_and_species.py"))
  result = mod["main"](["--generations", "1"])
  assert result.front
  assert set(result.front[0]["objectives"]) == {"top1_error", "latency_ms", "model_ratio"}
  assert {m["species"] for m in result.front} <= {"direct_round", "all_same"}
  # Named as plugins in the config: the same run, and a resumed run finds them again.
  out = str(tmp_path / "run")
  named = mod["main"](["--generations", "1", "--plugins", "--out", out])
  assert [m["w_bits"] for m in named.front] == [m["w_bits"] for m in result.front]
  import nemo_jax
  resumed = nemo_jax.search(out_dir=out, resume=True, generations=2, progress=False)
  assert len(resumed.history) == 3 and resumed.front


# --------------------------------------------------------------------------- code structure


def _package_modules(root):
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, "nemo_jax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _import_graph(root):
  """Module -> imported package modules, counting imports inside function bodies too."""
  import ast
  mods = _package_modules(root)
  graph = {m: set() for m in mods}
  for m, path in mods.items():
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path).read())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = m.split(".")[:None if is_pkg else -1]
          parts = parts[:len(parts) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      for t in targets:
        while t and t not in mods:
          t = t.rpartition(".")[0]
        if t and t != m:
          graph[m].add(t)
  return graph


def _cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
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
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles_even_inside_functions():
  graph = _import_graph(REPO)
  assert "nemo_jax._src.problem" in graph["nemo_jax._src.run.search"]  # the graph is real
  assert _cycles(graph) == []
  # The detector finds a planted cycle.
  planted = {k: set(v) for k, v in graph.items()}
  planted["nemo_jax._src.quant"].add("nemo_jax._src.layers")
  # (layers imports quant directly and through spec: all three are one component)
  assert ["nemo_jax._src.layers", "nemo_jax._src.quant", "nemo_jax._src.spec"] in _cycles(planted)


def test_experiments_and_benchmarks_use_only_the_public_api():
  import ast
  for folder in ("experiments", "benchmarks"):
    for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        for node in ast.walk(ast.parse(open(path).read())):
          names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
          for n in names:
            assert "_src" not in n, f"{path} imports {n}"


def test_docstrings_cite_files_that_exist():
  cited = set()
  for path in _package_modules(REPO).values():
    cited |= set(re.findall(r"[\w/.-]+\.md\b", open(path).read()))
  assert "docs/DESIGN.md" in cited
  for name in cited:
    assert os.path.exists(os.path.join(REPO, name)), f"cited file {name} does not exist"


def test_readme_lists_every_subcommand():
  from nemo_jax import cli
  parser = cli.build_parser()
  commands = next(a for a in parser._actions if a.dest == "command").choices
  readme = open(os.path.join(REPO, "README.md")).read()
  assert len(commands) >= 8
  for name in commands:
    assert f"nemo-jax {name}" in readme, name
