"""Fixtures for the Python client tests: the built `kvwave` module and a private kvwaved."""
import os
import signal
import subprocess
import sys
import time

import pytest

BINARY_DIR = os.environ.get("KVWAVE_BINARY_DIR", os.path.join(os.path.dirname(__file__), "../../build"))
sys.path.insert(0, os.path.join(BINARY_DIR, "client", "python"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("kvwave") / "kvwaved.sock")
    proc = subprocess.Popen(
        [os.path.join(BINARY_DIR, "rpc", "kvwaved"), "--set", "rpc.socket_path=" + sock,
         "--set", "log.level=warn"])
    deadline = time.time() + 30
    while not os.path.exists(sock):
        assert proc.poll() is None, "kvwaved exited early"
        assert time.time() < deadline, "kvwaved did not start"
        time.sleep(0.01)
    time.sleep(0.05)
    yield sock
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
