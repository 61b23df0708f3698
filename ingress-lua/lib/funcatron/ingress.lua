-- The nginx ingress: each HTTP request becomes an envelope v1 on its Func
-- version's queue (routed here, at the edge, by the route table the Trons
-- broadcast: see routes.lua) or on RabbitMQ's request queue for a Tron to
-- route, and the answer comes back on this nginx worker's own long-lived
-- exclusive reply queue.
--
-- Each worker holds one AMQP 0-9-1 connection, owned by a background timer:
-- channel 1 consumes the reply queue and (with edge routing) a queue bound
-- to the Trons' table topic and the control topic, channel 2 publishes in
-- confirm mode.
-- Request handlers put their envelope in the worker's outbox and wait on an
-- ngx.semaphore; a writer light thread sends everything queued in one write
-- (publishes pipeline, as in the embedded ingress), and the reader matches
-- replies to requests by request id and publisher nacks/returns to requests
-- by delivery tag. Late, duplicate or unknown replies are dropped.
--
-- Asynchronous calls (Prefer: respond-async, X-Funcatron-Async,
-- X-tinyFaaS-Async, /async-function/) are not published here: each goes
-- by subrequest to a Tron (`funcatron nginx-config --tron-url`), which
-- records and queues it and answers the 202; without one they get 501.
--
-- Direct mode (as the embedded ingress, ingress/src/direct.rs): a
-- synchronous request on a direct route (x-funcatron-direct), asking for
-- text/event-stream, or with a body past the direct threshold queues only
-- its head, before its body is read; the Runner that takes it answers with
-- a one-time URL on its own HTTP listener, and the handler hands the
-- request to the named location @funcatron_direct (ngx.exec), where
-- nginx's HTTP/2 proxy streams the body there and the answer back,
-- unbuffered and both at once (see nginx.conf.template).
--
-- Every request gets exactly one answer: the Func's, or a JSON error
-- (413 too large, 502 malformed reply or Runner unreachable, 503 broker
-- unavailable or connection lost, 504 no answer before the deadline).
local envelope = require "funcatron.envelope"
local amqp = require "funcatron.amqp"
local routes = require "funcatron.routes"
local semaphore = require "ngx.semaphore"
local cjson = require "cjson.safe"

local M = {}

local conf = {
  host = "127.0.0.1", port = 5672, vhost = "/", login = "guest", passcode = "guest",
  request_queue = "funcatron.requests", timeout_ms = 30000, routing = "edge",
  max_body = 10485760, direct_threshold = 1048576, max_direct_body = 4294967296,
}
-- The topics (fanout exchanges) edge routing hears and reports on.
local TABLE_TOPIC, CONTROL_TOPIC, DEMAND_TOPIC = "funcatron.admission", "funcatron.control", "funcatron.demand"
local DEMAND_EVERY = 0.2 -- s, funcatron_control::admission::DEMAND_EVERY_MS
local route_table        -- the newest table heard (routes.prepare), or nil
local newest_state = 0   -- the newest registry revision heard on the control topic
local demand, demand_urgent, demand_sent = {}, false, 0 -- Func -> requests routed here since the last report
local waiting = {}       -- request id -> { sema, result, failed = {code, message} }
local reply_queue        -- this worker's reply queue
local table_queue        -- this worker's queue of tables and control messages
local consumer_up = false
local outbox, outbox_sema = {}, nil -- envelopes waiting for the writer
local unconfirmed = {}   -- delivery tag -> request id, until the broker confirms
local next_tag, confirmed_upto = 0, 0

envelope.configure({
  json_decode = cjson.decode,
  b64encode = ngx.encode_base64,
  b64decode = ngx.decode_base64,
})

--- Called from init_by_lua with the generated settings. With a Tron
--- (`funcatron nginx-config --tron-url`), its token is read here, once.
function M.configure(c)
  for k, v in pairs(c) do conf[k] = v end
  if conf.tron then
    local f, err = io.open(conf.tron_token_file, "rb")
    if not f then error("funcatron: cannot read the Tron token file: " .. tostring(err)) end
    conf.tron_token = f:read("*a"):match("^%s*(.-)%s*$")
    f:close()
  end
end

--- set_by_lua in the internal submission location: the Tron's token.
function M.tron_auth()
  return "Bearer " .. (conf.tron_token or "")
end

local function new_id()
  return string.format("%08x%08x%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff),
    math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
end

local function amqp_opts()
  return {
    host = conf.host, port = conf.port, vhost = conf.vhost, login = conf.login,
    passcode = conf.passcode, timeout_ms = 5000, connect_timeout_ms = 1000,
  }
end

local function fail(id, code, message)
  local w = id and waiting[id]
  if w then
    waiting[id] = nil
    w.failed = { code, message }
    w.sema:post(1)
  end
end

local LOST = "the broker connection was lost while the request was in flight; its outcome is unknown"

local function fail_all_waiting()
  for id in pairs(waiting) do fail(id, "broker_connection_lost", LOST) end
  outbox, unconfirmed, next_tag, confirmed_upto = {}, {}, 0, 0
end

local PUBLISH_PROPS

-- The demand report (funcatron_control::admission::EdgeDemand) of what
-- was routed here since the last one, or nil when nothing was.
local function demand_report()
  local counts = {}
  for func, n in pairs(demand) do counts[#counts + 1] = { func, n } end
  if #counts == 0 then return nil end
  demand, demand_urgent = {}, false
  return cjson.encode({ ingress = reply_queue, counts = counts })
end

-- The writer light thread: send everything in the outbox in one write,
-- and the demand report every DEMAND_EVERY (at once for a cold Func).
local function write_loop(conn)
  while true do
    local ok, err = outbox_sema:wait(DEMAND_EVERY)
    if ngx.worker.exiting() then return end
    local frames = {}
    if #outbox > 0 then
      local batch = outbox
      outbox = {}
      for i, item in ipairs(batch) do
        next_tag = next_tag + 1
        unconfirmed[next_tag] = item.id
        local w = waiting[item.id]
        if w then w.tag = next_tag end
        frames[i] = conn:publish_frames(2, item.queue or conf.request_queue, item.env, item.props or PUBLISH_PROPS)
      end
    elseif not ok and err ~= "timeout" then
      return err
    end
    ngx.update_time()
    local now = ngx.now()
    if demand_urgent or now - demand_sent >= DEMAND_EVERY then
      demand_sent = now
      local report = demand_report()
      if report then
        next_tag = next_tag + 1
        frames[#frames + 1] = conn:publish_frames(2, "", report,
          { exchange = DEMAND_TOPIC, content_type = "application/json" })
      end
    end
    if #frames > 0 then
      local _, serr = conn.sock:send(frames)
      if serr then return "send: " .. serr end
    end
  end
end

-- Settle publisher confirms up to `tag` (or just `tag`): acked ones need
-- nothing more (the reply will come); nacked ones fail their request.
local function settle(tag, multiple, nacked)
  local from = multiple and confirmed_upto + 1 or tag
  for t = from, tag do
    local id = unconfirmed[t]
    unconfirmed[t] = nil
    -- Only the request's current publish counts (not one returned and
    -- sent again to the request queue).
    local w = id and waiting[id]
    if w and w.tag ~= t then w = nil end
    -- Acknowledged: no return can follow, the fallback copy can go.
    if w and not nacked then w.edge, w.env = nil, nil end
    if nacked then
      if w then fail(id, "broker_unavailable", "the broker refused the request") end
    else
      -- A fire-and-forget call waits for this confirm, not for a reply.
      if w and w.confirm then
        waiting[id] = nil
        w.sema:post(1)
      end
    end
  end
  if multiple or tag == confirmed_upto + 1 then confirmed_upto = math.max(confirmed_upto, tag) end
end

-- The reader: deliveries on channel 1 are replies; on channel 2 come
-- confirms and returns (a missing request queue).
local function read_loop(conn)
  local content = {} -- channel -> { kind, size, parts, got }
  while not ngx.worker.exiting() do
    local f, err = conn:read_frame()
    if not f then
      if err ~= "timeout" then return err end
    elseif f.type == 1 then
      local c, m = amqp.r_u16(f.payload, 1), amqp.r_u16(f.payload, 3)
      if c == 60 and m == 60 then -- deliver: a reply, or a table or control message
        local x = amqp.deliver_exchange(f.payload:sub(5))
        local kind = (x == "" and "reply") or (x == TABLE_TOPIC and "table") or "control"
        content[f.channel] = { kind = kind, parts = {}, got = 0 }
      elseif c == 60 and m == 50 then -- return: content follows
        content[f.channel] = { kind = "returned", parts = {}, got = 0 }
      elseif c == 60 and m == 80 then -- basic.ack
        settle(amqp.r_u64(f.payload, 5), f.payload:byte(13) % 2 == 1, false)
      elseif c == 60 and m == 120 then -- basic.nack
        settle(amqp.r_u64(f.payload, 5), f.payload:byte(13) % 2 == 1, true)
      elseif (c == 10 and m == 50) or (c == 20 and m == 40) then
        return "broker closed: " .. amqp.close_reason(f.payload)
      end
    elseif f.type == 2 then
      local st = content[f.channel]
      if st then st.size = amqp.r_u64(f.payload, 5) end
    elseif f.type == 3 then
      local st = content[f.channel]
      if st then
        st.parts[#st.parts + 1] = f.payload
        st.got = st.got + #f.payload
      end
    end
    -- A complete message (an empty body completes with its header).
    local st = f and content[f.channel]
    if st and st.size and st.got >= st.size then
      content[f.channel] = nil
      local t = cjson.decode(table.concat(st.parts))
      local id = type(t) == "table" and type(t.id) == "string" and t.id or nil
      if st.kind == "table" then
        ngx.update_time()
        local now = ngx.now()
        local prepared, perr = routes.prepare(t, now)
        if not prepared then
          ngx.log(ngx.WARN, "funcatron: route table ignored: ", perr)
        elseif route_table and now < route_table.expires and prepared.revision < route_table.revision then
          ngx.log(ngx.DEBUG, "funcatron: a table older than the one held ignored")
        else
          route_table = prepared
          -- For the health answer: until when this worker has a table.
          ngx.shared.funcatron:set("edge:" .. ngx.worker.id(), prepared.expires)
        end
      elseif st.kind == "control" then
        local rev = type(t) == "table" and t.kind == "state" and type(t.state) == "table"
          and tonumber(t.state.revision)
        if rev and rev > newest_state then newest_state = rev end
      elseif st.kind == "reply" then
        -- Only this attempt's answer: a late reply to an earlier request
        -- with the same id carries another key (none: matched by id).
        local w = id and waiting[id]
        if w and (t.reply_key == nil or t.reply_key == w.key) then
          waiting[id] = nil
          w.result = t
          w.sema:post(1)
        else
          ngx.log(ngx.INFO, "funcatron: late, unknown or undecodable reply dropped: ", tostring(id))
        end
      else
        local w = id and waiting[id]
        -- Only this attempt's publish (a reused request id has its own key).
        if w and w.edge and t.reply_key == w.key then
          -- The Func queue is gone (a version retired since the table was
          -- sent): a Tron routes it by its newer table. The ack that
          -- follows this return is the old publish's: not this request's.
          w.edge, w.tag = nil, nil
          outbox[#outbox + 1] = { id = id, env = w.env, props = w.fallback_props }
          w.env = nil
          outbox_sema:post(1)
        else
          fail(id, "broker_unavailable", "the request queue " .. conf.request_queue .. " does not exist")
        end
      end
    end
  end
end

local function serve(premature)
  if premature then return end
  PUBLISH_PROPS = { content_type = "application/json", expiration = tostring(conf.timeout_ms), persistent = false }
  local backoff = 0.1
  while not ngx.worker.exiting() do
    local conn, err = amqp.connect(amqp_opts())
    if conn then
      -- Declare the request queue as the embedded ingress does, so requests
      -- wait for a Tron instead of bouncing when none has started yet.
      local ok
      ok, err = conn:declare_durable(conf.request_queue)
      if ok then ok, err = conn:consume_exclusive(reply_queue) end
      if ok and conf.routing == "edge" then
        ok, err = conn:subscribe(table_queue, { TABLE_TOPIC, CONTROL_TOPIC }, "tables")
        if ok then ok, err = conn:declare_fanout(DEMAND_TOPIC) end
      end
      if ok then ok, err = conn:open_channel(2, true) end
      if ok then
        consumer_up, backoff = true, 0.1
        ngx.shared.funcatron:set("up:" .. ngx.worker.id(), true)
        ngx.log(ngx.INFO, "funcatron: consuming replies on ", reply_queue)
        -- Wake every second to notice a worker shutdown.
        conn:settimeouts(1000, 10000, 1000)
        if conf.routing == "edge" then
          -- Ask the Trons for their table now (an empty demand report).
          next_tag = next_tag + 1
          conn.sock:send(conn:publish_frames(2, "", '{"ingress":"' .. reply_queue .. '","counts":[]}',
            { exchange = DEMAND_TOPIC, content_type = "application/json" }))
        end
        local writer = ngx.thread.spawn(write_loop, conn)
        err = read_loop(conn)
        ngx.thread.kill(writer)
      end
      conn:close()
    end
    if consumer_up then
      ngx.log(ngx.WARN, "funcatron: lost the broker connection: ", tostring(err))
    else
      ngx.log(ngx.WARN, "funcatron: cannot reach the broker: ", tostring(err))
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
  table_queue = reply_queue:gsub("^funcatron%.reply%.", "funcatron.tables.")
  outbox_sema = semaphore.new()
  local ok, err = ngx.timer.at(0, serve)
  if not ok then ngx.log(ngx.ERR, "funcatron: cannot start the reply consumer: ", err) end
end

local function request_id()
  local id = ngx.var.http_x_request_id
  if not envelope.sane_request_id(id) or waiting[id] then id = new_id() end
  ngx.var.funcatron_request_id = id
  return id
end

local function answer_error(status, id, code, message, started)
  -- A body not read (refused before reading, or a direct request answered
  -- without its Runner) is read and dropped, so the connection stays usable.
  ngx.req.discard_body()
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

-- Headers in arrival order with repeats, from the raw header block; a
-- client's x-funcatron-func is removed (only the ingress names a Func).
local function headers_in_order()
  local out = {}
  for line in ngx.req.raw_header(true):gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k and k:lower() ~= "x-funcatron-func" then out[#out + 1] = { k:lower(), v } end
  end
  return out
end

-- OpenFaaS's /function/<func>/<rest> and /async-function/<func>/<rest>
-- (as the embedded ingress): the Func, the rest of the path ("/" at
-- least) and whether it is the async form; nil for any other path.
local function named_func(path)
  local is_async = false
  local func, rest = path:match("^/function/([^/]+)(.*)$")
  if not func then
    func, rest = path:match("^/async%-function/([^/]+)(.*)$")
    is_async = true
  end
  if not func then return nil end
  if rest == "" then rest = "/" end
  return func, rest, is_async
end

local function trim(v) return v:match("^%s*(.-)%s*$") end

-- Is this request asynchronous, and how (as the embedded ingress, see
-- calls/src/submit.rs): "no-result", "recorded" or nil. `h`: the request
-- headers (ngx.req.get_headers).
local function async_mode(h)
  local function first(v) if type(v) == "table" then return v[1] end return v end
  local fa = first(h["x-funcatron-async"])
  if fa then
    fa = trim(fa):lower()
    if fa == "no-result" then return "no-result" end
    if fa == "true" or fa == "1" then return "recorded" end
  end
  local tf = first(h["x-tinyfaas-async"])
  if tf and trim(tf):lower() ~= "false" then return "recorded" end
  local prefer = h["prefer"]
  if type(prefer) ~= "table" then prefer = { prefer } end
  for _, v in ipairs(prefer) do
    for part in v:gmatch("[^,]+") do
      if trim(part):lower() == "respond-async" then return "recorded" end
    end
  end
  return nil
end

-- Hand an async call's envelope to the Tron (the internal location
-- /_funcatron/tron/submit) and answer as it does: 202 with X-Call-Id,
-- Location and X-Call-Secret, or its error as this ingress's JSON error.
local function submit_to_tron(id, env, started)
  local res = ngx.location.capture("/_funcatron/tron/submit", { method = ngx.HTTP_POST, body = env })
  if res.status == 202 then
    ngx.status = 202
    ngx.header["Content-Type"] = "application/json"
    ngx.header["X-Request-Id"] = id
    -- The subrequest's header names are as the Tron sent them.
    local keep = { ["x-call-id"] = true, location = true, ["x-call-secret"] = true }
    for k, v in pairs(res.header) do
      if keep[k:lower()] then ngx.header[k] = v end
    end
    ngx.print(res.body)
    return ngx.exit(ngx.OK)
  end
  local t = cjson.decode(res.body or "")
  if res.status == 401 or res.status == 403 then
    ngx.log(ngx.ERR, "funcatron: the Tron refused this ingress's token: ", res.body)
  elseif type(t) == "table" and type(t.error) == "string" then
    -- A 429 queue_full says when to come back.
    local ra = res.header["Retry-After"] or res.header["retry-after"]
    if ra then ngx.header["Retry-After"] = ra end
    return answer_error(res.status, id, t.error, tostring(t.message), started)
  end
  return answer_error(503, id, "tron_unavailable",
    "the Tron that queues asynchronous calls did not take this one (" .. tostring(res.status) .. ")", started)
end

-- Response headers a Func's answer cannot set: hop-by-hop headers and the
-- framing and id the ingress sets itself (as the embedded ingress).
local HOP = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true,
  ["x-request-id"] = true, ["keep-alive"] = true, ["proxy-connection"] = true,
  te = true, trailer = true, upgrade = true }

-- The embedded ingress's limits (calls/src/submit.rs): an async call may
-- wait six hours for its first attempt; a callback URL is http(s), at
-- most 2048 characters, without white space.
local MAX_AGE_MS = 6 * 3600000

local function bad_callback_url(url)
  return not (#url <= 2048 and (url:find("^http://") or url:find("^https://")) and not url:find("%s"))
end

-- Fire-and-forget (X-Funcatron-Async: no-result): no record, so no Tron;
-- published persistent, answered 202 once the broker confirms it.
local function fire_and_forget(id, req, started, routed)
  local cb = ngx.req.get_headers()["x-callback-url"]
  if type(cb) == "table" then cb = cb[1] end
  if cb then
    cb = trim(cb)
    if bad_callback_url(cb) then
      return answer_error(400, id, "bad_callback_url", string.format(
        "X-Callback-Url %q is not an http(s) URL of at most 2048 characters", cb), started)
    end
  end
  local call_id = "c" .. new_id()
  req.deadline_ms = math.floor(req.sent_ms + MAX_AGE_MS)
  req.async, req.call_id, req.callback_url = true, call_id, cb
  req.attempt, req.submitted_ms = 1, math.floor(req.sent_ms)
  local w = { sema = semaphore.new(), confirm = true }
  waiting[id] = w
  local env = envelope.encode_request(req)
  local props = { content_type = "application/json", persistent = true }
  if routed then
    w.edge, w.env, w.fallback_props = true, env, props
    outbox[#outbox + 1] = { id = id, env = env, queue = routed.queue,
      props = { content_type = "application/json", persistent = true, headers = routed.headers } }
  else
    outbox[#outbox + 1] = { id = id, env = env, props = props }
  end
  outbox_sema:post(1)
  ngx.update_time()
  local remaining = conf.timeout_ms / 1000 - (ngx.now() - started)
  if not (remaining > 0 and w.sema:wait(remaining)) then
    waiting[id] = nil
    return answer_error(503, id, "broker_unavailable", "the broker did not confirm the call in time; it may run", started)
  end
  if w.failed then return answer_error(503, id, w.failed[1], w.failed[2], started) end
  local location = "/_funcatron/calls/" .. call_id
  ngx.status = 202
  ngx.header["Content-Type"] = "application/json"
  ngx.header["X-Request-Id"] = id
  ngx.header["X-Call-Id"] = call_id
  ngx.header["Location"] = location
  ngx.print(cjson.encode({ call_id = call_id, status_url = location, request_id = id }))
  return ngx.exit(ngx.OK)
end

-- The table to route by now: nil when a Tron routes (`--routing tron`,
-- no table heard, the table stale, or behind the registry).
local function edge_table()
  local t = route_table
  if conf.routing ~= "edge" or not t or t.revision < newest_state then return nil end
  ngx.update_time()
  if ngx.now() >= t.expires then return nil end
  return t
end

-- Route at the edge: the route (its Func queue and headers), or an
-- answer given here (404, 405, 400 for a sync call an async-only Func
-- refuses) as `status, code, message, allow`; nil for a Tron to route.
local function edge_route(t, func, host, method, path, mode)
  local r
  if func then
    r = routes.route_func(t, func, method, path)
  else
    r = routes.route(t, host, method, path)
  end
  -- An async call is accepted whatever its route: a Tron records its 404
  -- or 405 as the call's outcome (the embedded ingress does the same).
  if mode and (not r or r.kind == "not_found" or r.kind == "not_allowed") then return nil end
  if not r then
    return nil, 404, "unknown_func", string.format("no enabled Func is named %q", func)
  elseif r.kind == "not_found" then
    return nil, 404, "no_route", "no Func serves " .. method .. " " .. host .. path
  elseif r.kind == "not_allowed" then
    return nil, 405, "method_not_allowed", method .. " is not allowed on " .. path .. "; allowed: " .. r.allow, r.allow
  end
  local f = t.funcs[r.func]
  if r.kind == "found" then
    local status, code, message = routes.refusal(f, mode ~= nil, ngx.var.http_x_callback_url ~= nil)
    if status then
      if status == 429 then ngx.header["Retry-After"] = "1" end
      return nil, status, code, message
    end
  end
  demand[f.func] = (demand[f.func] or 0) + 1
  if f.cold then
    demand_urgent = true
    outbox_sema:post(1)
  end
  ngx.update_time()
  return { queue = mode and f.async_queue or f.queue,
    headers = routes.headers(t, r, ngx.now() * 1000, cjson.encode), func = f.func,
    direct = r.direct }
end

-- Does the client ask for a stream of events (Accept: text/event-stream)?
local function wants_stream(h)
  local accept = h["accept"]
  if type(accept) ~= "table" then accept = { accept } end
  for _, v in ipairs(accept) do
    if v:find("text/event-stream", 1, true) then return true end
  end
  return false
end

-- The body's declared length (nil: none), and whether a body comes
-- without one (chunked: its size is known only once read).
local function body_length()
  local n = tonumber(ngx.var.http_content_length)
  if n then return n, false end
  return nil, ngx.var.http_transfer_encoding ~= nil
end

-- Does a synchronous request go in direct mode? On a direct route, when
-- it asks for a stream, or when its body is past the threshold (declared,
-- or sent without a length: nginx could only learn its size by reading it
-- whole). A threshold of 0 sends nothing direct by size.
local function goes_direct(h, routed, length, unsized)
  if (routed and routed.direct) or wants_stream(h) then return true end
  local threshold = conf.direct_threshold
  if threshold <= 0 then return false end
  if length then return length > threshold end
  return unsized
end

-- A Runner's one-time URL: its direct listener's address and the
-- ticket's path (anything else in a reply is not a ticket).
local TICKET_URL = "^http://([%w%.%-:%[%]]+)(/_funcatron/direct/%x+)$"

local function too_large(id, limit, started)
  return answer_error(413, id, "payload_too_large",
    "request body exceeds the limit of " .. string.format("%.0f", limit) .. " bytes", started)
end

-- Publish a synchronous request's envelope (onto its Func's queue when
-- routed here) and wait for its reply: the decoded reply, or (never
-- returning) the request answered with why there is none.
local function publish_and_wait(id, env, key, routed, started)
  local timeout_ms = conf.timeout_ms
  local w = { sema = semaphore.new(), key = key }
  waiting[id] = w
  if routed then
    w.edge, w.env = true, env
    outbox[#outbox + 1] = { id = id, env = env, queue = routed.queue, props = {
      content_type = "application/json", expiration = PUBLISH_PROPS.expiration,
      persistent = false, headers = routed.headers } }
  else
    outbox[#outbox + 1] = { id = id, env = env }
  end
  env = nil
  outbox_sema:post(1)

  ngx.update_time()
  local remaining = timeout_ms / 1000 - (ngx.now() - started)
  local ok = remaining > 0 and w.sema:wait(remaining)
  if not ok then
    waiting[id] = nil
    return answer_error(504, id, "timeout", string.format("no answer within %d ms", timeout_ms), started)
  end
  if w.failed then
    return answer_error(503, id, w.failed[1], w.failed[2], started)
  end
  local resp, derr = envelope.decode_response(w.result)
  if not resp then
    return answer_error(502, id, "malformed_reply", "the reply could not be decoded: " .. tostring(derr), started)
  end
  return resp
end

-- Answer with a decoded reply: the Func's status, headers and body.
local function answer_reply(id, resp, started)
  if resp.status < 200 then
    -- 1xx (101 included) would desynchronise the client's connection.
    return answer_error(502, id, "malformed_reply",
      "a Func may not answer with status " .. tostring(resp.status), started)
  end
  ngx.req.discard_body()
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
  -- Added to a Func's own (a chain's per-stage entries stay).
  local timing = envelope.server_timing(resp.timings, (ngx.now() - started) * 1000)
  local own = grouped["server-timing"]
  if own == nil then ngx.header["Server-Timing"] = timing
  elseif type(own) == "table" then own[#own + 1] = timing; ngx.header["Server-Timing"] = own
  else ngx.header["Server-Timing"] = { own, timing } end
  ngx.header["Content-Length"] = #resp.body
  ngx.print(resp.body)
  return ngx.exit(ngx.OK)
end

-- A request in direct mode: queue its head (no body; edge-routed with
-- x-funcatron-direct, a Tron marks what it routes itself), wait for the
-- Runner's ticket, then let nginx's proxy (@funcatron_direct) send the
-- body there and stream the answer back. The body is never read here:
-- ngx.exec works only on a request whose body is unread. A refusal (no
-- ticket: direct_busy, an error) is answered as any reply.
local function direct_call(id, req, routed, started)
  if not consumer_up then
    return answer_error(503, id, "broker_unavailable", "the ingress is not connected to the broker", started)
  end
  local key = new_id()
  req.body, req.direct = "", true
  req.reply_to, req.reply_key = reply_queue, key
  if routed then
    routed.headers[#routed.headers + 1] = { "x-funcatron-direct", "1" }
  end
  local resp = publish_and_wait(id, envelope.encode_request(req), key, routed, started)
  local url = resp.direct_url
  if not url then return answer_reply(id, resp, started) end
  local addr, ticket = url:match(TICKET_URL)
  if not addr then
    return answer_error(502, id, "malformed_reply", "the reply's direct_url is not a Runner's ticket URL", started)
  end
  -- The proxied request: POST (HEAD stays HEAD, so nginx sends no body
  -- back) to the ticket's path, without the query.
  ngx.var.funcatron_direct_addr = addr
  if req.method ~= "HEAD" then ngx.req.set_method(ngx.HTTP_POST) end
  ngx.req.set_uri(ticket)
  ngx.req.set_uri_args("")
  return ngx.exec("@funcatron_direct")
end

--- content_by_lua: the request path. `bounded`: called again in the
--- location @funcatron_queued, whose client_max_body_size is the queued
--- limit, for a body without a declared length that is queued (it must
--- be read whole, and nginx then stops reading at the limit).
function M.handle(bounded)
  ngx.update_time()
  local started = bounded and ngx.req.start_time() or ngx.now()
  local id = bounded and ngx.var.funcatron_request_id or request_id()
  local timeout_ms = conf.timeout_ms
  local sent_ms = started * 1000
  local var = ngx.var
  local h = ngx.req.get_headers()
  local query = var.args or ""
  local path = var.request_uri:match("^[^?]*")
  local func, rest, is_async = named_func(path)
  local mode = async_mode(h) or (is_async and "recorded") or nil
  -- A chain (POST /_funcatron/chain) goes to a Tron, which parses and
  -- resolves it (funcatron_routes::chain): Lua never parses expressions.
  local is_chain = not func and path == "/_funcatron/chain"
  if is_chain and ngx.req.get_method() ~= "POST" then
    ngx.header["Allow"] = "POST"
    return answer_error(405, id, "method_not_allowed", "/_funcatron/chain takes POST", started)
  end
  if is_chain and mode then
    return answer_error(400, id, "chain_async",
      "chains answer synchronously; an asynchronous chain is not supported", started)
  end
  local length, unsized = body_length()
  -- Decided before the Func is known, so nothing is counted twice: a body
  -- of unknown size that will be queued (asynchronous calls; synchronous
  -- ones when nothing goes direct by size) is read in the bounded location.
  if unsized and not bounded and (mode or is_chain or (conf.direct_threshold <= 0 and not wants_stream(h))) then
    return ngx.exec("@funcatron_queued")
  end
  local headers = headers_in_order()
  if func then
    path = rest
    headers[#headers + 1] = { "x-funcatron-func", func }
  end
  -- The host the envelope carries, so the edge routes as a Tron would.
  local method, host = ngx.req.get_method(), var.http_host or var.host or ""
  local routed
  -- Recorded async calls go to a Tron (it records them) and route there.
  local t = mode ~= "recorded" and not is_chain and edge_table()
  if t then
    local status, code, message, allow
    routed, status, code, message, allow = edge_route(t, func, host, method, path, mode)
    if not routed and status then
      if allow then ngx.header["Allow"] = allow end
      return answer_error(status, id, code, message, started)
    end
  end
  local req = {
    id = id, deadline_ms = math.floor(sent_ms + timeout_ms), sent_ms = sent_ms,
    method = method, scheme = var.http_x_forwarded_proto == "https" and "https" or var.scheme,
    host = var.http_host or var.host, path = path, query = query,
    headers = headers, remote = var.remote_addr .. ":" .. var.remote_port,
  }
  -- Asynchronous calls never go direct: their bodies must be durable.
  if not mode and not is_chain and goes_direct(h, routed, length, unsized) then
    if length and length > conf.max_direct_body then
      return too_large(id, conf.max_direct_body, started)
    end
    return direct_call(id, req, routed, started)
  end
  if length and length > conf.max_body then return too_large(id, conf.max_body, started) end
  local body, berr = read_body()
  if not body then
    return answer_error(400, id, "bad_request", "could not read the request body: " .. tostring(berr), started)
  end
  if #body > conf.max_body then return too_large(id, conf.max_body, started) end
  req.body = body
  body = nil
  if mode == "no-result" then
    if not consumer_up then
      return answer_error(503, id, "broker_unavailable", "the ingress is not connected to the broker", started)
    end
    return fire_and_forget(id, req, started, routed)
  elseif mode then
    if not conf.tron then
      return answer_error(501, id, "async_unavailable",
        "this nginx ingress has no Tron for asynchronous calls (funcatron nginx-config --tron-url)", started)
    end
    -- The Tron sets the call's fields (call id, attempt, deadline, reply).
    return submit_to_tron(id, envelope.encode_request(req), started)
  end
  if not consumer_up then
    return answer_error(503, id, "broker_unavailable", "the ingress is not connected to the broker", started)
  end
  local key = new_id()
  req.reply_to, req.reply_key = reply_queue, key
  local env = envelope.encode_request(req)
  req = nil
  local resp = publish_and_wait(id, env, key, routed, started)
  return answer_reply(id, resp, started)
end

--- /_funcatron/calls/<id> without a Tron: nothing to read it from.
function M.no_calls()
  ngx.update_time()
  return answer_error(501, request_id(), "async_unavailable",
    "this nginx ingress has no Tron for asynchronous calls (funcatron nginx-config --tron-url)", ngx.now())
end

--- /_funcatron/store... without a Tron: the document store is on the Trons
--- (and on the embedded ingress), nginx has none to hand it to.
function M.no_store()
  ngx.update_time()
  return answer_error(501, request_id(), "store_unavailable",
    "this nginx ingress has no Tron for the document store (funcatron nginx-config --tron-url)", ngx.now())
end

--- error_page 502/504 of the document store's locations: nginx could not
--- reach the Tron, or it did not answer in time (a write may then have
--- been applied: read the document to know).
function M.store_failed()
  ngx.update_time()
  local id = ngx.var.funcatron_request_id
  if id == "-" then id = request_id() end
  local started = ngx.req.start_time()
  local upstream = tostring(ngx.var.upstream_status)
  if upstream:find("504") then
    return answer_error(504, id, "timeout", "the Tron holding the document store did not answer in time", started)
  end
  ngx.log(ngx.WARN, "funcatron: document store request ", id, " to the Tron failed (upstream status ", upstream, ")")
  return answer_error(503, id, "tron_unavailable", "the Tron holding the document store could not be reached", started)
end

--- error_page 413 location: the JSON body for bodies over client_max_body_size
--- (the location's limit, $funcatron_body_limit).
function M.too_large()
  ngx.update_time()
  local id = ngx.var.funcatron_request_id
  if id == "-" then id = request_id() end
  return too_large(id, tonumber(ngx.var.funcatron_body_limit) or conf.max_body, ngx.now())
end

--- error_page 502/504 in @funcatron_direct: nginx could not reach the
--- Runner holding the ticket, or it did not answer in time (as the
--- embedded ingress answers).
function M.direct_failed()
  ngx.update_time()
  local id = ngx.var.funcatron_request_id
  local started = ngx.req.start_time()
  local upstream = tostring(ngx.var.upstream_status)
  if upstream:find("504") then
    return answer_error(504, id, "timeout", string.format("no answer within %d ms", conf.timeout_ms), started)
  end
  ngx.log(ngx.WARN, "funcatron: direct request ", id, " to the Runner failed (upstream status ", upstream, ")")
  return answer_error(502, id, "direct_failed", "the Runner holding the request could not be reached", started)
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
  local t = edge_table()
  -- Workers holding a current table (each hears the Trons on its own).
  local edge = 0
  ngx.update_time()
  for i = 0, ngx.worker.count() - 1 do
    local until_s = ngx.shared.funcatron:get("edge:" .. i)
    if until_s and until_s > ngx.now() then edge = edge + 1 end
  end
  ngx.print(string.format('{"status":"%s","broker":"amqp","connected":%s,"workers_ready":%d,"workers":%d,"routing":"%s","edge_table_revision":%s,"workers_with_table":%d}',
    consumer_up and "ok" or "broker_unavailable", tostring(consumer_up), ready, ngx.worker.count(),
    conf.routing, t and tostring(t.revision) or "null", edge))
end

return M
