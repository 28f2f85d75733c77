"""The layers of docs/architecture.md: every import (module level or inside a function) points
down, never up. A module may import from its own layer or any layer below it."""
import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module belongs to the first layer one of whose prefixes it starts with.
LAYERS = [
    ("foundation", ("comigs_jax.errors", "comigs_jax.distributed", "comigs_jax.extras")),
    ("model", ("comigs_jax.model",)),
    ("data", ("comigs_jax.data",)),
    ("federation", ("comigs_jax.federated",)),
    ("training", ("comigs_jax.train",)),
    ("loop", ("comigs_jax.configuration", "comigs_jax.capacity", "comigs_jax.experiment", "comigs_jax.cli",
              "comigs_jax")),
    ("entry points", ("experiments", "configs")),
]


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if layer_of(f"{base}.{a.name}") is not None else base)
                    for a in node.names]
    return out


def test_every_module_has_a_layer():
    paths = glob.glob(os.path.join(REPO, "comigs_jax", "**", "*.py"), recursive=True)
    assert paths
    for path in paths:
        assert layer_of(_module_name(path)) is not None, path


def test_imports_point_down_only():
    violations = []
    for sub in ("comigs_jax", "experiments", "configs"):
        for path in glob.glob(os.path.join(REPO, sub, "**", "*.py"), recursive=True):
            module = _module_name(path)
            own = layer_of(module)
            for line, target in _imports(path, module):
                other = layer_of(target)
                if other is not None and other > own:
                    violations.append(f"{os.path.relpath(path, REPO)}:{line} ({LAYERS[own][0]}) imports {target} "
                                      f"({LAYERS[other][0]})")
    assert not violations, "\n".join(violations)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker finds imports inside functions and relative ones (else the test above proves nothing)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from comigs_jax.experiment import loop\n    from ..train import rounds\n")
    found = [t for _, t in _imports(str(p), "comigs_jax.federated.m")]
    assert "comigs_jax.experiment.loop" in found and "comigs_jax.train.rounds" in found
    assert layer_of("comigs_jax.experiment.loop") > layer_of("comigs_jax.federated.m")
