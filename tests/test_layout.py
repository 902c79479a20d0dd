"""Imports run one way: the library and the benchmarks never import the command-line scripts."""

import ast

from conftest import ROOT

SCRIPTS = {"train_conditional_ddpm", "distill_conditional_ddpm", "evaluate_iclevr"}
# A benchmark that must resolve the training flags exactly as the script does may take its parser, and nothing else.
ALLOWED = {("benchmarks/gpu_check.py", "train_conditional_ddpm", "parse_args")}


def imported_names(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield from ((node.module, alias.name) for alias in node.names)


def test_the_library_and_the_benchmarks_import_no_script():
    wrong = []
    for path in sorted([*(ROOT / "cond_ddpm").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        where = str(path.relative_to(ROOT))
        for module, name in imported_names(path):
            if module.split(".")[0] in SCRIPTS and (where, module, name) not in ALLOWED:
                wrong.append(f"{where} imports {module}{f'.{name}' if name else ''}")
    assert not wrong, wrong


def test_the_scripts_import_no_other_script():
    """What two scripts share lives in cond_ddpm (the training machinery in cond_ddpm/training)."""
    wrong = [
        f"{script}.py imports {module}"
        for script in sorted(SCRIPTS)
        for module, _ in imported_names(ROOT / f"{script}.py")
        if module.split(".")[0] in SCRIPTS - {script}
    ]
    assert not wrong, wrong


def test_the_pipeline_file_imports_nothing_of_this_project():
    """It is each saved pipeline's remote code: it must load where only diffusers is installed."""
    project = SCRIPTS | {"cond_ddpm", "app"}
    imports = [module for module, _ in imported_names(ROOT / "pipeline_cond_ddpm.py")]
    assert not [module for module in imports if module.split(".")[0] in project]
