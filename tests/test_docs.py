"""The README's generated parts agree with what generates them."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- begin benchmarks/results/README-table.md -->\n"
END = "<!-- end benchmarks/results/README-table.md -->"


def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def test_readme_benchmark_block_is_the_generated_table():
    readme = _read("README.md")
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == _read("benchmarks", "results", "README-table.md")


def test_pyproject_keeps_a_floor_on_torch_and_no_cap():
    text = _read("pyproject.toml")
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    assert deps.strip() == '"torch>=1.13.0a0"'
    assert re.search(r'^requires-python = ">=3.10"', text, re.M)
    build = re.search(r"^requires = \[(.*?)\]", text, re.M | re.S).group(1)
    assert "torch" not in build  # build isolation would fetch a multi-GB torch
