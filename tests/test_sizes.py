"""Small modules and functions (issue 27): no module in comigs_jax/ or experiments/ over 450 lines,
no function over 80; a reader finds one thing per module and a function fits a screen."""
import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def oversized(paths) -> list[str]:
    """'path: N lines' for each module over MAX_MODULE_LINES, 'path:line name: N lines' for each
    function (nested ones too) over MAX_FUNCTION_LINES."""
    out = []
    for path in paths:
        src = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, REPO)
        if len(src.splitlines()) > MAX_MODULE_LINES:
            out.append(f"{rel}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_module_or_function_is_too_long():
    paths = [p for d in ("comigs_jax", "experiments") for p in glob.glob(os.path.join(REPO, d, "**", "*.py"),
                                                                          recursive=True)]
    assert len(paths) > 40
    assert oversized(paths) == []


def test_the_check_sees_a_long_function_and_module(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    (tmp_path / "short.py").write_text("def g():\n    return 1\n")
    found = oversized([str(tmp_path / "long.py"), str(tmp_path / "short.py")])
    assert len(found) == 2 and found[1].endswith("f: 81 lines") and "short" not in " ".join(found)
