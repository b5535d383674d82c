"""What the serve benchmarks' clients share: a free loopback port, waiting for a started
`edgellm serve` to answer /health, and reading one line of a server-sent event stream."""

import json
import socket
import time

DONE = "[DONE]"  # the data of a stream's last event


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, seconds):
    """True once the server at url answers GET /health with 200; False if its process proc
    (a subprocess.Popen) exits first or `seconds` pass."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def sse_data(line):
    """One line of a server-sent event stream: None for a line that is not an event's data,
    DONE for the last event, else the event's JSON."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    return DONE if data == DONE else json.loads(data)
