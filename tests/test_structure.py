"""The boundaries README.md's "How it is built" names, as tests: who may import whom, no function longer than a
screen or two, and a README that documents every flag of every command."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"rehead.convert": ROOT / "convert", "rehead.tune": ROOT / "tune", "rehead.eval": ROOT / "eval"}
LAYOUT_DEPENDENCIES = {"torch", "transformers", "huggingface_hub"}  # huggingface_hub: transformers' own dependency
LONGEST_FUNCTION = 80


def imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (function-level imports too), relative ones resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module)
    return found


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_layout_files_import_only_torch_and_transformers():
    files = sorted((ROOT / "rehead" / "layouts").glob("*_*.py"))
    assert {p.name for p in files} >= {"configuration_moh.py", "modeling_moh.py", "modeling_stack.py"}
    for path in files:
        for module in imports(path, "rehead.layouts"):
            top = module.split(".")[0]
            assert top in LAYOUT_DEPENDENCIES or top in sys.stdlib_module_names or module.startswith(
                "rehead.layouts."), f"{path.name} imports {module}: it travels inside checkpoints"


def test_the_core_imports_no_stage_and_no_composition():
    core = [p for p in (ROOT / "rehead").glob("*.py") if p.name != "__main__.py"]  # `python -m rehead` is the CLI
    core += sorted((ROOT / "rehead" / "families").glob("*.py"))
    assert any(p.name == "checkpoint.py" for p in core)
    for path in core:
        for module in imports(path, "rehead"):
            assert not within(module, [*STAGES, "rehead.app"]), f"rehead/{path.name} imports {module}"


def test_stages_do_not_import_each_other():
    for stage, folder in STAGES.items():
        others = [s for s in STAGES if s != stage] + ["rehead.app"]
        for path in folder.glob("*.py"):
            for module in imports(path, stage):
                assert not within(module, others), f"{stage} ({path.name}) imports {module}"


def test_no_function_outside_the_tests_is_longer_than_80_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        if "tests" in path.relative_to(ROOT).parts or any(part.startswith(".") for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split into named steps: " + "; ".join(long)


def command_sections(readme: str) -> dict[str, str]:
    """README's section of each command: from its heading (### `rehead NAME ...`) to the next heading."""
    return {m[1]: m[0] for m in re.finditer(r"^### `rehead ([\w-]+).*?(?=^##|\Z)", readme, re.M | re.S)}


def named(option: str, text: str) -> bool:
    return re.search(re.escape(option) + r"(?![\w-])", text) is not None  # --calib is not named by --calib-seed


def test_the_readme_documents_every_flag_of_every_command():
    import argparse

    from rehead.app.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    sections = command_sections(readme)
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"rehead {name}: no section" for name in commands.choices if name not in sections]
    for name, command in commands.choices.items():
        options = {o for action in command._actions for o in action.option_strings if o.startswith("--")}
        missing += [f"rehead {name} {o}" for o in sorted(options - {"--help"}) if not named(o, sections.get(name, ""))]
    overview = readme[readme.index("## What it does"):readme.index("### `rehead")]
    options = {o for action in parser._actions for o in action.option_strings}
    missing += [f"rehead {o}" for o in sorted(options - {"-h", "--help"}) if not named(o, overview)]
    assert not missing, f"README lacks {missing}"
