-- A minimal AMQP 0-9-1 client over nginx cosockets, for RabbitMQ: the
-- handshake (PLAIN auth, no heartbeats), channels, queue and fanout
-- exchange declarations, bindings, auto-ack consumers, and the frames of
-- publishes (`mandatory` to a queue, or to an exchange, with headers); the caller
-- reads frames and matches deliveries, confirms and returns itself, so many
-- publishes can be in flight on one connection. Pure Lua arithmetic, no bit library, so it runs
-- in LuaJIT and in Lua 5.4 alike.
local M = {}
local mt = { __index = M }

local byte, char, sub, concat, floor = string.byte, string.char, string.sub, table.concat, math.floor
local FRAME_END = "\206"

local function u8(n) return char(n % 256) end
local function u16(n) return char(floor(n / 256) % 256, n % 256) end
local function u32(n)
  return char(floor(n / 16777216) % 256, floor(n / 65536) % 256, floor(n / 256) % 256, n % 256)
end
local function u64(n) return u32(floor(n / 4294967296)) .. u32(n % 4294967296) end
local function shortstr(s) return u8(#s) .. s end
local function longstr(s) return u32(#s) .. s end

local function r_u16(s, i) local a, b = byte(s, i, i + 1) return a * 256 + b end
local function r_u32(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function r_u64(s, i) return r_u32(s, i) * 4294967296 + r_u32(s, i + 4) end
local function r_shortstr(s, i) local n = byte(s, i) return sub(s, i + 1, i + n), i + 1 + n end

-- Readers the caller needs to parse method frames itself.
M.r_u16, M.r_u64 = r_u16, r_u64

-- Read exactly n bytes. A read timeout with nothing read returns
-- nil, "timeout" (the caller may idle); a timeout mid-frame keeps reading.
function M:read_exact(n)
  local got, parts = 0, {}
  while got < n do
    local data, err, partial = self.sock:receive(n - got)
    data = data or partial
    if data and #data > 0 then
      parts[#parts + 1] = data
      got = got + #data
    end
    if err then
      if err ~= "timeout" or got == 0 then return nil, err end
    end
  end
  return concat(parts)
end

--- Read one frame: { type, channel, payload }.
function M:read_frame()
  local hdr, err = self:read_exact(7)
  if not hdr then return nil, err end
  -- Payload and frame-end octet in one read.
  local size = r_u32(hdr, 4)
  local rest
  rest, err = self:read_exact(size + 1)
  if not rest then return nil, err end
  if byte(rest, size + 1) ~= 206 then return nil, "bad frame end" end
  return { type = byte(hdr, 1), channel = r_u16(hdr, 2), payload = sub(rest, 1, size) }
end

local function method_frame(channel, class, method, args)
  local payload = u16(class) .. u16(method) .. args
  return "\1" .. u16(channel) .. u32(#payload) .. payload .. FRAME_END
end

function M:send_method(channel, class, method, args)
  local _, err = self.sock:send(method_frame(channel, class, method, args))
  return err == nil, err
end

local function close_reason(payload)
  local code = r_u16(payload, 5)
  local text = r_shortstr(payload, 7)
  return code .. " " .. text
end
M.close_reason = close_reason

--- Read frames until the method (class, method); returns its arguments.
--- Connection.Close / Channel.Close become errors with the broker's reason.
function M:expect(class, method)
  while true do
    local f, err = self:read_frame()
    if not f then return nil, err end
    if f.type == 1 then
      local c, m = r_u16(f.payload, 1), r_u16(f.payload, 3)
      if c == class and m == method then return sub(f.payload, 5) end
      if (c == 10 and m == 50) or (c == 20 and m == 40) then
        return nil, "broker closed: " .. close_reason(f.payload)
      end
    end
  end
end

--- Connect and open channel 1.
--- opts: host, port, vhost, login, passcode, timeout_ms, connect_timeout_ms
function M.connect(opts)
  local sock = ngx.socket.tcp()
  local t = opts.timeout_ms or 5000
  sock:settimeouts(opts.connect_timeout_ms or 1000, t, t)
  local ok, err = sock:connect(opts.host, opts.port)
  if not ok then return nil, "connect " .. opts.host .. ":" .. opts.port .. ": " .. tostring(err) end
  local self = setmetatable({ sock = sock, frame_max = 131072 }, mt)
  local function fail(e) sock:close() return nil, "AMQP handshake: " .. tostring(e) end
  local _, serr = sock:send("AMQP\0\0\9\1")
  if serr then return fail(serr) end
  local args, e = self:expect(10, 10) -- connection.start
  if not args then return fail(e) end
  self:send_method(0, 10, 11, u32(0) .. shortstr("PLAIN")
    .. longstr("\0" .. opts.login .. "\0" .. opts.passcode) .. shortstr("en_US"))
  args, e = self:expect(10, 30) -- connection.tune
  if not args then return fail(e or "authentication refused") end
  local channel_max, frame_max = r_u16(args, 1), r_u32(args, 3)
  if frame_max > 0 and frame_max < self.frame_max then self.frame_max = frame_max end
  self:send_method(0, 10, 31, u16(channel_max) .. u32(self.frame_max) .. u16(0)) -- tune-ok, no heartbeats
  self:send_method(0, 10, 40, shortstr(opts.vhost) .. shortstr("") .. u8(0)) -- connection.open
  args, e = self:expect(10, 41)
  if not args then return fail(e) end
  args, e = self:open_channel(1, false)
  if not args then return fail(e) end
  return self
end

-- An AMQP field table of string values: { {name, value}, ... }.
local function string_table(pairs_list)
  local parts = {}
  for i, kv in ipairs(pairs_list) do
    parts[i] = shortstr(kv[1]) .. "S" .. longstr(kv[2])
  end
  local body = concat(parts)
  return u32(#body) .. body
end

--- The frames of one publish on `channel` (a string to send; nothing is
--- awaited): to `queue` through the default exchange, `mandatory`; or,
--- with `props.exchange`, to that exchange (routing key `queue`, not
--- mandatory). `props.headers`: { {name, value}, ... } string headers.
function M:publish_frames(channel, queue, body, props)
  props = props or {}
  local flags, p = 0x1000, {}
  if props.content_type then flags = flags + 0x8000 p[#p + 1] = shortstr(props.content_type) end
  if props.headers and #props.headers > 0 then
    flags = flags + 0x2000
    p[#p + 1] = string_table(props.headers)
  end
  p[#p + 1] = u8(props.persistent and 2 or 1)
  if props.expiration then flags = flags + 0x0100 p[#p + 1] = shortstr(props.expiration) end
  local header = u16(60) .. u16(0) .. u64(#body) .. u16(flags) .. concat(p)
  local exchange, mandatory = props.exchange or "", props.exchange and 0 or 1
  local out = {
    method_frame(channel, 60, 40, u16(0) .. shortstr(exchange) .. shortstr(queue) .. u8(mandatory)),
    "\2" .. u16(channel) .. u32(#header) .. header .. FRAME_END,
  }
  local chunk = self.frame_max - 8
  for i = 1, #body, chunk do
    local part = sub(body, i, i + chunk - 1)
    out[#out + 1] = "\3" .. u16(channel) .. u32(#part) .. part .. FRAME_END
  end
  return concat(out)
end

--- Open another channel, optionally in confirm mode.
function M:open_channel(channel, confirm)
  self:send_method(channel, 20, 10, shortstr(""))
  local args, err = self:expect(20, 11)
  if not args then return nil, err end
  if confirm then
    self:send_method(channel, 85, 10, u8(0))
    args, err = self:expect(85, 11)
    if not args then return nil, err end
  end
  return true
end

--- Declare a durable, shared queue (idempotent).
function M:declare_durable(queue)
  self:send_method(1, 50, 10, u16(0) .. shortstr(queue) .. u8(2) .. u32(0)) -- durable
  return self:expect(50, 11)
end

--- Declare an exclusive, auto-delete queue and consume it with auto-ack.
function M:consume_exclusive(queue)
  self:send_method(1, 50, 10, u16(0) .. shortstr(queue) .. u8(4 + 8) .. u32(0)) -- exclusive, auto-delete
  local args, err = self:expect(50, 11)
  if not args then return nil, err end
  self:send_method(1, 60, 20, u16(0) .. shortstr(queue) .. shortstr("") .. u8(2 + 4) .. u32(0)) -- no-ack, exclusive
  args, err = self:expect(60, 21)
  if not args then return nil, err end
  return true
end

--- Declare a fanout exchange as the Rust broker seam does (not durable,
--- not auto-delete: funcatron_broker's topics).
function M:declare_fanout(exchange)
  self:send_method(1, 40, 10, u16(0) .. shortstr(exchange) .. shortstr("fanout") .. u8(0) .. u32(0))
  return self:expect(40, 11)
end

--- Declare an exclusive, auto-delete queue bound to each of `exchanges`
--- (fanout topics, declared here too) and consume it with auto-ack under
--- consumer tag `tag`.
function M:subscribe(queue, exchanges, tag)
  self:send_method(1, 50, 10, u16(0) .. shortstr(queue) .. u8(4 + 8) .. u32(0)) -- exclusive, auto-delete
  local args, err = self:expect(50, 11)
  if not args then return nil, err end
  for _, x in ipairs(exchanges) do
    args, err = self:declare_fanout(x)
    if not args then return nil, err end
    self:send_method(1, 50, 20, u16(0) .. shortstr(queue) .. shortstr(x) .. shortstr("") .. u8(0) .. u32(0))
    args, err = self:expect(50, 21)
    if not args then return nil, err end
  end
  self:send_method(1, 60, 20, u16(0) .. shortstr(queue) .. shortstr(tag) .. u8(2 + 4) .. u32(0)) -- no-ack, exclusive
  args, err = self:expect(60, 21)
  if not args then return nil, err end
  return true
end

--- The exchange a basic.deliver's arguments (after class and method)
--- name: consumer tag, delivery tag, redelivered, exchange.
function M.deliver_exchange(args)
  local _, i = r_shortstr(args, 1)
  return (r_shortstr(args, i + 9))
end

function M:settimeouts(c, s, r) return self.sock:settimeouts(c, s, r) end
function M:close() return self.sock:close() end

return M
