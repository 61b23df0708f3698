-- The stream Func: direct mode and answers written in pieces.
--
-- On a direct route (x-funcatron-direct in the document) the body is not
-- in req.body: req.read() returns it piece by piece, then nil. req.start
-- sets the answer's status and headers; each req.write(piece) reaches the
-- client as soon as it is written when the request came direct (a request
-- asking for text/event-stream always does), and is collected into one
-- answer otherwise.
local M = {}

function M.echo(req)
  req.start(200, { ["content-type"] = req.headers["content-type"] or "application/octet-stream" })
  while true do
    local piece = req.read()
    if piece == nil then break end
    req.write(piece)
  end
end

function M.count(req)
  local n = 0
  while true do
    local piece = req.read()
    if piece == nil then break end
    n = n + #piece
  end
  return { bytes = n }
end

function M.events(req)
  local n = tonumber(req.query.n) or 3
  req.start(200, { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache" })
  for i = 1, n do
    req.write("id: " .. i .. "\ndata: " .. json.encode({ n = i }) .. "\n\n")
  end
end

function M.chat(req)
  req.start(200, { ["content-type"] = "text/event-stream" })
  req.write("data: ready\n\n")
  while true do
    local piece = req.read()
    if piece == nil then break end
    req.write("data: " .. piece:upper() .. "\n\n")
  end
  req.write("data: bye\n\n")
end

return M
