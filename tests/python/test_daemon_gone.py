"""The Python client when kvwaved goes away or stalls (issue 15, item 4): every call raises
ConnectionError (daemon gone) or TimeoutError (no reply within the deadline); no crash.

Clients run in child processes, so that a crash shows as a signal exit code instead of taking
pytest down. They report on stdout; the test waits on those lines and on exits, never on time.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import BINARY_DIR

MODULE_DIR = os.path.join(BINARY_DIR, "client", "python")

# A client process: connects, opens a context, then appends until a call fails; then every other
# call must fail the same way. Prints "ready" after its first append, then one line per call:
# "<call> <exception type>".
CLIENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import kvwave
    c = kvwave.Client(sys.argv[2], shared_memory_bytes=int(sys.argv[3]))
    ctx, _ = c.open(2, 4, 2, 64, dtype="f16")
    k = np.ones((256, 2, 64), np.float16)
    first = True
    try:
        while True:
            c.append(ctx, 0, k, k)
            if first:
                print("ready", flush=True)
                first = False
    except Exception as e:
        print("append", type(e).__name__, flush=True)
    q = np.ones((4, 64), np.float32)
    calls = {
        "ping": lambda: c.ping(),
        "open": lambda: c.open(1, 4, 2, 64),
        "append": lambda: c.append(ctx, 1, k, k),
        "seal": lambda: c.seal(ctx),
        "attend": lambda: c.attend(ctx, 0, q),
        "retrieve": lambda: c.retrieve(ctx, 0, q, k=4),
        "gather": lambda: c.gather(ctx, 0, np.arange(4)),
        "info": lambda: c.info(ctx),
        "contexts": lambda: c.contexts(),
        "stats": lambda: c.stats(),
        "close": lambda: c.close(ctx),
        "drop": lambda: c.drop(ctx),
    }
    for name, call in calls.items():
        try:
            call()
            print(name, "ok", flush=True)
        except Exception as e:
            print(name, type(e).__name__, flush=True)
    try:
        kvwave.Client(sys.argv[2], shared_memory_bytes=0)
        print("connect ok", flush=True)
    except Exception as e:
        print("connect", type(e).__name__, flush=True)
""")


def start_daemon(tmp_path):
    """Starts a private kvwaved and returns (process, socket) once it logged that it is ready."""
    sock = str(tmp_path / "kvwaved.sock")
    proc = subprocess.Popen(
        [os.path.join(BINARY_DIR, "rpc", "kvwaved"), "--set", "rpc.socket_path=" + sock,
         "--set", "log.level=info"], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # waits on the daemon's own words, not on time
        lines.append(line)
        if " ready (pid " in line:
            break
    assert proc.poll() is None, "kvwaved exited early:\n" + "".join(lines)
    # Keep draining its log so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, sock


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("shm", [8 << 20, 0])
def test_clients_get_connection_error_when_the_daemon_goes(tmp_path, sig, shm):
    proc, sock = start_daemon(tmp_path)
    try:
        clients = [subprocess.Popen([sys.executable, "-c", CLIENT, MODULE_DIR, sock, str(shm)],
                                    stdout=subprocess.PIPE, text=True) for _ in range(4)]
        for c in clients:
            assert c.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        for c in clients:
            out, _ = c.communicate(timeout=60)
            assert c.returncode == 0, f"client died with {c.returncode}; output:\n{out}"
            results = [line.split(" ", 1) for line in out.strip().splitlines()]
            assert len(results) == 14, out  # the failed append, 12 calls, a new connection
            for call, outcome in results:
                assert outcome == "ConnectionError", f"{call}: {outcome}\n{out}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stalled_daemon_raises_timeout_error(tmp_path):
    import kvwave
    proc, sock = start_daemon(tmp_path)
    try:
        c = kvwave.Client(sock, shared_memory_bytes=0, deadline_ms=300)
        c.ping()
        os.kill(proc.pid, signal.SIGSTOP)
        # kill() only queues the stop: wait until every thread of the daemon has stopped (the
        # group stop is reported to its parent), or a running io thread may still answer.
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        try:
            with pytest.raises(TimeoutError):
                c.ping()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_other_statuses_raise_clear_exceptions(tmp_path):
    import kvwave
    proc, sock = start_daemon(tmp_path)
    try:
        c = kvwave.Client(sock, shared_memory_bytes=0)
        with pytest.raises(KeyError):
            c.seal(12345)
        with pytest.raises(ValueError):
            c.open(0, 1, 1, 64)
        assert issubclass(kvwave.ResourceExhaustedError, kvwave.Error)
        assert issubclass(kvwave.Error, RuntimeError)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
