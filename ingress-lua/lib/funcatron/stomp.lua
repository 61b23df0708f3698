-- A minimal STOMP 1.2 client over nginx cosockets, for RabbitMQ's STOMP
-- plugin: CONNECT, SEND with receipts (RabbitMQ confirms the publish before
-- it sends the RECEIPT), SUBSCRIBE, and frame reading with content-length
-- so bodies are binary-safe.
local M = {}
local mt = { __index = M }

local concat = table.concat

local function escape(v)
  v = tostring(v)
  return (v:gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub("\r", "\\r"):gsub(":", "\\c"))
end

local function unescape(v)
  return (v:gsub("\\(.)", { n = "\n", r = "\r", c = ":", ["\\"] = "\\" }))
end

--- Connect (or reuse a pooled, already-CONNECTed socket).
--- opts: host, port, vhost, login, passcode, timeout_ms, and for pooled
--- connections pool (name), pool_size (most connections per worker) and
--- backlog (requests that may wait for a free one, within the connect timeout).
function M.connect(opts)
  local sock = ngx.socket.tcp()
  local t = opts.timeout_ms or 5000
  sock:settimeouts(opts.connect_timeout_ms or 1000, t, t)
  local popts = opts.pool and { pool = opts.pool, pool_size = opts.pool_size, backlog = opts.backlog } or nil
  local ok, err = sock:connect(opts.host, opts.port, popts)
  if not ok then return nil, "connect " .. opts.host .. ":" .. opts.port .. ": " .. tostring(err) end
  local self = setmetatable({ sock = sock, receipts = 0, read_timeout = t }, mt)
  if (sock:getreusedtimes() or 0) == 0 then
    local frame = concat({
      "CONNECT", "accept-version:1.2", "host:" .. opts.vhost, "login:" .. opts.login,
      "passcode:" .. opts.passcode, "heart-beat:0,0", "", "" }, "\n") .. "\0"
    local _, serr = sock:send(frame)
    if serr then sock:close() return nil, "STOMP CONNECT: " .. serr end
    local f, rerr = self:read_frame()
    if not f then sock:close() return nil, "STOMP CONNECT: " .. tostring(rerr) end
    if f.command ~= "CONNECTED" then
      sock:close()
      return nil, "STOMP CONNECT refused: " .. tostring(f.headers.message or f.command)
    end
  end
  return self
end

--- Send one frame.
function M:send_frame(command, headers, body)
  local lines = { command }
  for k, v in pairs(headers) do lines[#lines + 1] = k .. ":" .. escape(v) end
  if body then lines[#lines + 1] = "content-length:" .. #body end
  lines[#lines + 1] = ""
  lines[#lines + 1] = body or ""
  local _, err = self.sock:send(concat(lines, "\n") .. "\0")
  return err == nil, err
end

--- Read one frame: { command, headers, body } or nil, err ("timeout" when idle).
function M:read_frame()
  local sock = self.sock
  local line, err
  repeat -- skip heart-beat newlines between frames
    line, err = sock:receive("*l")
    if not line then return nil, err end
  until line ~= "" and line ~= "\r"
  local f = { command = line:gsub("\r$", ""), headers = {} }
  while true do
    local h, herr = sock:receive("*l")
    if not h then return nil, herr end
    h = h:gsub("\r$", "")
    if h == "" then break end
    local k, v = h:match("^([^:]+):(.*)$")
    -- The first occurrence of a repeated header wins (STOMP 1.2).
    if k and f.headers[unescape(k)] == nil then f.headers[unescape(k)] = unescape(v) end
  end
  local len = tonumber(f.headers["content-length"])
  if len then
    local body, berr = len > 0 and sock:receive(len) or ""
    if not body then return nil, berr end
    local nul, nerr = sock:receive(1)
    if not nul then return nil, nerr end
    f.body = body
  else
    local reader = sock:receiveuntil("\0")
    local body, berr = reader()
    if not body then return nil, berr end
    f.body = body
  end
  return f
end

--- Publish and wait for the broker's receipt (a publisher confirm).
function M:send_confirmed(destination, body, headers)
  self.receipts = self.receipts + 1
  local receipt = "r" .. self.receipts
  headers = headers or {}
  headers.destination = destination
  headers.receipt = receipt
  local ok, err = self:send_frame("SEND", headers, body)
  if not ok then return nil, err end
  while true do
    local f, rerr = self:read_frame()
    if not f then return nil, rerr end
    if f.command == "RECEIPT" and f.headers["receipt-id"] == receipt then
      -- RabbitMQ ends frames with "\0\n": read that EOL too, or the socket
      -- cannot go back to the keepalive pool (unread data).
      self.sock:settimeouts(1000, self.read_timeout, 50)
      local eol = self.sock:receive(1)
      self.sock:settimeouts(1000, self.read_timeout, self.read_timeout)
      if eol ~= nil and eol ~= "\n" and eol ~= "\r" then
        return nil, "unexpected data after a receipt"
      end
      return true
    end
    if f.command == "ERROR" then
      return nil, "broker refused the message: " .. tostring(f.headers.message)
    end
  end
end

function M:setkeepalive(idle_ms, pool_size)
  local ok, err = self.sock:setkeepalive(idle_ms, pool_size)
  if not ok then ngx.log(ngx.WARN, "funcatron: STOMP connection not pooled: ", err) end
  return ok, err
end

function M:close()
  return self.sock:close()
end

return M
