// Funcatron's Node.js worker: loads one bundle once, then serves many
// invocations from its Runner over a Unix socket (frame format:
// runner/src/worker/frame.rs). Started by the Runner; not run by hand.
'use strict';
const net = require('net');
const path = require('path');
const { URLSearchParams } = require('url');

const env = process.env;
const bundle = env.FUNCATRON_BUNDLE;
const handlerName = env.FUNCATRON_HANDLER;
const tinyfaas = env.FUNCATRON_STYLE === 'tinyfaas';
const operations = (env.FUNCATRON_OPERATIONS || '').split(',').filter(Boolean);

function encode(items) {
  const bufs = items.map((i) => (Buffer.isBuffer(i) ? i : Buffer.from(String(i), 'utf8')));
  const head = Buffer.alloc(4 + 4 * bufs.length);
  head.writeUInt32BE(bufs.length, 0);
  const parts = [head.subarray(0, 4)];
  bufs.forEach((b, n) => {
    head.writeUInt32BE(b.length, 4 + 4 * n);
    parts.push(head.subarray(4 + 4 * n, 8 + 4 * n), b);
  });
  return Buffer.concat(parts);
}

function parseQuery(qs) {
  const out = {};
  for (const [k, v] of new URLSearchParams(qs)) {
    if (k in out) out[k] = [].concat(out[k], v);
    else out[k] = v;
  }
  return out;
}

// The document store, through the Runner (docs/runtimes.md): each call
// sends a `store` frame and resolves with the Runner's answer; answers
// come back in the order asked.
const storeWaiting = [];
class StoreError extends Error {
  constructor(status, body) {
    super(`${status} ${body && body.error}: ${body && body.message}`);
    this.name = 'StoreError';
    this.status = status;
    this.code = body && body.error;
    this.body = body;
  }
}
function storeCall(op) {
  return new Promise((resolve, reject) => {
    storeWaiting.push({ resolve, reject });
    send(['store', JSON.stringify(op)]);
  });
}
async function storeOk(op) {
  const [status, body] = await storeCall(op);
  if (status >= 400) throw new StoreError(status, body);
  return body;
}
const versioned = (op, o) => storeOk(o && o.ifVersion != null ? { ...op, if_version: o.ifVersion } : op);
const store = {
  async get(collection, id) {
    const [status, body] = await storeCall({ op: 'get', collection, id });
    if (status === 404 && body && body.error === 'not_found') return null;
    if (status >= 400) throw new StoreError(status, body);
    return body;
  },
  list(collection, o = {}) {
    const op = { op: 'list', collection, filter: o.filter || {} };
    if (o.limit != null) op.limit = o.limit;
    if (o.after != null) op.after = o.after;
    return storeOk(op);
  },
  create(collection, doc, id) {
    return storeOk(id == null ? { op: 'create', collection, doc } : { op: 'create', collection, doc, id });
  },
  put: (collection, id, doc, o) => versioned({ op: 'put', collection, id, doc }, o),
  merge: (collection, id, patch, o) => versioned({ op: 'merge', collection, id, patch }, o),
  delete: (collection, id, o) => versioned({ op: 'delete', collection, id }, o),
  StoreError,
};

function request(items) {
  const s = (i) => items[i].toString('utf8');
  const headers = {};
  const n = parseInt(s(10), 10);
  for (let i = 11; i < 11 + 2 * n; i += 2) {
    const k = items[i].toString('latin1');
    const v = items[i + 1].toString('utf8');
    headers[k] = k in headers ? `${headers[k]}, ${v}` : v;
  }
  const params = {};
  for (let i = 11 + 2 * n; i + 1 < items.length; i += 2) params[s(i)] = s(i + 1);
  const body = items[8];
  return {
    id: s(1), operation: s(2), method: s(3), scheme: s(4), host: s(5), path: s(6),
    queryString: s(7), query: parseQuery(s(7)), headers, params, body, store,
    get text() { return body.toString('utf8'); },
    json() { return body.length ? JSON.parse(body.toString('utf8')) : null; },
    get(name) { return headers[String(name).toLowerCase()]; },
    header(name) { return headers[String(name).toLowerCase()]; },
  };
}

function frameOf(status, headers, body, tinyMode) {
  const h = {};
  for (const [k, v] of Object.entries(headers || {})) h[k.toLowerCase()] = String(v);
  let data;
  if (body === undefined || body === null) {
    data = Buffer.alloc(0);
  } else if (Buffer.isBuffer(body) || body instanceof Uint8Array) {
    data = Buffer.from(body);
    if (!h['content-type']) h['content-type'] = 'application/octet-stream';
  } else if (typeof body === 'string') {
    data = Buffer.from(body, 'utf8');
    if (!h['content-type']) h['content-type'] = tinyMode ? 'text/html; charset=utf-8' : 'text/plain; charset=utf-8';
  } else {
    data = Buffer.from(JSON.stringify(body), 'utf8');
    if (!h['content-type']) h['content-type'] = 'application/json';
  }
  status = Number(status);
  if (!Number.isInteger(status) || status < 100 || status > 599) throw new Error(`invalid HTTP status ${status}`);
  const out = ['ok', String(status), data];
  for (const [k, v] of Object.entries(h)) out.push(k, v);
  return out;
}

// What a native handler returned -> frame: { status, headers, body } objects
// (exactly those keys, status an integer) set the response; anything else is
// the body.
function fromValue(v) {
  if (v && typeof v === 'object' && !Buffer.isBuffer(v) && Number.isInteger(v.status)
      && Object.keys(v).every((k) => k === 'status' || k === 'headers' || k === 'body')) {
    return frameOf(v.status, v.headers, v.body, false);
  }
  if (v === undefined || v === null) return ['ok', '204', Buffer.alloc(0)];
  return frameOf(200, {}, v, false);
}

// A native handler's value -> its last frame: streamed (a generator, or
// { status, headers, body } with such a body) or whole.
async function answer(v) {
  if (streamable(v)) return stream(200, {}, v);
  if (v && typeof v === 'object' && Number.isInteger(v.status) && streamable(v.body)
      && Object.keys(v).every((k) => k === 'status' || k === 'headers' || k === 'body')) {
    return stream(v.status, v.headers, v.body);
  }
  return fromValue(v);
}

// Express-style (req, res): resolves when the handler sends.
function express(fn, req) {
  return new Promise((resolve, reject) => {
    let status = 200;
    const headers = {};
    let done = false;
    const finish = (body) => {
      if (done) return;
      done = true;
      try { resolve(frameOf(status, headers, body, true)); } catch (e) { reject(e); }
    };
    const res = {
      status(code) { status = code; return res; },
      sendStatus(code) { status = code; finish(String(code)); return res; },
      set(k, v) {
        if (typeof k === 'object') Object.assign(headers, k); else headers[k] = v;
        return res;
      },
      header(k, v) { return res.set(k, v); },
      setHeader(k, v) { return res.set(k, v); },
      type(t) { headers['content-type'] = t.includes('/') ? t : `application/${t}`; return res; },
      send(body) { finish(typeof body === 'number' ? String(body) : body); return res; },
      json(body) { headers['content-type'] = headers['content-type'] || 'application/json'; finish(JSON.stringify(body)); return res; },
      end(body) { finish(body); return res; },
    };
    const expressReq = Object.assign({}, req, {
      body: tinyfaas ? req.body.toString('utf8') : req.body,
      rawBody: req.body,
    });
    try {
      Promise.resolve(fn(expressReq, res)).catch(reject);
    } catch (e) {
      reject(e);
    }
  });
}

const sock = net.createConnection(env.FUNCATRON_SOCKET);
const send = (items) => sock.write(encode(items));
// A send that waits while the socket's buffer is full: a Func streaming
// faster than its client reads is held back, not buffered without end.
const sendInTurn = (items) => (send(items) ? null : new Promise((resolve) => sock.once('drain', resolve)));

// The largest piece in one frame (runner/src/worker/frame.rs,
// MAX_CHUNK_BYTES): larger pieces are split.
const MAX_CHUNK_BYTES = 1024 * 1024;

// The stream open now: `cancelled` is set when the Runner sends `cancel`.
let open = null;

const tag = (v) => Object.prototype.toString.call(v);
// Values that stream: generators, async generators, and other async
// iterables (a Readable stream, say); not strings, Buffers or arrays.
function streamable(v) {
  if (v === null || typeof v !== 'object') return false;
  return tag(v) === '[object Generator]' || tag(v) === '[object AsyncGenerator]'
    || typeof v[Symbol.asyncIterator] === 'function';
}

// Send a streamed answer's head and pieces; returns its last frame. The
// head goes with the first piece (a generator that throws before yielding
// is answered as an error). A content type not given is
// text/plain; charset=utf-8 if the first piece is a string,
// application/octet-stream if it is a Buffer.
async function stream(status, headers, body) {
  const h = {};
  for (const [k, v] of Object.entries(headers || {})) h[k.toLowerCase()] = String(v);
  status = Number(status);
  if (!Number.isInteger(status) || status < 200 || status > 599) throw new Error(`invalid HTTP status ${status} for a streamed answer`);
  const state = { cancelled: false };
  open = state;
  let started = false;
  try {
    // `for await` closes the generator (its `finally` runs) on break and
    // on a throw.
    for await (const piece of body) {
      let data;
      let kind;
      if (typeof piece === 'string') {
        data = Buffer.from(piece, 'utf8');
        kind = 'text/plain; charset=utf-8';
      } else if (Buffer.isBuffer(piece) || piece instanceof Uint8Array) {
        data = Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
        kind = 'application/octet-stream';
      } else {
        throw new TypeError(`a streamed piece must be a string or a Buffer, not ${piece === null ? 'null' : typeof piece}`);
      }
      if (!data.length) continue;
      if (!started) {
        if (!h['content-type']) h['content-type'] = kind;
        const head = ['head', String(status)];
        for (const [k, v] of Object.entries(h)) head.push(k, v);
        await sendInTurn(head);
        started = true;
      }
      for (let off = 0; off < data.length; off += MAX_CHUNK_BYTES) {
        await sendInTurn(['chunk', data.subarray(off, off + MAX_CHUNK_BYTES)]);
      }
      if (state.cancelled) break;
    }
  } finally {
    open = null;
  }
  if (!started) {
    // Nothing yielded: an empty answer, whole.
    const out = ['ok', String(status), Buffer.alloc(0)];
    for (const [k, v] of Object.entries(h)) out.push(k, v);
    return out;
  }
  return ['end'];
}

let handlers = {};
let expressFn = null;
sock.on('connect', () => {
  try {
    const mod = require(path.resolve(bundle, handlerName));
    if (tinyfaas) {
      expressFn = typeof mod === 'function' ? mod : mod && (mod.fn || mod.default);
      if (typeof expressFn !== 'function') throw new Error(`${handlerName} exports no function`);
    } else {
      const missing = operations.filter((o) => typeof mod[o] !== 'function');
      if (missing.length) throw new Error(`${handlerName} exports no function for operationId ${missing.join(', ')}`);
      for (const o of operations) handlers[o] = mod[o];
    }
  } catch (e) {
    sock.end(encode(['error', `${handlerName} failed to load: ${e && e.stack || e}`]), () => process.exit(1));
    return;
  }
  send(['ready']);
});

async function serve(items) {
  let frame;
  try {
    const req = request(items);
    if (tinyfaas) {
      frame = await express(expressFn, req);
    } else {
      const fn = handlers[req.operation];
      frame = fn.length >= 2 ? await express(fn, req) : await answer(await fn(req));
    }
  } catch (e) {
    console.error(`request ${items[1]}: ${e && e.stack || e}`);
    frame = ['error', `${e && e.name || 'Error'}: ${e && e.message || e}`];
  }
  send(frame);
}

let buf = Buffer.alloc(0);
sock.on('data', (chunk) => {
  buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
  for (;;) {
    if (buf.length < 4) return;
    const count = buf.readUInt32BE(0);
    let off = 4;
    const items = [];
    for (let i = 0; i < count; i++) {
      if (buf.length < off + 4) return;
      const n = buf.readUInt32BE(off);
      if (buf.length < off + 4 + n) return;
      items.push(buf.subarray(off + 4, off + 4 + n));
      off += 4 + n;
    }
    buf = buf.subarray(off);
    if (items.length === 3 && items[0].toString('latin1') === 'store') {
      const w = storeWaiting.shift();
      if (w) w.resolve([parseInt(items[1].toString('latin1'), 10), JSON.parse(items[2].toString('utf8'))]);
      continue;
    }
    if (items.length && items[0].toString('latin1') === 'cancel') {
      // For the open stream; or one that had ended already.
      if (open) open.cancelled = true;
      continue;
    }
    serve(items);
  }
});
sock.on('close', () => process.exit(0));
sock.on('error', (e) => { console.error(`worker socket: ${e}`); process.exit(1); });
