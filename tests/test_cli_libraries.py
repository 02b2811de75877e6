"""The CLI with model-library sources (``timm:NAME``, ``yolo:NAME``), run as a
user runs it: real subprocesses of ``python -m fusion``, with the variables that
keep ultralytics off the network removed from their environment, so that it is
the CLI that sets them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_whole

TESTS = Path(__file__).resolve().parent


def run(*args, cwd, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HOME": str(cwd)})
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-P", "-m", "fusion"] + [str(a) for a in args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_fuse_a_timm_model_by_name_with_weights(tmp_path):
    timm = pytest.importorskip("timm")
    from zoo import calibrate

    model = calibrate(timm.create_model("mobilenetv3_small_050", pretrained=False),
                      shape=(2, 3, 96, 96))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = run("fuse", "timm:mobilenetv3_small_050", "--weights", "w.pt", "-o", "fused.pt",
              "--example-input", "1,3,96,96", "--strict", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert not report["left"] and report["fused"]
    assert any(p["replaced_by"].startswith("Sequential(") for p in report["fused"])
    fused = load_whole(tmp_path / "fused.pt")
    assert type(fused).__name__ == type(model).__name__
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want, got = model.eval()(x), fused(x)
    assert float((got - want).norm() / want.norm()) <= report["verification"]["tolerance"]


@pytest.mark.slow
def test_analyze_a_yolo_model_by_name_offline(tmp_path):
    pytest.importorskip("ultralytics")
    out = run("analyze", "yolo:yolov8n", "--example-input", "1,3,64,64", "--json",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["evidence"] == ["recorded"]  # its forward does not trace
    assert len(report["fused"]) == 57 and not report["left"]
    # ultralytics wrote its settings under the CLI's own directory, in HOME here
    assert (tmp_path / ".cache" / "fusion" / "ultralytics").is_dir()


def test_library_name_errors_are_one_line_usage_errors(tmp_path):
    pytest.importorskip("timm")
    out = run("analyze", "timm:no_such_net", cwd=tmp_path)
    assert out.returncode == 2
    assert "timm has no model 'no_such_net'" in out.stderr and "Traceback" not in out.stderr
    out = run("analyze", "timm:", cwd=tmp_path)
    assert out.returncode == 2 and "name a model after timm:" in out.stderr


def test_yolo_name_without_ultralytics_says_what_to_install(tmp_path):
    # A directory that shadows ultralytics with a module that cannot import.
    (tmp_path / "ultralytics").mkdir()
    (tmp_path / "ultralytics" / "__init__.py").write_text("raise ImportError('absent')\n")
    out = run("analyze", "yolo:yolov8n", cwd=tmp_path,
              env_extra={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2
    assert "needs ultralytics" in out.stderr and "fusion[models]" in out.stderr


@pytest.mark.slow
def test_demo_takes_timm_and_yolo_names(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("ultralytics")
    out = run("demo", "timm:mobilenetv3_small_050", "--models", "yolo:yolov8n",
              "--repeats", "2", "--threads", "1", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    table = out.stdout.strip().splitlines()[-2:]
    assert table[0].split()[:3] == ["timm:mobilenetv3_small_050", "34", "0"]
    assert table[1].split()[:3] == ["yolo:yolov8n", "57", "0"]


def test_demo_names_a_missing_timm_model(tmp_path):
    pytest.importorskip("timm")
    out = run("demo", "timm:no_such_net", cwd=tmp_path)
    assert out.returncode == 2 and "timm has no model 'no_such_net'" in out.stderr
