"""The session's network guard is real: a connection, a datagram or a name
lookup for a non-loopback address raises and is recorded, loopback works, and
ultralytics (where installed) imports without trying the network."""
import socket
import subprocess
import sys

import pytest

from conftest import NETWORK_ATTEMPTS, NetworkBlocked


@pytest.fixture
def attempts():
    before = len(NETWORK_ATTEMPTS)
    yield lambda: NETWORK_ATTEMPTS[before:]
    del NETWORK_ATTEMPTS[before:]  # these were the test's own, on purpose


def test_a_connection_to_a_public_address_is_blocked(attempts):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, \
            pytest.raises(NetworkBlocked):
        s.connect(("1.1.1.1", 80))
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("8.8.8.8", 53), timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
            pytest.raises(NetworkBlocked):
        s.sendto(b"x", ("8.8.4.4", 53))
    with pytest.raises(NetworkBlocked):
        socket.getaddrinfo("pypi.org", 443)
    assert len(attempts()) == 4


def test_loopback_is_allowed(attempts):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert attempts() == []


def test_ultralytics_imports_offline(attempts):
    pytest.importorskip("ultralytics")
    import os

    assert os.environ["YOLO_OFFLINE"] == "True"
    assert os.environ["YOLO_AUTOINSTALL"] == "False"
    from ultralytics.utils import ONLINE  # computed at import

    assert ONLINE is False
    assert attempts() == []


def test_import_fusion_imports_no_model_library():
    code = ("import sys, fusion; bad = [m for m in ('timm', 'ultralytics', 'onnx', "
            "'onnxruntime', 'torchvision') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
