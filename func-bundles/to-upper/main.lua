-- to-upper: the body in upper case, its content type kept.
local M = {}

function M.upper(req)
  return {
    status = 200,
    headers = { ["content-type"] = req.headers["content-type"] or "text/plain; charset=utf-8" },
    body = string.upper(req.body),
  }
end

return M
