"""Shared test helpers: snapshots that prove a model was left untouched, and
output comparisons."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def snapshot(model):
    """Everything that fusing must not change in a model it does not own."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()},
        "tree": [(n, type(m), id(m), m.training) for n, m in
                 model.named_modules(remove_duplicate=False)],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks))
                  for n, m in model.named_modules()],
    }


def _bits(t):
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["tree"] == snap["tree"], "module tree or training flags changed"
    assert now["hooks"] == snap["hooks"], "hooks changed"
    assert now["state"].keys() == snap["state"].keys()
    assert now["ptrs"] == snap["ptrs"], "a tensor was replaced"
    for k, v in snap["state"].items():
        assert torch.equal(_bits(now["state"][k].detach()), _bits(v)), f"{k} changed"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm())


# torch.load's weights_only defaults to False up to 2.5 and to True from 2.6,
# which refuses any pickled module; a whole saved model needs False on both.
WEIGHTS_ONLY_BY_DEFAULT = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)


def load_whole(f):
    """torch.load of a whole pickled model (a trusted file the test wrote)."""
    return torch.load(f, weights_only=False)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


# --- which tests ran, for comparing the suites on two torches -------------------
# With FUSION_TEST_IDS=path, the session writes the node IDs of the tests that ran
# (passed or failed) and of those skipped, so that tests/suite_parity.py can show
# that the same tests ran on the current and on the oldest torch.
_OUTCOMES = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        gpu = "gpu" in report.keywords
        _OUTCOMES[report.nodeid] = "gpu" if gpu else report.outcome


def pytest_sessionfinish(session):
    path = os.environ.get("FUSION_TEST_IDS")
    if path and _OUTCOMES:
        import json

        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "outcomes": _OUTCOMES}, f, indent=0)
