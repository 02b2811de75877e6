"""Part of issue 12: a fault or a Ctrl-C at any step of the write phase leaves
an in-place model fully fused, never half written; a copy-mode fuse leaves the
original untouched. Each step is hit in turn: the weight writes, the Parameter
installs and every norm replacement (under each of its names)."""
import signal
import threading
import traceback

import pytest
import torch
from torch import nn

from conftest import _bits, assert_unchanged, snapshot
from fusion import fuse, rewrite
from test_transaction import Five, five, inputs


def _reference(model):
    """The fully fused model and its output, from an undisturbed fuse of a copy."""
    fused = fuse(model)  # a copy: model stays as it is
    with torch.no_grad():
        return fused, fused(inputs())


def _step_count():
    counted = []
    real = rewrite._write_steps

    def count(*args):
        steps = real(*args)
        counted.append(len(steps))
        return steps

    rewrite._write_steps = count
    try:
        fuse(five())
    finally:
        rewrite._write_steps = real
    return counted[0]


STEPS = _step_count()  # 5 applies, 2 bias installs... and 6 norm names (one alias)


def _hit(monkeypatch, at, action):
    """Makes step ``at`` of the write phase run ``action`` once, as it starts:
    an exception or a signal arriving from outside, between two bytecodes."""
    real = rewrite._write_steps

    def steps(*args):
        out = real(*args)
        original, pending = out[at], [action]

        def disturbed():
            if pending:
                pending.pop()()
            original()

        out[at] = disturbed
        return out

    monkeypatch.setattr(rewrite, "_write_steps", steps)


def _assert_fully_fused(model, reference):
    ref_model, ref_out = reference
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.alias, nn.Identity) and model.alias is model.pairs[1].bn
    for (name, t), (_, want) in zip(model.state_dict().items(),
                                    ref_model.state_dict().items()):
        assert torch.equal(_bits(t), _bits(want)), name
    with torch.no_grad():
        assert torch.equal(model(inputs()), ref_out)


def test_the_steps_are_every_write():
    assert STEPS == 5 + 2 + 6  # each fold, each added bias, each norm name


class Fault(RuntimeError):
    pass


def _raise_fault():
    raise Fault("planted")


@pytest.mark.parametrize("at", range(STEPS))
def test_a_fault_at_any_step_leaves_the_model_fully_fused(monkeypatch, at):
    model = five()
    reference = _reference(model)
    _hit(monkeypatch, at, _raise_fault)
    with pytest.raises(Fault):
        fuse(model, inplace=True)
    _assert_fully_fused(model, reference)


@pytest.mark.parametrize("at", [0, STEPS // 2, STEPS - 1])
def test_a_fault_in_copy_mode_leaves_the_original_untouched(monkeypatch, at):
    model = five()
    snap = snapshot(model)
    _hit(monkeypatch, at, _raise_fault)
    with pytest.raises(Fault):
        fuse(model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("at", range(STEPS))
def test_ctrl_c_at_any_step_is_delivered_after_the_write(monkeypatch, at):
    model = five()
    reference = _reference(model)
    _hit(monkeypatch, at, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(KeyboardInterrupt) as info:
        fuse(model, inplace=True)
    _assert_fully_fused(model, reference)
    # held, and delivered once the write was done (not raised inside a step)
    frames = [f.name for f in traceback.extract_tb(info.tb)]
    assert "_sigint_held" in frames and "_run_every" not in frames, frames
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_without_a_fault_the_handler_is_put_back_and_nothing_is_raised():
    model = Five()
    fuse(model, inplace=True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_another_thread_writes_interrupts_the_main_thread(monkeypatch):
    """Signal handlers run in the main thread only: the worker's write runs to
    the end, and the KeyboardInterrupt arrives in the main thread."""
    model = five()
    reference = _reference(model)
    _hit(monkeypatch, STEPS // 2, lambda: signal.raise_signal(signal.SIGINT))
    errors = []

    def work():
        try:
            fuse(model, inplace=True)
        except BaseException as exc:  # the worker must not see it
            errors.append(exc)

    worker = threading.Thread(target=work)
    with pytest.raises(KeyboardInterrupt):
        worker.start()
        while worker.is_alive():
            worker.join(0.01)
    worker.join()
    assert errors == []
    _assert_fully_fused(model, reference)
