-- echo-lua: the body back with its content type.
local M = {}

function M.echo(req)
  return {
    status = 200,
    headers = { ["content-type"] = req.headers["content-type"] or "application/octet-stream" },
    body = req.body,
  }
end

return M
