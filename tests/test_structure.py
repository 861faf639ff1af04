"""The house rules of docs/DESIGN.md, read from the code itself: every import points down the
layers, and no function takes a long parameter list."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ticknorm"
# Ground floor first. A module may import its own floor and the floors below it, never above.
FLOORS = ("base", "ticks", "plugins", "runtime", "exporter", "profiler", "validate", "report", "api", "cli")
MAX_PARAMETERS = 8


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield ".".join(("ticknorm", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"), path


def floor_of(module: str) -> int:
    """`ticknorm.exporter.fusion.rewrite` -> exporter; `ticknorm` itself is the API's face."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "api"
    assert name in FLOORS, f"{module} sits on no floor of docs/DESIGN.md: add it to a layer"
    return FLOORS.index(name)


def imported_modules(tree: ast.AST, module: str) -> set[str]:
    """Every ticknorm module `tree` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if name == "ticknorm" or name.startswith("ticknorm.")} - {module}


def upward_imports() -> list[str]:
    upward = []
    for module, path in _modules():
        for target in imported_modules(ast.parse(path.read_text()), module):
            if floor_of(target) > floor_of(module):
                upward.append(f"{module} ({FLOORS[floor_of(module)]}) imports {target} ({FLOORS[floor_of(target)]})")
    return upward


def _signature_is_given(node: ast.FunctionDef) -> bool:
    """A Triton kernel's parameters are its ABI (TensorRT calls it in that order, scalars only) and
    a module's forward() parameters are the ONNX graph's inputs: neither can become an object."""
    jit = any("jit" in ast.unparse(decorator) for decorator in node.decorator_list)
    return jit or node.name == "forward"


def long_parameter_lists() -> list[tuple[int, str]]:
    found = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _signature_is_given(node):
                arguments = node.args
                names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
                names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
                count = len([n for n in names if n not in ("self", "cls")])
                found.append((count, f"{module}.{node.name}"))
    return sorted(found, reverse=True)


def test_every_import_points_down_the_layers():
    assert upward_imports() == []


def test_the_layering_check_sees_an_upward_import():
    tree = ast.parse("def f():\n    from ticknorm.report.figures import pyplot\n")
    importer = "ticknorm.validate.drift"
    assert [floor_of(t) > floor_of(importer) for t in imported_modules(tree, importer)] == [True]


def test_no_function_takes_more_than_eight_parameters():
    longest = long_parameter_lists()
    assert longest[0][0] <= MAX_PARAMETERS, [f"{name}: {count}" for count, name in longest if count > MAX_PARAMETERS]


def test_import_ticknorm_needs_only_numpy_and_onnx():
    import subprocess
    import sys

    blocked = ("torch", "onnxruntime", "polygraphy", "matplotlib", "click", "transformers", "triton", "tensorrt", "peft")
    code = ("import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
            + "import ticknorm\nprint(sorted(set(ticknorm.__all__) & {'export', 'compare', 'profile', 'report', "
              "'snapshot', 'check', 'fuse'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['check', 'compare', 'export', 'fuse', 'profile', 'report', 'snapshot']"
