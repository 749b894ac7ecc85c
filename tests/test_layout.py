"""The layout's limits (docs/architecture.md): no module over 500 lines, no function over 80."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_module_or_function_over_its_limit():
    spec = importlib.util.spec_from_file_location("code_sizes", ROOT / "benchmarks/code_sizes.py")
    code_sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code_sizes)
    modules, functions = code_sizes.sizes(ROOT / "src/saeflow")
    assert modules and functions
    assert [m for m in modules if m[0] > code_sizes.MODULE_LIMIT] == []
    assert [f for f in functions if f[0] > code_sizes.FUNCTION_LIMIT] == []
