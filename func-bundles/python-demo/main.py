"""A Python Func: one function per operationId, each taking the request.

Return a str (text), bytes (binary), dict/list (JSON), None (204), a
(body, status[, headers]) tuple, or funcatron.Response(body, status, headers).
"""
import os
import sys
import time

from funcatron import Response


def hello(req):
    times = int(req.query.get("times", 1))
    return {
        "greeting": " ".join([f"{os.environ.get('GREETING', 'Hi')}, {req.params['name']}!"] * times),
        "runtime": "python",
        "trace": req.headers.get("x-trace"),
    }


def echo(req):
    return Response(req.body, 200, {
        "content-type": req.headers.get("content-type", "application/octet-stream"),
        "x-echo-length": str(len(req.body)),
    })


def create_item(req):
    item = req.json()
    return {"name": item["name"], "qty": item["qty"], "total": item["qty"] * 2}, 201


def headers(req):
    return {"headers": req.headers, "method": req.method, "path": req.path,
            "query": req.query, "id": req.id}


def status(req):
    code = int(req.params["code"])
    return Response(f"status {code}", code)


def env(req):
    return {"GREETING": os.environ.get("GREETING"), "API_TOKEN": os.environ.get("API_TOKEN"),
            "HOME": os.environ.get("HOME")}


def sleep(req):
    time.sleep(int(req.query["ms"]) / 1000)
    return "slept"


def crash(req):
    os._exit(3)


def fail(req):
    raise ValueError("this Func always fails")


def noisy(req):
    print("\x00\x01garbage on stdout that is not a frame")
    sys.stdout.buffer.write(b"\x00\x00\x00\x05raw")
    sys.stdout.flush()
    print(f"a line on stderr for {req.id}", file=sys.stderr)
    return "still fine"
