"""Module and function sizes of src/saeflow against the layout's limits (issue 27): no module
over 500 lines, no function over 80. Prints the largest of each and every one over its limit;
exits 1 when any is over.

    python benchmarks/code_sizes.py [src/saeflow]
"""
import ast
import pathlib
import sys

MODULE_LIMIT, FUNCTION_LIMIT = 500, 80


def sizes(root: pathlib.Path):
    modules, functions = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        modules.append((len(text.splitlines()), str(path)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1,
                                  f"{path}:{node.lineno} {node.name}"))
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src/saeflow")
    modules, functions = sizes(root)
    over = [m for m in modules if m[0] > MODULE_LIMIT] + \
        [f for f in functions if f[0] > FUNCTION_LIMIT]
    print(f"largest module: {modules[0][1]} ({modules[0][0]} lines)")
    print(f"largest function: {functions[0][1]} ({functions[0][0]} lines)")
    for n, where in over:
        print(f"over the limit: {where} ({n} lines)")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
