-- Funcatron envelope v1 (docs/wire.md) in pure Lua: runs in nginx's LuaJIT
-- and in plain Lua 5.4 (the test harness checks it against
-- envelope/vectors/). Requests are encoded by hand in the canonical field
-- order (no JSON library quirks with empty arrays or number precision);
-- responses are decoded with the JSON decoder the caller supplies.
-- VERSION is what ordinary requests carry; a request in direct mode (a 1.2
-- field) says 1.2.
local M = { VERSION = "1.1", VERSION_DIRECT = "1.2", MAJOR = 1 }

local byte, char, concat, format = string.byte, string.char, table.concat, string.format

-- Base64 (standard alphabet, padded). nginx passes ngx.encode_base64 /
-- ngx.decode_base64 through M.configure; these are the portable fallbacks.
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64encode(s)
  local out, n = {}, #s
  for i = 1, n, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(v / 262144) % 64
    local c2 = math.floor(v / 4096) % 64
    local c3 = math.floor(v / 64) % 64
    local c4 = v % 64
    out[#out + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
      .. (b and B64:sub(c3 + 1, c3 + 1) or "=") .. (c and B64:sub(c4 + 1, c4 + 1) or "=")
  end
  return concat(out)
end

local B64INV = {}
for i = 1, 64 do B64INV[byte(B64, i)] = i - 1 end
local function b64decode(s)
  if #s % 4 ~= 0 or s:find("[^%w%+/=]") or s:find("=[^=]") then return nil end
  local out = {}
  for i = 1, #s, 4 do
    local a, b, c, d = byte(s, i, i + 3)
    local va, vb = B64INV[a], B64INV[b]
    if va == nil or vb == nil then return nil end
    local vc, vd = B64INV[c] or 0, B64INV[d] or 0
    local v = va * 262144 + vb * 4096 + vc * 64 + vd
    local b1, b2, b3 = math.floor(v / 65536) % 256, math.floor(v / 256) % 256, v % 256
    if c == 61 then out[#out + 1] = char(b1)
    elseif d == 61 then out[#out + 1] = char(b1, b2)
    else out[#out + 1] = char(b1, b2, b3) end
  end
  return concat(out)
end

M.b64encode, M.b64decode = b64encode, b64decode
M.json_decode = nil -- set by configure

--- Inject faster or environment-specific primitives:
--- { json_decode = f, b64encode = f, b64decode = f }.
function M.configure(deps)
  for k, v in pairs(deps) do M[k] = v end
  return M
end

--- Is s valid UTF-8 (no overlongs, no surrogates, at most U+10FFFF)?
function M.valid_utf8(s)
  if not s:find("[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local len, min
      if c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
      elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
      elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
      else return false end
      if i + len - 1 > n then return false end
      local cp = c % (2 ^ (7 - len))
      for j = 1, len - 1 do
        local cc = byte(s, i + j)
        if cc < 0x80 or cc > 0xBF then return false end
        cp = cp * 64 + (cc - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
      i = i + len
    end
  end
  return true
end

--- Replace every invalid byte with U+FFFD (header values may be Latin-1).
function M.lossy_utf8(s)
  if M.valid_utf8(s) then return s end
  local out = {}
  for i = 1, #s do
    local c = s:sub(i, i)
    out[#out + 1] = byte(c) < 0x80 and c or "\239\191\189"
  end
  return concat(out)
end

local ESC = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
local function str(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESC[c] or format("\\u%04x", byte(c))
  end) .. '"'
end
M.json_string = str

--- Encode a request envelope. r = { id, deadline_ms, sent_ms, method, scheme,
--- host, path, query, headers = {{name, value}, ...}, remote, body (bytes),
--- reply_to, direct }. Returns the JSON text.
function M.encode_request(r)
  local hs = {}
  for i, h in ipairs(r.headers or {}) do
    hs[i] = "[" .. str(h[1]:lower()) .. "," .. str(M.lossy_utf8(h[2])) .. "]"
  end
  local body, b64 = r.body or "", false
  if not M.valid_utf8(body) then body, b64 = M.b64encode(body), true end
  local parts = {
    '{"version":"', r.direct and M.VERSION_DIRECT or M.VERSION, '","id":', str(r.id),
    ',"deadline_ms":', format("%.0f", r.deadline_ms),
    ',"sent_ms":', format("%.3f", r.sent_ms or 0),
    ',"method":', str(r.method), ',"scheme":', str(r.scheme or "http"),
    ',"host":', str(M.lossy_utf8(r.host or "")), ',"path":', str(M.lossy_utf8(r.path)),
    ',"query":', str(M.lossy_utf8(r.query or "")),
    ',"headers":[', concat(hs, ","), "]",
  }
  if r.remote then parts[#parts + 1] = ',"remote":' .. str(r.remote) end
  parts[#parts + 1] = ',"body":' .. str(body)
  if b64 then parts[#parts + 1] = ',"body_base64":true' end
  if r.reply_to then parts[#parts + 1] = ',"reply_to":' .. str(r.reply_to) end
  if r.reply_key then parts[#parts + 1] = ',"reply_key":' .. str(r.reply_key) end
  -- 1.1: asynchronous calls.
  if r.async then parts[#parts + 1] = ',"async":true' end
  if r.call_id then parts[#parts + 1] = ',"call_id":' .. str(r.call_id) end
  if r.callback_url then parts[#parts + 1] = ',"callback_url":' .. str(r.callback_url) end
  if r.attempt then parts[#parts + 1] = ',"attempt":' .. format("%d", r.attempt) end
  if r.max_attempts then parts[#parts + 1] = ',"max_attempts":' .. format("%d", r.max_attempts) end
  if r.delay_ms and r.delay_ms > 0 then parts[#parts + 1] = ',"delay_ms":' .. format("%.0f", r.delay_ms) end
  if r.submitted_ms then parts[#parts + 1] = ',"submitted_ms":' .. format("%.0f", r.submitted_ms) end
  -- 1.2: direct mode (only the head; the body goes to the Runner over HTTP).
  if r.direct then parts[#parts + 1] = ',"direct":true' end
  parts[#parts + 1] = "}"
  return concat(parts)
end

local function major(v)
  return tonumber((tostring(v or "")):match("^(%d+)"))
end

--- Decode a response envelope (JSON text, or a table already decoded from
--- it). Returns { id, status, headers = {{n, v}...}, body (bytes),
--- timings = { dispatch_ms, queue_ms, exec_ms }, reply_key, direct_url } or
--- nil, reason. `direct_url` (1.2) answers a request in direct mode: the
--- Runner's one-time URL where the ingress sends the body.
function M.decode_response(text)
  local ok, t = true, text
  if type(text) ~= "table" then ok, t = pcall(M.json_decode, text) end
  if not ok or type(t) ~= "table" then return nil, "malformed envelope: not JSON" end
  if major(t.version) ~= M.MAJOR then
    if t.version ~= nil then
      return nil, format("unsupported envelope version %q (this build reads major version 1)", tostring(t.version))
    end
    return nil, "malformed envelope: missing version"
  end
  if type(t.id) ~= "string" or type(t.status) ~= "number" then
    return nil, "malformed envelope: missing id or status"
  end
  local body = t.body or ""
  if type(body) ~= "string" then return nil, "malformed envelope: body is not a string" end
  if t.body_base64 == true then
    body = M.b64decode(body)
    if body == nil then return nil, "malformed envelope: body is not valid base64" end
  end
  local headers = {}
  if type(t.headers) == "table" then
    for _, h in ipairs(t.headers) do
      if type(h) == "table" and type(h[1]) == "string" and type(h[2]) == "string" then
        headers[#headers + 1] = { h[1], h[2] }
      end
    end
  end
  local tm = type(t.timings) == "table" and t.timings or {}
  return {
    id = t.id, status = t.status, headers = headers, body = body,
    timings = { dispatch_ms = tonumber(tm.dispatch_ms) or 0, queue_ms = tonumber(tm.queue_ms) or 0, exec_ms = tonumber(tm.exec_ms) or 0 },
    reply_key = type(t.reply_key) == "string" and t.reply_key or nil,
    call_id = type(t.call_id) == "string" and t.call_id or nil,
    attempt = type(t.attempt) == "number" and t.attempt or nil,
    direct_url = type(t.direct_url) == "string" and t.direct_url or nil,
  }
end

--- The Server-Timing header value for a decoded response's timings.
function M.server_timing(timings, total_ms)
  return format("dispatch;dur=%.3f, queue;dur=%.3f, exec;dur=%.3f, total;dur=%.3f",
    timings.dispatch_ms or 0, timings.queue_ms or 0, timings.exec_ms or 0, total_ms)
end

--- Is a client-supplied X-Request-Id safe to adopt?
function M.sane_request_id(id)
  return type(id) == "string" and #id >= 1 and #id <= 128 and id:find("^[%w%-_%.:]+$") ~= nil
end

--- The JSON body of every platform error.
function M.error_body(id, code, message)
  return '{"error":' .. str(code) .. ',"message":' .. str(message) .. ',"request_id":' .. str(id) .. "}"
end

return M
