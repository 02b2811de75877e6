"""The documented tables (REASONS, ERRORS) cover every code the package can give,
the README lists them, and the library does not import its demo support."""
import ast
import os
import re
import subprocess
import sys

import fusion
from fusion import ERRORS, REASONS

PACKAGE = os.path.dirname(fusion.__file__)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["api", "plan", "discover", "rewrite", "verify", "layers", "report", "errors"]


def _sources():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    yield path, f.read()


def _fusion_error_codes():
    """The literal codes of every FusionError(message, layer, code) in the package."""
    found = set()
    for _, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == \
                    "FusionError" and len(node.args) == 3 and \
                    isinstance(node.args[2], ast.Constant):
                found.add(node.args[2].value)
    return found


def _core_codes():
    """The codes fusion._C's FoldError carries (module.c), passed on by rewrite."""
    with open(os.path.join(REPO, "csrc", "module.c")) as f:
        text = f.read()
    codes = set(re.findall(r'return "([a-z]+)";', text.split("status_code", 1)[1]
                           .split("}\n}", 1)[0]))
    codes |= set(re.findall(r'code = "([a-z]+)";', text))
    return codes - {"unknown"}


def test_every_fusion_error_code_is_documented():
    codes = _fusion_error_codes()
    assert {"shape", "verify", "strict", "meta"} <= codes  # the scan sees them
    assert codes <= set(ERRORS), sorted(codes - set(ERRORS))


def test_every_core_code_is_documented():
    codes = _core_codes()
    assert {"nonfinite", "variance", "overflow", "shape", "device"} <= codes
    assert codes <= set(ERRORS), sorted(codes - set(ERRORS))


def test_the_readme_lists_every_reason_and_error_code():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for code in list(REASONS) + list(ERRORS):
        assert re.search(rf"^\| `{code}` \|", readme, re.M), code


def test_the_core_modules_never_import_the_demo_support():
    for name in CORE:
        with open(os.path.join(PACKAGE, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "_tools" not in (node.module or ""), name
            elif isinstance(node, ast.Import):
                assert not any("_tools" in a.name for a in node.names), name
    out = subprocess.run([sys.executable, "-P", "-c", "import sys, fusion; "
                          "print(sorted(m for m in sys.modules if m.startswith('fusion._tools')))"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
