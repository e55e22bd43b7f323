"""What every script shares: the plumbing block and the shared Args fields, word for word; every flag
documented; the README's test command is CI's."""

import ast
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

TRAINERS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py", "grpo.py"]
SCRIPTS = TRAINERS + ["evaluate.py"]


def source(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read()


def between(text, start, end):
    """The text from the first line starting with `start` through the first line after it starting with `end`."""
    i = text.index(start)
    return text[i : text.index(end, i) + len(end)]


@pytest.mark.parametrize("script", TRAINERS[1:])
def test_plumbing_and_shared_args_are_the_same_text_everywhere(script):
    """The copies of the set-up repeated across scripts do not drift apart (the N+ details code's did)."""
    for start, end in (
        ("# ---- plumbing", "# ---- end of plumbing ----"),
        ("@dataclass\nclass Args:", "# ---- model, data"),
    ):
        assert between(source(script), start, end) == between(source("sft.py"), start, end), (script, start)


def test_a_function_of_one_name_is_one_function():
    """A helper (function or class) copied into several scripts (single files, each self-contained) is the same
    text in each: copies that drift apart, or two helpers that share a name but not a meaning, fail here. Each
    script's Args is its own."""
    seen = {}
    for script in SCRIPTS:
        text = source(script)
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "Args":
                seen.setdefault(node.name, {})[script] = ast.get_source_segment(text, node)
    for name, copies in seen.items():
        assert len(set(copies.values())) == 1, f"{name} differs between {sorted(copies)}"


def test_the_plumbing_block_stays_small():
    assert len(between(source("sft.py"), "# ---- plumbing", "# ---- end of plumbing ----").splitlines()) <= 75


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_args_field_has_a_docstring(script):
    body = next(n for n in ast.parse(source(script)).body if isinstance(n, ast.ClassDef) and n.name == "Args").body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and "Suppress" not in ast.unparse(node.annotation):
            assert i + 1 < len(body) and isinstance(body[i + 1], ast.Expr), (
                f"{script}: {node.target.id} has no docstring"
            )


def test_every_flag_has_help():
    """--help shows every field's docstring (tyro reads them) and no derived value."""
    body = next(n for n in ast.parse(source("sft.py")).body if isinstance(n, ast.ClassDef) and n.name == "Args").body
    out = subprocess.run(
        [sys.executable, "sft.py", "--help"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="400"),
    ).stdout
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign):
            continue
        flag = "--" + node.target.id.replace("_", "-")
        if "Suppress" in ast.unparse(node.annotation):
            assert flag not in out  # derived values are not flags
        else:
            assert flag in out and " ".join(body[i + 1].value.value.split()[:4]) in " ".join(out.split()), flag


def test_ci_runs_the_readme_test_command():
    readme, ci = source("README.md"), source(os.path.join(".ci", "run"))
    commands = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert any("python -m pytest tests" in c for c in commands) and "python -m pytest tests" in ci
