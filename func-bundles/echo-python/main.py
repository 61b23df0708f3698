"""echo-python: the body back with its content type."""
from funcatron import Response


def echo(req):
    return Response(req.body, 200, {
        "content-type": req.headers.get("content-type", "application/octet-stream"),
    })
