"""Fixtures for the Python client tests: the built `kvwave` module and a private kvwaved."""
import os
import signal
import subprocess
import sys

import pytest

BINARY_DIR = os.environ.get("KVWAVE_BINARY_DIR", os.path.join(os.path.dirname(__file__), "../../build"))
sys.path.insert(0, os.path.join(BINARY_DIR, "client", "python"))


def start_kvwaved(binary, args, **popen_kwargs):
    """Starts kvwaved and returns once it is listening: it writes "ready <pid>" to the pipe given
    with --ready-fd (an event, not a poll); raises if it exits first."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([binary, "--ready-fd", str(write_end)] + list(args),
                                pass_fds=(write_end,), **popen_kwargs)
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        line = ready.readline()  # EOF without a line: kvwaved exited (or closed it) before ready
    if not line.startswith(b"ready "):
        proc.kill()
        proc.wait()
        raise RuntimeError("kvwaved exited before it was ready")
    return proc


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("kvwave") / "kvwaved.sock")
    proc = start_kvwaved(os.path.join(BINARY_DIR, "rpc", "kvwaved"),
                         ["--set", "rpc.socket_path=" + sock, "--set", "log.level=warn"])
    yield sock
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
