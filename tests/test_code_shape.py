"""The code's shape stays readable: short functions, calls that name their arguments, small CLI modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedstore"
MAX_FUNCTION_LINES = 80
MAX_POSITIONAL_ARGUMENTS = 8  # past this, two swapped values of one type pass silently
MAX_CLI_MODULE_LINES = 300


def package_modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text(), filename=str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def long_functions(modules: dict[str, ast.Module]) -> list[str]:
    return [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in modules.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def crowded_calls(modules: dict[str, ast.Module]) -> list[str]:
    return [f"{name}:{node.lineno} ({len(node.args)} positional)" for name, tree in modules.items()
            for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL_ARGUMENTS]


def test_no_function_is_longer_than_80_lines():
    assert long_functions(package_modules()) == []


def test_no_call_passes_more_than_8_positional_arguments():
    assert crowded_calls(package_modules()) == []


def test_every_cli_module_is_small():
    large = {path.name: n for path in (PACKAGE / "cli").glob("*.py")
             if (n := len(path.read_text().splitlines())) > MAX_CLI_MODULE_LINES}
    assert not large, large


def test_the_checks_find_a_long_function_and_a_crowded_call():
    made_up = {"made_up.py": ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
                                       + "    g(1, 2, 3, 4, 5, 6, 7, 8, 9)\n    g(1, 2, 3, 4, 5, 6, 7, 8)\n")}
    assert long_functions(made_up) == ["made_up.py:1 f (83 lines)"]
    assert crowded_calls(made_up) == ["made_up.py:82 (9 positional)"]
