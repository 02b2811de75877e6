"""Fails when a test ran on one torch only: compares the FUSION_TEST_IDS files
of two pytest runs (the current torch and the oldest, in .ci/run).

A test may run on one torch only if it is marked ``gpu`` (no CUDA device here) or
is listed below, with the reason. Everything else that one run ran, the other
must have run too: a skip on one side is a test that torch did not run.

Usage: python tests/suite_parity.py CURRENT.json OLDEST.json
"""
import fnmatch
import json
import sys

# node ID pattern -> why it runs on the current torch only
CURRENT_ONLY = {
    "tests/test_export.py::*dynamo*":
        "the dynamo-based ONNX exporter exists from torch 2 on",
    "tests/test_torch2.py::test_compiled_*": "torch.compile is new in torch 2",
    "tests/test_torch2.py::test_exported_module_*": "torch.export is new in torch 2",
    "tests/test_torch2.py::test_model_built_on_the_meta_device_*":
        "torch.device as a context manager is new in torch 2 (1.13's .to('meta') is "
        "tested in test_errors.py on both)",
    "tests/test_torch2.py::test_parametrized_layer_or_norm_is_left[[]*weight_norm*":
        "parametrizations.weight_norm is new in torch 2 (the old nn.utils.weight_norm "
        "is tested in test_traps.py on both)",
    "tests/test_torch2.py::test_fused_model_runs_under_torch_compile*":
        "torch.compile is new in torch 2",
    "tests/test_torch2.py::test_fused_model_exports_with_torch_export*":
        "torch.export is new in torch 2",
    "tests/test_ultralytics.py::test_raw_outputs_against_float64[[]*-float16]":
        "torch 1.13 has no float16 convolution on the CPU",
    "tests/test_ultralytics.py::test_raw_outputs_against_float64[[]convtranspose*-bfloat16]":
        "torch 1.13's bfloat16 ConvTranspose2d on the CPU returns the wrong shape",
    "tests/test_ultralytics.py::test_onnx_export_in_float16*":
        "torch 1.13 has no float16 convolution on the CPU",
}
# node ID pattern -> why it runs on the oldest torch only
OLDEST_ONLY = {}
# tests that must have run on both (they skip where a CI step before them failed)
REQUIRED = [
    "tests/test_native_load.py::test_a_build_for_the_other_torch_gives_the_rebuild_error",
]


def _ran(path):
    with open(path) as f:
        data = json.load(f)
    ran = {k for k, v in data["outcomes"].items() if v in ("passed", "failed")}
    return data["torch"], ran


def _unexplained(ids, allowed):
    return sorted(i for i in ids if not any(fnmatch.fnmatch(i, p) for p in allowed))


def main(argv):
    (cur_torch, cur), (old_torch, old) = _ran(argv[0]), _ran(argv[1])
    only_cur = _unexplained(cur - old, CURRENT_ONLY)
    only_old = _unexplained(old - cur, OLDEST_ONLY)
    print(f"suite parity: {len(cur)} tests ran on torch {cur_torch}, {len(old)} on "
          f"torch {old_torch}; {len(cur & old)} on both")
    for torch_version, ids in ((cur_torch, only_cur), (old_torch, only_old)):
        for i in ids:
            print(f"  ran only on torch {torch_version}, with no reason listed: {i}")
    missing = [t for t in REQUIRED if t not in cur or t not in old]
    for t in missing:
        print(f"  did not run on both torches: {t}")
    if only_cur or only_old or missing:
        print("error: list each one with its reason in tests/suite_parity.py, or make "
              "it run on both torches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
