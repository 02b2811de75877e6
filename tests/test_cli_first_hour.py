"""What a new user hit in the first hour with the command line and the tools
around the library, each through real subprocesses (as in test_cli.py)."""
import json
import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import cli_models
from conftest import rel_err
from fusion import apply_plan, fuse
from fusion.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from test_cli import REPO_README, run
from test_cli import files  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow  # each starts an interpreter that imports torch


def _error(proc):
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("fusion: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


def test_apply_plan_takes_the_report_file_fuse_writes(files):  # noqa: F811
    d, models, _ = files
    proc = run("fuse", "small.pt", "-o", "p.pt", "--report", "r.json", cwd=d)
    assert proc.returncode == EXIT_OK, proc.stderr
    fused_state = torch.load(d / "p.pt", weights_only=False).state_dict()
    text = (d / "r.json").read_text()
    x = torch.randn(2, 3, 8, 8)
    for given in (json.loads(text), text, json.loads(text)["plan"]):
        fresh = apply_plan(cli_models.SmallNet(), given)
        fresh.load_state_dict(fused_state)
        with torch.no_grad():
            assert rel_err(models["small"](x), fresh(x)) < 1e-5
    with pytest.raises(TypeError, match="not JSON"):
        apply_plan(cli_models.SmallNet(), "{not json")


def test_the_demo_on_a_model_whose_output_is_zero(tmp_path):
    """A random ViT's head is zero: its output is all zeros, fused or not."""
    proc = run("demo", "--models", "vit_b_16", "--repeats", "2", cwd=tmp_path,
               timeout=600)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "nan" not in proc.stdout
    assert "rel_err          n/a: " in proc.stdout and "all zeros" in proc.stdout


def test_factory_kwargs(tmp_path):
    proc = run("analyze", "cli_models:sized_net", "--factory-kwargs",
               '{"width": 6, "bias": false}', "--json", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)
    assert report["added"]["parameters"] == {"0.bias": 6}  # width 6, no bias of its own
    bad = run("analyze", "cli_models:sized_net", "--factory-kwargs", "[1, 2]",
              cwd=tmp_path)
    assert bad.returncode == EXIT_USAGE and "must be a JSON object" in bad.stderr
    missing = run("analyze", "cli_models:sized_net", cwd=tmp_path)
    assert missing.returncode == EXIT_USAGE
    assert "--factory-kwargs" in _error(missing)


def test_factory_kwargs_reach_a_real_detection_model(tmp_path):
    """The case that downloaded a backbone: weights_backbone=None builds it offline."""
    proc = run("analyze", "torchvision.models.detection:fasterrcnn_mobilenet_v3_large_fpn",
               "--factory-kwargs", '{"weights_backbone": null}', "--json", cwd=tmp_path,
               timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["fused"]) + len(report["left"]) == 46  # every BN accounted for


@pytest.mark.parametrize("spec,phrase", [
    ("1,5,8,8", "takes 3 input channels (dim 1) of torch.float32, and got a tensor of "
                "shape (1, 5, 8, 8)"),
    ("1,3,8,8:float64", "of torch.float32, and got a tensor of shape (1, 3, 8, 8) of "
                        "torch.float64"),
])
def test_inputs_that_do_not_fit_are_blamed_and_exit_2(files, spec, phrase):  # noqa: F811
    d, _, _ = files
    proc = run("fuse", "small.pt", "-o", "never.pt", "--example-input", spec, cwd=d)
    assert proc.returncode == EXIT_USAGE
    line = _error(proc)
    assert "conv1" in line and phrase in line and "do not fit" in line
    assert "reload its state_dict" not in line


def test_a_model_pickled_from_main_says_why_and_what_works(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class MyModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.conv(x))

        torch.save(MyModel(), "mine.pt")
    """))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    proc = run("analyze", "mine.pt", cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE
    line = _error(proc)
    assert "MyModel was defined in the script that saved it (module __main__)" in line
    assert "--weights" in line and "state_dict" in line
    assert "Can't get attribute" not in line


def test_a_factory_model_is_fused_without_a_training_note(tmp_path):
    proc = run("fuse", "cli_models:small_net", "-o", "f.pt", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "training mode" not in proc.stdout + proc.stderr


def test_strict_on_densenet_summarises_the_left_norms(tmp_path):
    proc = run("fuse", "torchvision.models:densenet121", "-o", "d.pt", "--strict",
               cwd=tmp_path, timeout=300)
    assert proc.returncode == EXIT_FAILED
    line = _error(proc)
    assert re.search(r"\d+ norm\(s\) would be left", line)
    assert re.search(r"\d+ not_after_producer \(features\.\S+, \S+, \S+ and \d+ more\)",
                     line), line
    assert len(line) < 600  # was 3.8 KB on one line


def test_a_run_that_leaves_norms_says_so_after_the_completed_line(files):  # noqa: F811
    d, _, _ = files
    proc = run("fuse", "unfusable.pt", "-o", "u.pt", cwd=d)
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stderr.splitlines()
    done = next(i for i, line in enumerate(lines) if "BatchNorm fusion completed" in line)
    assert "1 norm(s) were left unfused" in lines[done + 1]
    assert "post_relu_bn (not_after_producer)" in lines[done + 1]
    clean = run("fuse", "small.pt", "-o", "s.pt", cwd=d)
    assert "left unfused" not in clean.stderr  # the control


def test_a_bad_flag_prints_the_commands_own_usage(files):  # noqa: F811
    d, _, _ = files
    proc = run("fuse", "small.pt", "-o", "x.pt", "--no-such-flag", cwd=d)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.startswith("usage: fusion fuse ")
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_help_text_is_true_and_wide(tmp_path):
    analyze = run("analyze", "--help", cwd=tmp_path).stdout
    assert "feeds verification" not in analyze and "--factory-kwargs" in analyze
    fuse_help = run("fuse", "--help", cwd=tmp_path).stdout
    assert "feeds verification" in fuse_help
    # Help paragraphs use the width: the longest lines are well past 50 columns.
    assert max(len(line) for line in fuse_help.splitlines()) > 85


def test_the_readme_documents_every_option(tmp_path):
    readme = REPO_README.read_text()
    for command in ("fuse", "analyze", "demo"):
        text = run(command, "--help", cwd=tmp_path).stdout
        for option in sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)) -
                             {"--help", "--no-verify"}):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", readme), \
                (command, option)


def test_fusing_under_inference_mode_says_what_it_gives(caplog):
    model = cli_models.calibrated(cli_models.SmallNet())
    with caplog.at_level(logging.WARNING, logger="fusion"), torch.inference_mode():
        fused, report = fuse(model, return_report=True)
    assert any("inference_mode" in n for n in report.notes)
    assert any("inference_mode" in r.getMessage() for r in caplog.records)
    assert fused.conv1.weight.is_inference()
    _, plain = fuse(model, return_report=True)  # the control
    assert not any("inference_mode" in n for n in plain.notes)
    assert isinstance(fused.bn1, nn.Identity)
