// echo-node: the body back with its content type.
'use strict';

exports.echo = (req) => ({
  status: 200,
  headers: { 'content-type': req.headers['content-type'] || 'application/octet-stream' },
  body: req.body,
});
