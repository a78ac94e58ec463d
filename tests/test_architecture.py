"""The import graph of vit_jax_fix, read from the source with `ast` (nothing is imported).

Rules (issue 25):
- no cycle between modules. Every import counts: module level, inside functions (lazy imports, which only
  postpone a cycle to the first call) and `importlib.import_module('...')` with a literal name. Module-level
  imports never close a cycle, and lazy (function-level) imports do not either.
- the libraries (models, data, interop, diagnostics) never import the trainer `vit_jax_fix.train`; the
  applications (vit_jax_fix/convert.py, diagnose.py, evaluate.py, and main.py outside the package) may.

An edge goes to the module named: `from a.b import c` is an edge to `a.b.c` when that is a module of the
package, else to `a.b`. Packages that a dotted import initialises on the way (`a`, `a.b` for `import a.b.c`)
get no edge: Python initialises a parent package before its children, so that order is no cycle.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "vit_jax_fix"
LIBRARIES = tuple(f"{PACKAGE}.{p}" for p in ("models", "data", "interop", "diagnostics"))
TRAINER = f"{PACKAGE}.train"

# Lazy imports allowed to close a cycle: (importer, imported) -> why.


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """{dotted module name: file} for every .py of the package (`a/__init__.py` is module `a`)."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _resolve(name: str, modules) -> str | None:
  """The longest prefix of a dotted name that is a module of the package (None: outside it)."""
  parts = name.split(".")
  while parts:
    cand = ".".join(parts)
    if cand in modules:
      return cand
    parts.pop()
  return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: pathlib.Path, modules) -> list[tuple[str, int, bool]]:
  """[(imported module, line, lazy)]: lazy when the import runs inside a function body."""
  tree = ast.parse(path.read_text(), str(path))
  is_package = path.name == "__init__.py"
  out = []

  def visit(node, lazy):
    for child in ast.iter_child_nodes(node):
      inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = _absolute(child, module, is_package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
      elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
            and child.func.attr == "import_module" and child.args
            and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
        names = [child.args[0].value]
      for name in names:
        target = _resolve(name, modules)
        if target is not None and target != module:
          out.append((target, child.lineno, lazy))
      visit(child, inner)

  visit(tree, False)
  return out


def import_graph(root: pathlib.Path = ROOT, *, lazy: bool = True) -> dict[str, dict[str, list[str]]]:
  """{module: {imported module: ['file:line', ...]}}; lazy=False keeps module-level imports only."""
  modules = module_files(root)
  graph = {m: {} for m in modules}
  for m, path in modules.items():
    for target, line, is_lazy in imports_of(m, path, modules):
      if lazy or not is_lazy:
        graph[m].setdefault(target, []).append(f"{path.relative_to(root)}:{line}{' (lazy)' if is_lazy else ''}")
  return graph


def cycles(graph) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def strong(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def describe(graph, comp) -> str:
  edges = [f"  {a} -> {b} ({', '.join(graph[a][b])})" for a in comp for b in sorted(graph[a]) if b in comp]
  return " <-> ".join(comp) + "\n" + "\n".join(edges)


def upward_imports(graph) -> list[str]:
  return [f"{m} -> {t} ({', '.join(where)})" for m in sorted(graph) if m.startswith(LIBRARIES)
          for t, where in sorted(graph[m].items()) if t == TRAINER or t.startswith(TRAINER + ".")]


def test_graph_reader_sees_every_kind_of_import(tmp_path):
  """The checks below would pass vacuously if the reader missed imports: it must see each form."""
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import a\n")
  (pkg / "sub" / "a.py").write_text("from vit_jax_fix.sub.b import f\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from ..c import g\n")
  (pkg / "c.py").write_text("import importlib\ndef g():\n  importlib.import_module('vit_jax_fix.sub.a')\n")
  graph = import_graph(tmp_path)
  assert graph["vit_jax_fix.sub"] == {"vit_jax_fix.sub.a": ["vit_jax_fix/sub/__init__.py:1"]}
  assert graph["vit_jax_fix.sub.a"] == {"vit_jax_fix.sub.b": ["vit_jax_fix/sub/a.py:1"]}
  assert graph["vit_jax_fix.sub.b"] == {"vit_jax_fix.c": ["vit_jax_fix/sub/b.py:2 (lazy)"]}
  assert graph["vit_jax_fix.c"] == {"vit_jax_fix.sub.a": ["vit_jax_fix/c.py:3 (lazy)"]}
  assert cycles(graph) == [["vit_jax_fix.c", "vit_jax_fix.sub.a", "vit_jax_fix.sub.b"]]
  assert cycles(import_graph(tmp_path, lazy=False)) == []


def test_the_graph_is_read():
  graph = import_graph()
  assert len(graph) > 40 and "vit_jax_fix.models.zoo" in graph["vit_jax_fix.models.registry"]
  assert TRAINER + ".checkpoint" in graph[TRAINER + ".loop"]


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_no_import_cycle(lazy):
  graph = import_graph(lazy=lazy)
  found = cycles(graph)
  assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_libraries_never_import_the_trainer():
  found = upward_imports(import_graph())
  assert not found, "library modules importing vit_jax_fix.train:\n" + "\n".join(found)
