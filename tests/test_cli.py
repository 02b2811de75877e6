"""The ``fusion`` command: real subprocesses for each command and exit code, and
in-process calls of ``fusion.cli.main`` for the many small argument cases.

Models are pickled from tests/cli_models.py, which the subprocesses import
through PYTHONPATH, as a user's own model module would be.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cli_models
from conftest import load_whole
from fusion.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main, make_example_inputs, \
    parse_example_input

TESTS = Path(__file__).resolve().parent
REPO_README = TESTS.parent / "README.md"
CONSOLE = Path(sys.executable).parent / "fusion"


def _env():
    env = dict(os.environ)
    # The installed fusion, never the source tree's (which holds no extension).
    paths = [str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["OPENBLAS_NUM_THREADS"] = "1"  # two shared cores; keep each process to one
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(*args, cwd, console=False, timeout=180):
    """Runs ``python -m fusion ARGS`` (or the console script) and returns the result."""
    cmd = [str(CONSOLE)] if console else [sys.executable, "-m", "fusion"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fusion: error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def _rel_err(reference, output):
    return float((output.double() - reference.double()).norm() / reference.double().norm())


def _x(*shape, seed=5):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Models, weights and inputs saved with torch.save, and the originals."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(1)
    models = {
        "small": cli_models.calibrated(cli_models.SmallNet(), seed=1),
        "unfusable": cli_models.calibrated(cli_models.UnfusableNet(), seed=2),
        "linear": cli_models.calibrated(cli_models.LinearNet(), seed=3),
        "two": cli_models.calibrated(cli_models.TwoInputNet(), seed=4),
        "list": cli_models.calibrated(cli_models.ListInputNet(), seed=5),
    }
    for name, model in models.items():
        torch.save(model, d / f"{name}.pt")
    weighted = cli_models.calibrated(cli_models.small_net(), seed=7)
    torch.save(weighted.state_dict(), d / "weights.pt")
    torch.save((_x(1, 3, 5, 5), torch.tensor(2.0)), d / "two_in.pt")
    torch.save([_x(3, 6, 6), _x(3, 6, 6, seed=6)], d / "list_in.pt")
    (d / "garbage.pt").write_text("this is not a torch file\n")
    return d, models, weighted


# --- Subprocesses: each command and exit code ----------------------------------------
# Each starts a Python that imports torch (about 3 s here), hence "slow"; they are
# still part of `make test`.


@pytest.mark.slow
def test_fuse_saved_model_verify_and_reload(files):
    d, models, _ = files
    proc = run("fuse", "small.pt", "-o", "out.pt", "--example-input", "1,3,16,16",
               "--verify", "--report", "report.json", cwd=d)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "BatchNorm fusion completed. 20 parameters were reduced after fusion." \
        in proc.stderr
    assert "saved the fused model to out.pt" in proc.stdout
    for norm in ("bn1", "bn2"):
        assert f"fused   {norm}" in proc.stdout
    report = json.loads((d / "report.json").read_text())
    assert report["verification"]["rel_err"] <= report["verification"]["tolerance"]
    fused = load_whole(d / "out.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert isinstance(fused.bn1, nn.Identity) and fused.conv1.bias is not None
    x = _x(3, 3, 12, 12)  # not the input verification ran on
    with torch.no_grad():
        err = _rel_err(models["small"](x), fused(x))
    assert err < 1e-5
    assert sum(p.numel() for p in models["small"].parameters()) - \
        sum(p.numel() for p in fused.parameters()) == report["parameters_reduced"] == 20


@pytest.mark.slow
def test_console_script_factory_with_weights_and_json(files):
    if not CONSOLE.exists():
        pytest.skip(f"no console script at {CONSOLE} (install the package)")
    d, _, weighted = files
    proc = run("fuse", "cli_models:small_net", "--weights", "weights.pt", "-o",
               "factory_out.pt", "--example-input", "2,3,8,8", "--json", cwd=d,
               console=True)
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    assert report["schema_version"] == 1 and report["dry_run"] is False
    assert sorted((p["norm"], p["layer"]) for p in report["fused"]) == \
        [("bn1", "conv1"), ("bn2", "conv2")]
    assert report["left"] == []
    assert report["added"]["parameters"] == {"conv1.bias": 8}
    assert report["verification"]["rel_err"] <= report["verification"]["tolerance"]
    fused = load_whole(d / "factory_out.pt")
    x = _x(2, 3, 10, 10)
    with torch.no_grad():
        # The weights file, not the factory's own random weights, were fused.
        assert _rel_err(weighted(x), fused(x)) < 1e-5


@pytest.mark.slow
def test_analyze_json_is_a_dry_run(files):
    d, models, _ = files
    before = {k: v.clone() for k, v in models["unfusable"].state_dict().items()}
    proc = run("analyze", "unfusable.pt", "--json", cwd=d)
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True
    assert [p["norm"] for p in report["fused"]] == ["bn"]
    assert [(n["norm"], n["reason"]) for n in report["left"]] == \
        [("post_relu_bn", "not_after_producer")]
    assert report["removed"]["parameters"] == {"bn.weight": 4, "bn.bias": 4}
    after = load_whole(d / "unfusable.pt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_strict_with_an_unfusable_norm_exits_1(files):
    d, _, _ = files
    proc = run("fuse", "unfusable.pt", "-o", "strict_out.pt", "--strict", cwd=d)
    assert proc.returncode == EXIT_FAILED
    line = _one_line_error(proc)
    assert "post_relu_bn" in line and "not_after_producer" in line
    assert not (d / "strict_out.pt").exists()


@pytest.mark.slow
def test_verification_beyond_tolerance_exits_1(files):
    d, _, _ = files
    proc = run("fuse", "linear.pt", "-o", "tight.pt", "--example-input", "4,3",
               "--rtol", "1e-30", cwd=d)
    assert proc.returncode == EXIT_FAILED
    line = _one_line_error(proc)
    assert "verification failed" in line and "fc" in line
    assert not (d / "tight.pt").exists()


@pytest.mark.slow
def test_unreadable_file_exits_2_naming_it(files):
    d, _, _ = files
    proc = run("fuse", "garbage.pt", "-o", "never.pt", cwd=d)
    assert proc.returncode == EXIT_USAGE
    assert "garbage.pt" in _one_line_error(proc)
    assert proc.stdout == ""


@pytest.mark.slow
def test_debug_shows_the_traceback(files):
    d, _, _ = files
    proc = run("analyze", "garbage.pt", "--debug", cwd=d)
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fusion: error: garbage.pt")


@pytest.mark.slow
def test_bad_flag_exits_2(files):
    d, _, _ = files
    proc = run("fuse", "small.pt", "-o", "x.pt", "--no-such-flag", cwd=d)
    assert proc.returncode == EXIT_USAGE
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


@pytest.mark.slow
def test_demo_runs_and_prints_latency(tmp_path):
    proc = run("demo", "--models", "resnet18", "--repeats", "3", "--threads", "1",
               cwd=tmp_path, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr
    out = proc.stdout
    assert "torch " in out and "1 thread(s)" in out and out.count("BLAS:") == 1
    assert "BLAS_INFO" not in out  # one truthful line, not torch's raw config beside it
    assert "pairs fused      20:" in out and "norms left       0" in out
    # the figures first, then the pairs, grouped by top-level module
    assert out.index("rel_err") < out.index("latency, batch 1") < out.index("pairs fused")
    assert "conv1+bn1" in out and "layer4.*: 5" in out and "(--verbose lists" in out
    assert "layer4.1.conv2+layer4.1.bn2" not in out
    assert "removed 9,600 in 40 tensors" in out
    assert " ms -> " in out
    rel = float(out.split("rel_err", 1)[1].split()[0])
    assert 0 < rel < 1e-4
    verbose = run("demo", "--models", "resnet18", "--repeats", "2", "--verbose",
                  cwd=tmp_path, timeout=300)
    assert verbose.returncode == EXIT_OK, verbose.stderr
    assert "layer4.1.conv2+layer4.1.bn2" in verbose.stdout
    assert "layer4.*" not in verbose.stdout


# --- In process: argument handling ------------------------------------------------------


def _main(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["fuse", "analyze", "demo"])
def test_help_has_examples(capsys, command):
    code, out, _ = _main(capsys, command, "--help")
    assert code == EXIT_OK
    assert "examples:" in out and f"fusion {command}" in out
    if command != "demo":
        assert "trust" in out and "weights_only" in out


def test_no_command_is_a_usage_error(capsys):
    code, _, err = _main(capsys)
    assert code == EXIT_USAGE and "usage: fusion" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--rtol", "0", "must be positive"),
    ("--rtol", "abc", "not a number"),
    ("--example-input", "1,x,3", "comma-separated integers"),
    ("--example-input", "1,3:int64", "unknown dtype"),
])
def test_bad_values_are_usage_errors(capsys, flag, value, needle):
    code, out, err = _main(capsys, "fuse", "model.pt", "-o", "out.pt", flag, value)
    assert code == EXIT_USAGE and needle in err and out == ""


def test_parse_example_input():
    assert parse_example_input("1,3,224,224") == ((1, 3, 224, 224), torch.float32)
    assert parse_example_input("2,8:float16") == ((2, 8), torch.float16)
    assert parse_example_input("4:bf16") == ((4,), torch.bfloat16)
    for bad in ("", "1,a", "1,0,3", "1,-2", "1,3:int8", "1,3:"):
        if bad == "1,3:":
            assert parse_example_input(bad) == ((1, 3), torch.float32)
            continue
        with pytest.raises(Exception) as info:
            parse_example_input(bad)
        assert type(info.value).__name__ == "ArgumentTypeError"


def test_example_inputs_are_seeded_and_follow_fuses_convention():
    one = make_example_inputs([((1, 3, 4, 4), torch.float16)], None)
    assert isinstance(one, torch.Tensor) and one.dtype == torch.float16
    again = make_example_inputs([((1, 3, 4, 4), torch.float16)], None)
    assert torch.equal(one, again)
    two = make_example_inputs([((1, 3), torch.float32), ((2,), torch.float64)], None)
    assert isinstance(two, tuple) and [t.shape for t in two] == [(1, 3), (2,)]
    assert make_example_inputs(None, None) is None


@pytest.mark.parametrize("saved,inputs", [("two", "two_in.pt"), ("list", "list_in.pt")])
def test_example_inputs_file_tuple_and_list(capsys, files, saved, inputs):
    d, models, _ = files
    code, out, err = _main(capsys, "fuse", d / f"{saved}.pt", "-o", d / f"{saved}_f.pt",
                           "--example-inputs", d / inputs, "--json")
    assert code == EXIT_OK, err
    report = json.loads(out)
    assert [p["norm"] for p in report["fused"]] == ["bn"]
    assert report["evidence"][-1] == "recorded" and report["verification"] is not None
    args = torch.load(d / inputs)
    args = args if isinstance(args, tuple) else (args,)
    with torch.no_grad():
        assert _rel_err(models[saved](*args), load_whole(d / f"{saved}_f.pt")(*args)) < 1e-5


def test_analyze_prints_the_table(capsys, files):
    d, _, _ = files
    code, out, _ = _main(capsys, "analyze", d / "unfusable.pt")
    assert code == EXIT_OK
    assert "would fuse 1 norm(s), left 1" in out
    assert "post_relu_bn" in out and "not_after_producer" in out
    assert "parameters to remove: 8 in 2 tensors" in out
    assert "buffers to remove:" in out


def test_quiet_prints_nothing(capsys, files):
    d, _, _ = files
    code, out, err = _main(capsys, "fuse", d / "small.pt", "-o", d / "quiet.pt", "-q")
    assert code == EXIT_OK and out == "" and err == ""
    assert (d / "quiet.pt").exists()


def test_inplace_load_gives_the_same_model(capsys, files):
    d, _, _ = files
    for flag, out in (([], "copy.pt"), (["--inplace-load"], "inplace.pt")):
        code, _, err = _main(capsys, "fuse", d / "small.pt", "-o", d / out, "-q",
                             "--example-input", "1,3,8,8", *flag)
        assert code == EXIT_OK, err
    a, b = load_whole(d / "copy.pt").state_dict(), load_whole(d / "inplace.pt").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_fuse_leaves_an_existing_output_alone(capsys, files):
    d, _, _ = files
    target = d / "keep.pt"
    target.write_bytes(b"previous contents")
    code, _, err = _main(capsys, "fuse", d / "unfusable.pt", "-o", target, "--strict")
    assert code == EXIT_FAILED and "post_relu_bn" in err
    assert target.read_bytes() == b"previous contents"
    assert [p.name for p in d.iterdir() if p.name.startswith(".fusion-")] == []


@pytest.mark.parametrize("args,needle", [
    (["fuse", "{d}/missing.pt", "-o", "{d}/x.pt"], "missing.pt: no such file"),
    (["fuse", "{d}", "-o", "{d}/x.pt"], "is a directory"),
    (["fuse", "{d}/small.pt", "-o", "{d}/no/such/dir/x.pt"], "does not exist"),
    (["fuse", "{d}/small.pt", "-o", "{d}/x.pt", "--verify"], "--verify needs"),
    (["fuse", "{d}/small.pt", "-o", "{d}/x.pt", "--rtol", "0.1"], "--rtol applies"),
    (["fuse", "{d}/weights.pt", "-o", "{d}/x.pt"], "holds a state_dict"),
    (["fuse", "cli_models:small_net", "--weights", "{d}/small.pt", "-o", "{d}/x.pt"],
     "pickled objects"),
    (["fuse", "cli_models:small_net", "--weights", "{d}/list_in.pt", "-o", "{d}/x.pt"],
     "not a state_dict"),
    (["fuse", "cli_models:UnfusableNet", "--weights", "{d}/weights.pt", "-o", "{d}/x.pt"],
     "does not match the model"),
    (["analyze", "cli_models:no_such_thing"], "has no attribute"),
    (["analyze", "no_such_module_xyz:factory"], "cannot import no_such_module_xyz"),
    (["analyze", "cli_models:broken_factory"], "this factory always fails"),
    (["analyze", "cli_models:not_a_model"], "not a torch.nn.Module"),
    (["analyze", "{d}/small.pt", "--example-inputs", "{d}/garbage.pt"], "garbage.pt"),
    (["demo", "--models", "not_a_torchvision_model"], "not a model builder"),
])
def test_usage_errors_exit_2(capsys, files, args, needle):
    d, _, _ = files
    code, out, err = _main(capsys, *[a.format(d=d) for a in args])
    assert code == EXIT_USAGE, err
    assert needle in err and err.count("\n") == 1 and err.startswith("fusion: error: ")
    assert out == ""


def test_fused_weights_get_a_hint_about_apply_plan(capsys, files):
    d, _, _ = files
    fused = __import__("fusion").fuse(cli_models.calibrated(cli_models.small_net()))
    torch.save(fused.state_dict(), d / "fused_weights.pt")
    code, _, err = _main(capsys, "fuse", "cli_models:small_net", "--weights",
                         d / "fused_weights.pt", "-o", d / "x.pt")
    assert code == EXIT_USAGE and "fusion.apply_plan" in err and "conv1.bias" in err


def test_verification_failure_of_a_conv_model_names_the_pair(capsys, files):
    # An exact tolerance: any rounding difference fails. (On a tiny input the fused
    # output can be bit-identical; this one is not, on the fixture's weights.)
    d, _, _ = files
    code, _, err = _main(capsys, "fuse", d / "small.pt", "-o", d / "x.pt",
                         "--example-input", "2,3,16,16", "--rtol", "1e-30")
    assert code == EXIT_FAILED, err
    assert "verification failed" in err and "-> conv" in err
    assert "Traceback" not in err
