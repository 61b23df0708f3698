-- The nginx ingress: each HTTP request becomes an envelope v1 on RabbitMQ's
-- request queue (AMQP 0-9-1 publish with a publisher confirm, on pooled
-- connections); each nginx worker consumes its own long-lived exclusive
-- reply queue in a background timer and wakes the waiting request through
-- an ngx.semaphore, matching replies by request id. Late, duplicate or
-- unknown replies are dropped.
--
-- Every request gets exactly one answer: the Func's, or a JSON error
-- (413 too large, 502 malformed reply, 503 broker unavailable or connection
-- lost, 504 no answer before the deadline).
local envelope = require "funcatron.envelope"
local amqp = require "funcatron.amqp"
local semaphore = require "ngx.semaphore"
local cjson = require "cjson.safe"

local M = {}

local conf = {
  host = "127.0.0.1", port = 5672, vhost = "/", login = "guest", passcode = "guest",
  request_queue = "funcatron.requests", timeout_ms = 30000, pool_size = 32, backlog = 10000,
}
local waiting = {}       -- request id -> { sema, result, lost }
local reply_queue        -- this worker's reply queue
local consumer_up = false

envelope.configure({
  json_decode = cjson.decode,
  b64encode = ngx.encode_base64,
  b64decode = ngx.decode_base64,
})

--- Called from init_by_lua with the generated settings.
function M.configure(c)
  for k, v in pairs(c) do conf[k] = v end
end

local function new_id()
  return string.format("%08x%08x%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff),
    math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
end

local function amqp_opts(pool, wait_ms)
  return {
    host = conf.host, port = conf.port, vhost = conf.vhost, login = conf.login,
    passcode = conf.passcode, timeout_ms = 5000,
    -- Waiting for a free pooled connection counts against the connect timeout.
    connect_timeout_ms = wait_ms or 1000,
    pool = pool and ("funcatron:" .. conf.host .. ":" .. conf.port .. ":" .. conf.vhost) or nil,
    pool_size = conf.pool_size, backlog = conf.backlog, confirm = pool,
  }
end

local function fail_all_waiting()
  for id, w in pairs(waiting) do
    w.lost = true
    waiting[id] = nil
    w.sema:post(1)
  end
end

-- Fast path for our own encoder, which writes version then id first; any
-- other layout falls back to a full decode.
local function reply_id(body)
  local id = body:match('^{"version":"[^"]*","id":"([%w%-_%.:]*)"')
  if id then return id end
  local t = cjson.decode(body)
  return type(t) == "table" and t.id or nil
end

local function consume(premature)
  if premature then return end
  local backoff = 0.1
  while not ngx.worker.exiting() do
    local conn, err = amqp.connect(amqp_opts(false))
    if conn then
      -- Declare the request queue as the embedded ingress does, so requests
      -- wait for a Tron instead of bouncing when none has started yet.
      local ok
      ok, err = conn:declare_durable(conf.request_queue)
      if ok then ok, err = conn:consume_exclusive(reply_queue) end
      if ok then
        consumer_up, backoff = true, 0.1
        ngx.shared.funcatron:set("up:" .. ngx.worker.id(), true)
        ngx.log(ngx.INFO, "funcatron: consuming replies on ", reply_queue)
        -- Wake every second to notice a worker shutdown.
        conn:settimeouts(1000, 5000, 1000)
        while not ngx.worker.exiting() do
          local body
          body, err = conn:next_message()
          if body then
            local id = reply_id(body)
            local w = id and waiting[id]
            if w then
              waiting[id] = nil
              w.result = body
              w.sema:post(1)
            else
              ngx.log(ngx.INFO, "funcatron: late or unknown reply dropped: ", tostring(id))
            end
          elseif err ~= "timeout" then
            break
          end
        end
      end
      conn:close()
    end
    if consumer_up then
      ngx.log(ngx.WARN, "funcatron: lost the reply consumer: ", tostring(err))
    else
      ngx.log(ngx.WARN, "funcatron: cannot consume replies: ", tostring(err))
    end
    consumer_up = false
    ngx.shared.funcatron:delete("up:" .. ngx.worker.id())
    fail_all_waiting()
    if ngx.worker.exiting() then return end
    ngx.sleep(backoff)
    backoff = math.min(backoff * 2, 2)
  end
end

--- init_worker_by_lua: name this worker's reply queue, start its consumer.
function M.init_worker()
  math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
  reply_queue = string.format("funcatron.reply.nginx-%d-%s", ngx.worker.pid(), new_id():sub(1, 12))
  local ok, err = ngx.timer.at(0, consume)
  if not ok then ngx.log(ngx.ERR, "funcatron: cannot start the reply consumer: ", err) end
end

local function request_id()
  local id = ngx.var.http_x_request_id
  if not envelope.sane_request_id(id) or waiting[id] then id = new_id() end
  ngx.var.funcatron_request_id = id
  return id
end

local function answer_error(status, id, code, message, started)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["X-Request-Id"] = id
  ngx.update_time()
  ngx.header["Server-Timing"] = string.format("total;dur=%.3f", (ngx.now() - started) * 1000)
  ngx.print(envelope.error_body(id, code, message))
  return ngx.exit(ngx.OK)
end

local function read_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local file = ngx.req.get_body_file()
  if not file then return "" end
  -- nginx spilled a large body to a temp file: read it, never drop it.
  local f, err = io.open(file, "rb")
  if not f then return nil, err end
  body = f:read("*a")
  f:close()
  return body
end

-- Headers in arrival order with repeats, from the raw header block.
local function headers_in_order()
  local out = {}
  for line in ngx.req.raw_header(true):gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k then out[#out + 1] = { k:lower(), v } end
  end
  return out
end

local HOP = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true,
  ["x-request-id"] = true, ["keep-alive"] = true }

--- content_by_lua: the request path.
function M.handle()
  ngx.update_time()
  local started = ngx.now()
  local id = request_id()
  if not consumer_up then
    return answer_error(503, id, "broker_unavailable", "the ingress is not connected to the broker", started)
  end
  local body, berr = read_body()
  if not body then
    return answer_error(400, id, "bad_request", "could not read the request body: " .. tostring(berr), started)
  end
  local timeout_ms = conf.timeout_ms
  local sent_ms = started * 1000
  local var = ngx.var
  local query = var.args or ""
  local path = var.request_uri:match("^[^?]*")
  local env = envelope.encode_request({
    id = id, deadline_ms = math.floor(sent_ms + timeout_ms), sent_ms = sent_ms,
    method = ngx.req.get_method(), scheme = var.http_x_forwarded_proto == "https" and "https" or var.scheme,
    host = var.http_host or var.host, path = path, query = query,
    headers = headers_in_order(), remote = var.remote_addr .. ":" .. var.remote_port,
    body = body, reply_to = reply_queue,
  })
  body = nil

  local w = { sema = semaphore.new() }
  waiting[id] = w
  local conn, err = amqp.connect(amqp_opts(true, math.max(1000, math.min(timeout_ms, 10000))))
  if conn then
    local ok
    ok, err = conn:publish(conf.request_queue, env, {
      content_type = "application/json", expiration = tostring(timeout_ms), persistent = false,
    })
    if ok then conn:setkeepalive(60000, conf.pool_size) else conn:close() end
    if not ok then conn = nil end
  end
  if not conn then
    waiting[id] = nil
    return answer_error(503, id, "broker_unavailable", "the request could not be queued: " .. tostring(err), started)
  end

  ngx.update_time()
  local remaining = timeout_ms / 1000 - (ngx.now() - started)
  local ok = remaining > 0 and w.sema:wait(remaining)
  if not ok then
    waiting[id] = nil
    return answer_error(504, id, "timeout", string.format("no answer within %d ms", timeout_ms), started)
  end
  if w.lost then
    return answer_error(503, id, "broker_connection_lost",
      "the broker connection was lost while the request was in flight; its outcome is unknown", started)
  end
  local resp, derr = envelope.decode_response(w.result)
  if not resp then
    return answer_error(502, id, "malformed_reply", "the reply could not be decoded: " .. tostring(derr), started)
  end
  ngx.status = resp.status
  local grouped = {}
  for _, h in ipairs(resp.headers) do
    local k = h[1]:lower()
    if not HOP[k] then
      local cur = grouped[k]
      if cur == nil then grouped[k] = h[2]
      elseif type(cur) == "table" then cur[#cur + 1] = h[2]
      else grouped[k] = { cur, h[2] } end
    end
  end
  for k, v in pairs(grouped) do ngx.header[k] = v end
  ngx.header["X-Request-Id"] = id
  ngx.update_time()
  ngx.header["Server-Timing"] = envelope.server_timing(resp.timings, (ngx.now() - started) * 1000)
  ngx.header["Content-Length"] = #resp.body
  ngx.print(resp.body)
  return ngx.exit(ngx.OK)
end

--- error_page 413 location: the JSON body for bodies over client_max_body_size.
function M.too_large()
  ngx.update_time()
  local id = request_id()
  return answer_error(413, id, "payload_too_large",
    "request body exceeds the limit of " .. tostring(conf.max_body) .. " bytes", ngx.now())
end

--- /_funcatron/health: 200 when this worker consumes its reply queue;
--- `workers_ready` counts the workers that do, out of `workers`.
function M.health()
  local ready = 0
  for i = 0, ngx.worker.count() - 1 do
    if ngx.shared.funcatron:get("up:" .. i) then ready = ready + 1 end
  end
  ngx.header["Content-Type"] = "application/json"
  if not consumer_up then ngx.status = 503 end
  ngx.print(string.format('{"status":"%s","broker":"amqp","connected":%s,"workers_ready":%d,"workers":%d}',
    consumer_up and "ok" or "broker_unavailable", tostring(consumer_up), ready, ngx.worker.count()))
end

return M
