"""The package's import graph, read from the source (ast, nothing executed): no circle,
and the model code knows nothing of command lines, strategies, files or data.

Every import counts, those inside functions too: a lazy import that dodges a circle
at import time is still a circle in the design."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deeplab_tf"

# The model code (layers, backbones, variants, the model builders) ...
MODEL_CODE = ("layers", "backbones", "model", "variants", "multiscale")
# ... must not import these modules of the package (nor anything below them) ...
FORBIDDEN_FOR_MODEL_CODE = (
    "data", "training", "evaluation", "export", "cli", "prediction", "inference",
    "crf_tuning", "files", "console",
)  # fmt: skip
# ... nor these of the outside world (tf.distribute as an attribute too).
FORBIDDEN_MODULES = ("argparse", "tensorflow.distribute")


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules of the package, other modules) imported anywhere in the file. ``from P
    import X`` counts as importing the module P.X where there is one, else P."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        elif isinstance(node, ast.Attribute) and ast.unparse(node) == "tf.distribute":
            targets = ["tensorflow.distribute"]
        else:
            continue
        for target in targets:
            (inside if target in modules else outside).add(target)
    inside.discard(name)
    return inside, outside


def import_graph(package: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = module_files(package)
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(name, path, modules)
    return graph, external


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def model_code_violations(graph, external) -> list[str]:
    model = tuple(f"deeplab_tf.{m}" for m in MODEL_CODE)
    banned = tuple(f"deeplab_tf.{m}" for m in FORBIDDEN_FOR_MODEL_CODE)
    found = []
    for name in sorted(graph):
        if is_under(name, model):
            found += [f"{name} -> {t}" for t in sorted(graph[name]) if is_under(t, banned)]
            found += [
                f"{name} -> {t}" for t in sorted(external[name]) if is_under(t, FORBIDDEN_MODULES)
            ]
    return found


def test_the_package_imports_without_a_circle():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 40  # the walk found the package
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_model_code_imports_no_cli_strategy_file_or_data_module():
    graph, external = import_graph(PACKAGE)
    assert "deeplab_tf.layers" in graph and "deeplab_tf.backbones.resnet" in graph
    assert model_code_violations(graph, external) == []


def test_the_checks_find_what_they_are_for(tmp_path):
    """The walk on a small package written here: a lazy circle through a function-level
    import and a model module that imports argparse, training and tf.distribute."""
    package = tmp_path / "deeplab_tf"
    (package / "backbones").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "crf.py": "def save():\n    from deeplab_tf.training import write\n",
        "training.py": "from deeplab_tf import evaluation\n",
        "evaluation.py": "from .crf import refine\n",
        "backbones/__init__.py": "",
        "backbones/resnet.py": (
            "import argparse\nimport tensorflow as tf\nfrom deeplab_tf import training\n"
            "STRATEGY = tf.distribute.MirroredStrategy\n"
        ),
        "layers.py": "import tensorflow as tf\nfrom deeplab_tf import crf\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph, external = import_graph(package)
    circle = find_circle(graph)
    assert circle is not None and set(circle) == {
        "deeplab_tf.crf",
        "deeplab_tf.training",
        "deeplab_tf.evaluation",
    }
    assert model_code_violations(graph, external) == [
        "deeplab_tf.backbones.resnet -> deeplab_tf.training",
        "deeplab_tf.backbones.resnet -> argparse",
        "deeplab_tf.backbones.resnet -> tensorflow.distribute",
    ]


# A module past this many lines holds several jobs (issue 18 split the four that were).
MAX_MODULE_LINES = 600


def test_no_module_of_the_package_is_over_the_limit():
    sizes = {p: len(p.read_text().splitlines()) for p in module_files(PACKAGE).values()}
    too_long = {str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert too_long == {}
