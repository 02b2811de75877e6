"""Two threads fusing two models at once both get what fusing them one after
the other gives, bit for bit.

torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole
process while it traces, so a trace in one thread sees the other thread's
module calls (and a forward in the other thread goes through the tracer).
To make the threads meet for certain, each model starts with a :class:`Gate`
that holds the first forward (or trace) of one thread until the other's
arrives, or until ``WAIT`` seconds have passed (which is what a fuse() that
serialises its traces costs). The one that arrived second, whose trace
patched ``nn.Module`` last, then pauses, so that the other one goes on first
through the patches of the second. The stress tests without the gate start the
threads together and have the interpreter switch threads every 10
microseconds.
"""
import copy
import sys
import threading
import time

import pytest
import torch
from torch import nn

from fusion import fuse
from zoo import build

X = (1, 3, 32, 32)
WAIT = 2.0


class Gate(nn.Module):
    """The identity, except that while ``Gate.barrier`` is set, it waits there
    (at most WAIT seconds) for the other thread's gate; the second to arrive
    then lets the first go on ahead."""

    barrier = None  # on the class: a model holding a Barrier cannot be copied

    def forward(self, x):
        barrier = Gate.barrier
        if barrier is not None:
            try:
                if barrier.wait(timeout=WAIT) == barrier.parties - 1:
                    time.sleep(0.05)
            except threading.BrokenBarrierError:  # timed out: the other one is not coming
                pass
        return x


class Gated(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.gate = Gate()
        self.net = net

    def forward(self, x):
        return self.net(self.gate(x))


def resnet(seed):
    return Gated(build("resnet18", seed=seed, shape=(2, 3, 32, 32)))


def x_of(seed):
    return torch.randn(*X, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    """Two different resnet18s, and what fusing each alone gives."""
    out = []
    for seed in (0, 1):
        model = resnet(seed)
        fused = fuse(model)
        out.append((model, {k: v.clone() for k, v in fused.state_dict().items()}))
    return out


@pytest.fixture
def busy_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def gated():
    Gate.barrier = threading.Barrier(2)
    yield
    Gate.barrier = None


@pytest.fixture(autouse=True)
def repair_nn_module():
    """A test that fails because a patch of torch.fx is left behind must not
    break every test after it."""
    saved = {k: vars(nn.Module)[k] for k in ("__call__", "__getattr__")}
    yield
    for k, v in saved.items():
        setattr(nn.Module, k, v)


def fuse_together(jobs):
    """Runs ``fuse(model, **kwargs)`` for each (model, kwargs) in its own thread,
    all released at once. Returns the results, re-raising the first error."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), [None] * len(jobs)

    def work(i, model, kwargs):
        try:
            barrier.wait()
            results[i] = fuse(model, return_report=True, **kwargs)
        except BaseException as exc:  # reported below, in the test's thread
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i, m, kw)) for i, (m, kw) in
               enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a fusing thread hangs"
    for e in errors:
        if e is not None:
            raise e
    return results


def assert_same(fused, want):
    state = fused.state_dict()
    assert state.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(state[k], v), k


# nn.Module.__call__ as torch defines it: _call_impl up to 1.13, a wrapper of it
# (_wrapped_call_impl) in torch 2; fx patches and restores it while tracing.
MODULE_CALL = vars(nn.Module)["__call__"]
assert MODULE_CALL.__qualname__ in ("Module._call_impl", "Module._wrapped_call_impl")


def assert_process_intact():
    """No fx patch is left behind on nn.Module."""
    assert vars(nn.Module)["__call__"] is MODULE_CALL
    assert "__getattr__" in vars(nn.Module) and \
        vars(nn.Module)["__getattr__"].__qualname__ == "Module.__getattr__"


# (fuse kwargs for model 0, for model 1); "x" stands for that model's example input
MODES = {
    "copy+copy": ({}, {}),
    "inplace+copy": ({"inplace": True}, {}),
    "inplace+inplace": ({"inplace": True}, {"inplace": True}),
    "recorded+fx": ({"example_inputs": "x", "verify": False}, {}),
    "recorded+recorded": ({"example_inputs": "x", "verify": False, "inplace": True},
                          {"example_inputs": "x", "verify": False}),
}


def jobs_for(models, mode):
    jobs = []
    for i, kwargs in enumerate(MODES[mode]):
        model = copy.deepcopy(models[i][0]) if kwargs.get("inplace") else models[i][0]
        kwargs = {k: (x_of(i) if v == "x" else v) for k, v in kwargs.items()}
        jobs.append((model, kwargs))
    return jobs


def check(models, mode, jobs, results):
    for i, (fused, report) in enumerate(results):
        assert len(report.fused) == 20 and not report.left, (i, report)
        assert_same(fused, models[i][1])
        if MODES[mode][i].get("inplace"):
            assert fused is jobs[i][0]
    assert_process_intact()
    # the models given for copying were not touched
    assert all(isinstance(m[0].net.bn1, nn.BatchNorm2d) for m in models)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("mode", [
    pytest.param("copy+copy", marks=SLOW), "inplace+copy",
    pytest.param("inplace+inplace", marks=SLOW), "recorded+fx",
    pytest.param("recorded+recorded", marks=SLOW)])
def test_two_threads_fuse_two_models(models, mode, gated):
    jobs = jobs_for(models, mode)
    check(models, mode, jobs, fuse_together(jobs))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_two_threads_fuse_two_models_with_busy_switching(models, mode, busy_switching):
    """No gate: the threads meet wherever the scheduler has them meet."""
    for _ in range(3):
        jobs = jobs_for(models, mode)
        check(models, mode, jobs, fuse_together(jobs))


@pytest.mark.slow
def test_two_threads_fuse_and_verify(models, gated):
    """With example inputs and verification (the default with them): the
    recorded runs and the verification runs overlap too."""
    results = fuse_together([(models[0][0], {"example_inputs": x_of(0)}),
                             (copy.deepcopy(models[1][0]),
                              {"example_inputs": x_of(1), "inplace": True})])
    for i, (fused, report) in enumerate(results):
        assert len(report.fused) == 20 and report.rel_err <= report.tolerance
        assert_same(fused, models[i][1])
    assert_process_intact()


@pytest.mark.slow
def test_fusing_in_a_worker_while_the_main_thread_fuses(models, gated):
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", fuse(models[1][0])))
    worker.start()
    mine = fuse(models[0][0])
    worker.join(timeout=120)
    assert_same(mine, models[0][1])
    assert_same(box["r"], models[1][1])
    assert_process_intact()


class Pause(nn.Module):
    """The identity; while traced, it lets ``reader`` run in another thread
    and waits for it to finish."""

    def __init__(self):
        super().__init__()
        self.reader = None

    def forward(self, x):
        if self.reader is not None:
            self.reader.start()
            self.reader.join(timeout=30)
        return x


class Paused(nn.Module):
    def __init__(self):
        super().__init__()
        self.pause = Pause()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.pause(x)))


def test_another_threads_reads_during_a_trace_are_not_the_traces():
    """fx's patch of ``nn.Module.__getattr__`` sees every thread's reads. A
    read of the model's own buffer made by another thread while the model is
    traced is not the forward's, so the pair is still folded, and that thread
    gets the real tensors, of this model and of another one."""
    model, other = Paused().eval(), Paused().eval()
    for m in (model, other):
        m.bn.running_var.uniform_(0.5, 2.0)
    seen = {}

    def read():
        try:
            seen["own"] = model.bn.running_var
            seen["weight"] = model.conv.weight
            seen["other"] = other.bn.running_mean
        except BaseException as exc:  # reported in the test's thread
            seen["error"] = exc

    model.pause.reader = threading.Thread(target=read)
    want = {"own": model.bn.running_var, "weight": model.conv.weight,
            "other": other.bn.running_mean}
    fused, report = fuse(model, inplace=True, return_report=True)
    assert "error" not in seen, seen.get("error")
    assert set(seen) == set(want)
    for k, v in want.items():
        assert seen[k] is v, k  # the tensor itself, not a Proxy of it
    assert [p.norm for p in report.fused] == ["bn"] and not report.left, report
    assert_process_intact()
