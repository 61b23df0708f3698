"""Funcatron's Python worker: loads one bundle once, then serves many
invocations from its Runner over a Unix socket (see runner/src/worker/frame.rs
for the frame format). Started by the Runner; not meant to be run by hand.

Funcs import nothing from here but may use `funcatron.Response`,
`funcatron.Stream` and `funcatron.store` (the document store, through the
Runner: see docs/runtimes.md)."""
import inspect
import importlib.util
import json
import os
import select
import socket
import struct
import sys
import traceback
import types
from urllib.parse import parse_qs


class Response:
    """What a handler may return to set the status and headers."""

    def __init__(self, body=None, status=200, headers=None):
        self.body = body
        self.status = status
        self.headers = dict(headers or {})


class Stream:
    """What a handler may return to stream its answer with a status and
    headers: each piece `body` yields (str or bytes) goes to the client as
    soon as it is yielded (a request that came direct, as one asking for
    text/event-stream does), or is collected into one answer otherwise.
    A handler that returns a generator, or is one, streams with status 200."""

    def __init__(self, body, status=200, headers=None):
        self.body = body
        self.status = status
        self.headers = dict(headers or {})


class StoreError(Exception):
    """A document store operation was refused: `status` (HTTP), `code`
    (`not_found`, `forbidden`, `precondition_failed`, `schema_violation`,
    ...) and the answer's `body`."""

    def __init__(self, status, body):
        self.status = status
        self.body = body
        self.code = body.get("error") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{status} {self.code}: {message}")


class Store:
    """The document store, on the collections the bundle declares
    (`store: {orders: [read, write]}`). Each call is one round trip through
    the Runner, within the request's time limit; documents come back as
    `{"collection", "id", "version", "updated_ms", "doc"}`. Not for use
    while an answer streams."""

    def __init__(self, conn):
        self._conn = conn

    def _call(self, op):
        self._conn.send([b"store", json.dumps(op).encode()])
        items = self._conn.read()
        if items is None:
            sys.exit(0)
        if len(items) != 3 or items[0] != b"store":
            raise RuntimeError("the Runner broke the store protocol")
        return int(items[1]), json.loads(items[2])

    def _ok(self, op):
        status, body = self._call(op)
        if status >= 400:
            raise StoreError(status, body)
        return body

    def get(self, collection, id):
        """The document, or None when there is none."""
        status, body = self._call({"op": "get", "collection": collection, "id": id})
        if status == 404 and isinstance(body, dict) and body.get("error") == "not_found":
            return None
        if status >= 400:
            raise StoreError(status, body)
        return body

    def list(self, collection, filter=None, limit=None, after=None):
        """A page `{"documents": [...], "next": ...}` of the documents whose
        top-level fields equal `filter`'s; pass `next` as `after` for more."""
        op = {"op": "list", "collection": collection, "filter": filter or {}}
        if limit is not None:
            op["limit"] = limit
        if after is not None:
            op["after"] = after
        return self._ok(op)

    def create(self, collection, doc, id=None):
        """A new document (the store picks the id unless given)."""
        op = {"op": "create", "collection": collection, "doc": doc}
        if id is not None:
            op["id"] = id
        return self._ok(op)

    def _versioned(self, op, if_version):
        if if_version is not None:
            op["if_version"] = if_version
        return self._ok(op)

    def put(self, collection, id, doc, if_version=None):
        """Write the whole document (created if missing)."""
        return self._versioned({"op": "put", "collection": collection, "id": id, "doc": doc}, if_version)

    def merge(self, collection, id, patch, if_version=None):
        """Change the document by a JSON merge patch (RFC 7396)."""
        return self._versioned({"op": "merge", "collection": collection, "id": id, "patch": patch}, if_version)

    def delete(self, collection, id, if_version=None):
        """Remove the document."""
        return self._versioned({"op": "delete", "collection": collection, "id": id}, if_version)


# The largest piece in one frame (runner/src/worker/frame.rs,
# MAX_CHUNK_BYTES): larger pieces are split.
MAX_CHUNK_BYTES = 1024 * 1024


class Request:
    """One HTTP request as the Func sees it."""

    __slots__ = ("id", "operation", "method", "scheme", "host", "path",
                 "query_string", "headers", "params", "body", "_query")

    def __init__(self, items):
        (self.id, self.operation, self.method, self.scheme, self.host,
         self.path, self.query_string) = (i.decode("utf-8", "replace") for i in items[1:8])
        self.body = items[8]
        n = int(items[10])
        h = {}
        for i in range(11, 11 + 2 * n, 2):
            k = items[i].decode("latin-1")
            v = items[i + 1].decode("utf-8", "replace")
            h[k] = h[k] + ", " + v if k in h else v
        self.headers = h
        rest = items[11 + 2 * n:]
        self.params = {rest[i].decode(): rest[i + 1].decode("utf-8", "replace")
                       for i in range(0, len(rest) - 1, 2)}
        self._query = None

    @property
    def query(self):
        """Query parameters: name -> value, or a list when repeated."""
        if self._query is None:
            q = parse_qs(self.query_string, keep_blank_values=True)
            self._query = {k: v[0] if len(v) == 1 else v for k, v in q.items()}
        return self._query

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body) if self.body else None


def encode(items):
    parts = [struct.pack(">I", len(items))]
    for it in items:
        parts.append(struct.pack(">I", len(it)))
        parts.append(it)
    return b"".join(parts)


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.rf = self.sock.makefile("rb")

    def read(self):
        head = self.rf.read(4)
        if len(head) < 4:
            return None
        (count,) = struct.unpack(">I", head)
        items = []
        for _ in range(count):
            (n,) = struct.unpack(">I", self.rf.read(4))
            items.append(self.rf.read(n))
        return items

    def send(self, items):
        self.sock.sendall(encode(items))

    def cancelled(self):
        """Has the Runner sent `cancel` (the open stream is to stop)? Only
        `cancel` is sent while a stream is open, and never split."""
        while select.select([self.sock], [], [], 0)[0]:
            items = self.read()
            if items is None:
                sys.exit(0)
            if items[:1] == [b"cancel"]:
                return True
        return False


def b(s):
    return s if isinstance(s, bytes) else str(s).encode("utf-8")


def to_frame(value, tinyfaas):
    """What a handler returned -> ["ok", status, body, headers...]."""
    status, headers, body = 200, {}, value
    if isinstance(value, Response):
        status, headers, body = value.status, value.headers, value.body
    elif isinstance(value, tuple) and 2 <= len(value) <= 3:
        body, status = value[0], value[1]
        headers = dict(value[2]) if len(value) == 3 else {}
    headers = {str(k).lower(): str(v) for k, v in headers.items()}
    if body is None:
        data = b""
        if tinyfaas:
            headers.setdefault("content-type", "text/plain; charset=utf-8")
        elif status == 200 and not isinstance(value, (Response, tuple)):
            status = 204
    elif isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
        headers.setdefault("content-type", "application/octet-stream")
    elif isinstance(body, str):
        data = body.encode("utf-8")
        headers.setdefault("content-type", "text/plain; charset=utf-8")
    else:
        data = json.dumps(body).encode("utf-8")
        headers.setdefault("content-type", "application/json")
    status = int(status)
    if not 100 <= status <= 599:
        raise ValueError(f"invalid HTTP status {status}")
    out = [b"ok", str(status).encode(), data]
    for k, v in headers.items():
        out += [k.encode("latin-1"), v.encode("utf-8")]
    return out


def streams(value):
    """Does a handler's value stream its answer?"""
    return isinstance(value, Stream) or inspect.isgenerator(value)


def stream(conn, value):
    """Send a streamed answer's head and pieces; its last frame is returned.
    The head goes with the first piece, so a generator that raises before
    yielding is answered as an error (500), not a stream cut short. A
    content type not given is text/plain; charset=utf-8 if the first piece
    is a str, application/octet-stream if it is bytes."""
    status, headers, body = 200, {}, value
    if isinstance(value, Stream):
        status, headers, body = value.status, value.headers, value.body
    headers = {str(k).lower(): str(v) for k, v in headers.items()}
    status = int(status)
    if not 200 <= status <= 599:
        raise ValueError(f"invalid HTTP status {status} for a streamed answer")
    pieces = iter(body)
    started = False
    try:
        for piece in pieces:
            if isinstance(piece, str):
                data, kind = piece.encode("utf-8"), "text/plain; charset=utf-8"
            elif isinstance(piece, (bytes, bytearray, memoryview)):
                data, kind = bytes(piece), "application/octet-stream"
            else:
                raise TypeError(
                    f"a streamed piece must be str or bytes, not {type(piece).__name__}")
            if not data:
                continue
            if not started:
                headers.setdefault("content-type", kind)
                head = [b"head", str(status).encode()]
                for k, v in headers.items():
                    head += [k.encode("latin-1"), v.encode("utf-8")]
                conn.send(head)
                started = True
            for off in range(0, len(data), MAX_CHUNK_BYTES):
                conn.send([b"chunk", data[off:off + MAX_CHUNK_BYTES]])
            if conn.cancelled():
                break
    finally:
        # Runs the generator's `finally` blocks when it did not finish.
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    if not started:
        # Nothing yielded: an empty answer, whole.
        out = [b"ok", str(status).encode(), b""]
        for k, v in headers.items():
            out += [k.encode("latin-1"), v.encode("utf-8")]
        return out
    return [b"end"]


def main():
    conn = Conn(os.environ["FUNCATRON_SOCKET"])
    bundle = os.environ["FUNCATRON_BUNDLE"]
    handler = os.environ["FUNCATRON_HANDLER"]
    tinyfaas = os.environ.get("FUNCATRON_STYLE") == "tinyfaas"
    operations = [o for o in os.environ.get("FUNCATRON_OPERATIONS", "").split(",") if o]
    mod = types.ModuleType("funcatron")
    mod.Response, mod.Request, mod.Stream = Response, Request, Stream
    mod.store, mod.Store, mod.StoreError = Store(conn), Store, StoreError
    sys.modules["funcatron"] = mod
    try:
        os.chdir(bundle)
        sys.path.insert(0, bundle)
        spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(handler))[0], os.path.join(bundle, handler))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if tinyfaas:
            fn = getattr(module, "fn", None)
            if not callable(fn):
                raise LookupError(f"{handler} defines no function `fn`")
            try:
                arity = len(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                arity = 2
            handlers = {}
        else:
            missing = [o for o in operations if not callable(getattr(module, o, None))]
            if missing:
                raise LookupError(
                    f"{handler} has no function for operationId {', '.join(missing)}")
            handlers = {o: getattr(module, o) for o in operations}
    except BaseException:
        conn.send([b"error", b(f"{handler} failed to load:\n" + traceback.format_exc(limit=-3))])
        sys.exit(1)
    conn.send([b"ready"])
    while True:
        items = conn.read()
        if items is None:
            return
        if items[:1] == [b"cancel"]:
            # For a stream that had ended already.
            continue
        try:
            req = Request(items)
            if tinyfaas:
                text = req.body.decode("utf-8", "replace") if req.body else None
                value = fn(text, req.headers) if arity >= 2 else fn(text)
            else:
                value = handlers[req.operation](req)
            frame = stream(conn, value) if streams(value) else to_frame(value, tinyfaas)
        except Exception as e:
            print(f"request {items[1].decode('utf-8', 'replace')}: " + traceback.format_exc(),
                  file=sys.stderr, flush=True)
            frame = [b"error", b(f"{type(e).__name__}: {e}")]
        conn.send(frame)


if __name__ == "__main__":
    main()
