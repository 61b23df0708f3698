"""Streamed answers from a Python Func. A handler that returns a generator
(or is a generator function) streams: each str or bytes it yields reaches
the client as soon as it is yielded when the request came direct (one
asking for text/event-stream does), and the pieces are collected into one
answer otherwise. funcatron.Stream sets the status and headers."""
import os
import socket
import time
import uuid

import funcatron

SSE = {"content-type": "text/event-stream", "cache-control": "no-cache"}
# Which worker process answers (whoami).
WORKER = uuid.uuid4().hex


def word_from(port):
    """What the local `port` sends, up to its end."""
    with socket.create_connection(("127.0.0.1", int(port))) as s:
        return s.makefile("rb").read().decode()


def events(req):
    """`n` events after `ready`; with `port`, after `ready` it waits for a
    word from that local port and sends it as an event."""
    n = int(req.query.get("n", 3))
    port = req.query.get("port")

    def pieces():
        yield "data: ready\n\n"
        if port:
            yield f"data: {word_from(port)}\n\n"
        for i in range(1, n + 1):
            yield f"id: {i}\ndata: {i}\n\n"

    return funcatron.Stream(pieces(), headers=SSE)


def blocks(req):
    """A generator function: three blocks of `kib` KiB of bytes (A, B, C),
    sent as application/octet-stream."""
    size = int(req.query.get("kib", 1)) * 1024
    for letter in b"ABC":
        yield bytes([letter]) * size


def fail(req):
    """Raises after its first piece (with `port`: once that port sent its
    word): the stream is cut off."""
    yield "data: first\n\n"
    if "port" in req.query:
        word_from(req.query["port"])
    raise RuntimeError("the source dried up")


def crash(req):
    """The worker dies after its first piece (with `port`: once that port
    sent its word)."""
    yield "data: first\n\n"
    if "port" in req.query:
        word_from(req.query["port"])
    os._exit(3)


def forever(req):
    """Ticks until the client leaves; then (its generator closed) says
    `closed` to the local `port`."""
    port = int(req.query["port"])

    def ticks():
        try:
            n = 0
            while True:
                n += 1
                yield f"data: tick {n}\n\n"
                time.sleep(0.01)
        finally:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"closed")

    return funcatron.Stream(ticks(), headers=SSE)


def whoami(req):
    return {"worker": WORKER}
