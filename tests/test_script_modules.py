"""Part of issue 12: inputs that used to give an unfused model with a report of
nothing to do, and the first call's imports."""
import subprocess
import sys

import pytest
import torch

from cli_models import SmallNet, calibrated
from fusion import analyze, fuse
from test_cli import run


def _scripted(kind):
    model = calibrated(SmallNet())
    x = torch.randn(1, 3, 8, 8)
    return (torch.jit.script(model) if kind == "script" else
            torch.jit.trace(model, x)), model


@pytest.mark.parametrize("kind", ["script", "trace"])
@pytest.mark.parametrize("call", ["fuse", "fuse_strict", "analyze"])
def test_a_torchscript_module_is_refused_with_what_to_do(kind, call):
    scripted, eager = _scripted(kind)
    fn = {"fuse": fuse, "fuse_strict": lambda m: fuse(m, strict=True),
          "analyze": analyze}[call]
    with pytest.raises(TypeError, match=r"model is a TorchScript module .*Fuse the "
                       r"eager model before torch.jit.script.*torch.jit.freeze"):
        fn(scripted)
    assert len(fuse(eager, return_report=True)[1].fused) == 2  # the control


@pytest.mark.slow
def test_the_cli_refuses_a_saved_torchscript_module(tmp_path):
    scripted, _ = _scripted("script")
    torch.jit.save(scripted, str(tmp_path / "scripted.pt"))
    proc = run("analyze", "scripted.pt", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "TorchScript module" in proc.stderr and "torch.jit.freeze" in proc.stderr


@pytest.mark.slow
def test_the_first_fuse_does_not_import_torchvision():
    code = ("import sys, torch; from torch import nn; import fusion; "
            "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(); "
            "r = fusion.fuse(m, return_report=True)[1]; "
            "print(len(r.fused), 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["1", "False"]
