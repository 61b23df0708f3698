// Streamed answers from a Node.js Func. A handler that returns a generator,
// an async generator or another async iterable (or { status, headers, body }
// with one as its body) streams: each string or Buffer it yields reaches the
// client as soon as it is yielded when the request came direct (one asking
// for text/event-stream does), and the pieces are collected into one answer
// otherwise.
'use strict';
const crypto = require('crypto');
const net = require('net');

const SSE = { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' };
// Which worker process answers (whoami).
const WORKER = crypto.randomUUID();

// What the local `port` sends, up to its end.
function wordFrom(port) {
  return new Promise((resolve, reject) => {
    let got = '';
    const s = net.createConnection(Number(port), '127.0.0.1');
    s.on('data', (d) => { got += d; });
    s.on('end', () => resolve(got));
    s.on('error', reject);
  });
}

// Say `text` to the local `port` (resolves once it is sent).
function tell(port, text) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(Number(port), '127.0.0.1', () => s.end(text, resolve));
    s.on('error', reject);
  });
}

// `n` events after `ready`; with `port`, after `ready` it waits for a word
// from that local port and sends it as an event.
exports.events = (req) => {
  const n = Number(req.query.n || 3);
  const { port } = req.query;
  async function* pieces() {
    yield 'data: ready\n\n';
    if (port) yield `data: ${await wordFrom(port)}\n\n`;
    for (let i = 1; i <= n; i++) yield `id: ${i}\ndata: ${i}\n\n`;
  }
  return { status: 200, headers: SSE, body: pieces() };
};

// A generator function: three blocks of `kib` KiB of bytes (A, B, C), sent
// as application/octet-stream.
exports.blocks = function* blocks(req) {
  const size = Number(req.query.kib || 1) * 1024;
  for (const letter of 'ABC') yield Buffer.alloc(size, letter);
};

// Throws after its first piece (with `port`: once that port sent its
// word): the stream is cut off.
exports.fail = async function* fail(req) {
  yield 'data: first\n\n';
  if (req.query.port) await wordFrom(req.query.port);
  throw new Error('the source dried up');
};

// The worker dies after its first piece (with `port`: once that port sent
// its word).
exports.crash = async function* crash(req) {
  yield 'data: first\n\n';
  if (req.query.port) await wordFrom(req.query.port);
  else await new Promise((resolve) => setImmediate(resolve));
  process.exit(3);
};

// Ticks until the client leaves; then (its generator closed) says `closed`
// to the local `port`.
exports.forever = (req) => {
  const port = Number(req.query.port);
  async function* ticks() {
    try {
      for (let n = 1; ; n++) {
        yield `data: tick ${n}\n\n`;
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    } finally {
      await tell(port, 'closed');
    }
  }
  return { status: 200, headers: SSE, body: ticks() };
};

exports.whoami = () => ({ worker: WORKER });
