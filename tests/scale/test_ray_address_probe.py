"""--ray-address on a TCP port that is not Ray fails in one line within seconds (it took 824 s
and 60 warnings in ray.init; issue 30). The probe is an HTTP/2 preface: gRPC servers (Ray's
GCS and client server) answer with a SETTINGS frame."""
import socket
import threading
import time

import pytest

from saeflow.errors import ScaleError
from saeflow.scale.ray_backend import _reachable, _speaks_grpc


def _server(reply: bytes | None, close: bool = False):
    """A one-connection TCP server on 127.0.0.1 that answers `reply` (None: stays silent)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.recv(1024)
        if reply:
            conn.sendall(reply)
        if close or reply:
            time.sleep(0.2)
            conn.close()
        else:
            time.sleep(5)
        srv.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


SETTINGS = bytes([0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100])


@pytest.mark.parametrize("reply,close", [(b"HTTP/1.1 400 Bad Request\r\n\r\n", False),
                                         (b"-ERR unknown command\r\n", False),
                                         (None, True), (None, False)])
def test_a_tcp_port_that_is_not_ray_fails_fast(reply, close):
    port = _server(reply, close)
    t0 = time.perf_counter()
    with pytest.raises(ScaleError, match="not as Ray"):
        _reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5


def test_a_grpc_server_passes_the_probe():
    assert _speaks_grpc("127.0.0.1", _server(SETTINGS))


def test_nothing_listening_is_one_line():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ScaleError, match="cannot reach the Ray cluster"):
        _reachable(f"127.0.0.1:{port}")
