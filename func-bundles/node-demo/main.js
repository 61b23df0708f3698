// A Node.js Func: one exported function per operationId. A function of one
// argument gets the request and returns (or resolves to) the answer: a
// string (text), Buffer (binary), object/array (JSON), null (204) or
// { status, headers, body }. A function of two arguments is Express-style:
// (req, res) with res.status(), res.set(), res.send(), res.json().
'use strict';

exports.hello = (req) => ({
  greeting: Array(Number(req.query.times || 1)).fill(`${process.env.GREETING || 'Hi'}, ${req.params.name}!`).join(' '),
  runtime: 'nodejs',
  trace: req.headers['x-trace'] || null,
});

exports.echo = (req) => ({
  status: 200,
  headers: {
    'content-type': req.headers['content-type'] || 'application/octet-stream',
    'x-echo-length': String(req.body.length),
  },
  body: req.body,
});

// Express-style, to show both contracts.
exports.createItem = (req, res) => {
  const item = JSON.parse(req.body.toString('utf8'));
  res.status(201).json({ name: item.name, qty: item.qty, total: item.qty * 2 });
};

exports.headers = (req) => ({
  headers: req.headers, method: req.method, path: req.path, query: req.query, id: req.id,
});

exports.status = (req) => {
  const code = Number(req.params.code);
  return { status: code, body: `status ${code}` };
};

exports.env = () => ({
  GREETING: process.env.GREETING || null,
  API_TOKEN: process.env.API_TOKEN || null,
  HOME: process.env.HOME || null,
});

exports.sleep = (req) => new Promise((resolve) => setTimeout(() => resolve('slept'), Number(req.query.ms)));

exports.crash = () => process.exit(3);

exports.fail = () => { throw new TypeError('this Func always fails'); };

exports.noisy = (req) => {
  process.stdout.write('\u0000\u0001garbage on stdout that is not a frame\n');
  console.error(`a line on stderr for ${req.id}`);
  return 'still fine';
};
