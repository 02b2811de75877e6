"""Shared test helpers: snapshots that prove a model was left untouched, and
output comparisons; and the session's guard against any network traffic."""
import ipaddress
import os
import socket
import sys

# ultralytics probes public DNS servers at import (is_online()) unless
# YOLO_OFFLINE is set, and may pip-install packages unless YOLO_AUTOINSTALL is
# off; set before anything can import it, in this process and every subprocess.
os.environ["YOLO_OFFLINE"] = "True"
os.environ["YOLO_AUTOINSTALL"] = "False"
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "yolo-config"))

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


# --- no packet leaves this machine -----------------------------------------------
# Any connection, datagram or name lookup for a non-loopback address, by any
# code in this process, raises NetworkBlocked and is recorded; the test during
# which it happened fails, and so does the session.


class NetworkBlocked(OSError):
    """A test tried to reach the network."""


NETWORK_ATTEMPTS = []


def _loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    if host in ("localhost", "", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _blocked(what, address):
    NETWORK_ATTEMPTS.append(f"{what} {address!r}")
    raise NetworkBlocked(f"the test session blocks network access: {what} {address!r}")


def _host_of(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        return address[0]
    return None  # AF_UNIX and the like stay on this machine


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo


def _connect(self, address):
    if not _loopback(_host_of(self, address)):
        _blocked("connect to", address)
    return _real_connect(self, address)


def _connect_ex(self, address):
    if not _loopback(_host_of(self, address)):
        _blocked("connect to", address)
    return _real_connect_ex(self, address)


def _sendto(self, data, *args):
    address = args[-1] if args else None
    if not _loopback(_host_of(self, address)):
        _blocked("send a datagram to", address)
    return _real_sendto(self, data, *args)


def _getaddrinfo(host, *args, **kwargs):
    if not _loopback(host):
        _blocked("look up", host)
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex
socket.socket.sendto = _sendto
socket.getaddrinfo = _getaddrinfo


@pytest.fixture(autouse=True)
def _no_network():
    before = len(NETWORK_ATTEMPTS)
    yield
    tried = NETWORK_ATTEMPTS[before:]
    if tried:
        pytest.fail(f"the test tried to reach the network: {tried}")


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
    if NETWORK_ATTEMPTS:
        sys.stderr.write(f"\nNETWORK ACCESS WAS ATTEMPTED during the tests (blocked): "
                         f"{NETWORK_ATTEMPTS}\n")
        session.exitstatus = 1
    path = os.environ.get("FUSION_TEST_IDS")
    if path and _OUTCOMES:
        import json

        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "outcomes": _OUTCOMES}, f, indent=0)
