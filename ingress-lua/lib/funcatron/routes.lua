-- Edge routing for the nginx ingress: the route table the Trons broadcast
-- on `funcatron.admission`, read as the flat list of matchers the Rust
-- loader produced (`funcatron_routes::RouteTable::matchers`), so no
-- document is ever parsed here. Each matcher is one Func on one base,
-- most specific first, with a host regex, a base-path regex and its path
-- templates' regexes; this file walks them exactly as the Rust table's
-- `route_in` does (tron/tests/routing.rs checks a Rust transcription of
-- this walk against the table on random documents).
--
-- Tron -> funcatron.admission -> **here** (per nginx worker) -> the
-- request's Func queue, with the routing outcome in message headers
-- (control/src/headers.rs), as the embedded ingress and a Tron set them.
local M = {}

local re_match = ngx.re.match
local char, tonumber, format = string.char, tonumber, string.format

-- Compile nothing by hand: ngx.re caches compiled regexes ("o").
local HOST_OPTS, PATH_OPTS = "ijo", "jo"

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- Is `method` (upper case) one of the path's direct methods (operations
-- marked x-funcatron-direct)?
local function is_direct(p, method)
  if type(p.direct) ~= "table" then return false end
  for _, m in ipairs(p.direct) do
    if m == method then return true end
  end
  return false
end

local function methods_of(p)
  local out = {}
  for i, m in ipairs(p.methods) do out[i] = m[1] end
  return out
end

-- Walk the matchers (of Func `only`, when given) for host, method, path.
local function route_in(t, only, host, method, path)
  local umethod = method:upper()
  local denied -- { func, path }
  for _, m in ipairs(t.matchers) do
    local f = m.func + 1
    if not (denied and denied.func ~= f) and not (only and only ~= f)
      and not (m.host and not re_match(host, m.host, HOST_OPTS)) then
      local rest = path
      local ok = true
      if m.base then
        local c = re_match(path, m.base, PATH_OPTS)
        if not c then
          ok = false
        else
          rest = c[1]
          if not rest or rest == "" then rest = "/" end
        end
      end
      if ok then
        for _, p in ipairs(m.paths) do
          local caps = re_match(rest, p.regex, PATH_OPTS)
          if caps then
            local params, n = {}, 0
            for i, name in ipairs(p.names) do
              local v = caps[i]
              if v then
                params[name] = unescape(v)
                n = n + 1
              end
            end
            params = n > 0 and params or nil
            local found
            for _, mo in ipairs(p.methods) do
              if mo[1] == umethod then found = mo break end
            end
            if not found then
              if not denied then denied = { func = f, path = p, params = params } end
              break
            end
            return { kind = "found", func = f, method = found[1], operation = found[2],
              template = p.template, params = params, direct = is_direct(p, umethod) }
          end
        end
      end
    end
  end
  if denied and umethod == "OPTIONS" then
    return { kind = "preflight", func = denied.func, method = "OPTIONS", operation = "",
      template = denied.path.template, params = denied.params, allow = table.concat(methods_of(denied.path), ", ") }
  elseif denied then
    return { kind = "not_allowed", allow = table.concat(methods_of(denied.path), ", ") }
  end
  return { kind = "not_found" }
end

--- Route a request by table `t`.
function M.route(t, host, method, path)
  return route_in(t, nil, host or "", method, path)
end

--- Route a call naming its Func (/function/<func>/<rest>): `rest` below
--- the Func's primary base path, on its primary host, among its own
--- matchers. nil: no Func of that name.
function M.route_func(t, name, method, rest)
  local i = t.by_name[name]
  if not i then return nil end
  local f = t.funcs[i]
  local base = f.base_path
  local path
  if base == "/" then
    path = rest == "" and "/" or rest
  else
    path = base .. rest
  end
  return route_in(t, i, f.host or "", method, path)
end

--- A broadcast table made ready to route by: its Funcs by name, their
--- queues, when it stops counting. nil and a reason when it is not one.
function M.prepare(t, now)
  if type(t) ~= "table" or type(t.funcs) ~= "table" or type(t.matchers) ~= "table" then
    return nil, "not a route table"
  end
  t.by_name = {}
  for i, f in ipairs(t.funcs) do
    if type(f.func) ~= "string" or type(f.version) ~= "string" then
      return nil, "a Func without a name or version"
    end
    t.by_name[f.func] = i
    f.queue = "funcatron.func." .. f.func .. "." .. f.version
    f.async_queue = "funcatron.async." .. f.func .. "." .. f.version
  end
  for _, m in ipairs(t.matchers) do
    if type(m.func) ~= "number" or not t.funcs[m.func + 1] or type(m.paths) ~= "table" then
      return nil, "a matcher naming no Func"
    end
  end
  t.revision = tonumber(t.revision) or 0
  t.expires = now + (tonumber(t.ttl_ms) or 0) / 1000
  return t
end

--- The message headers of a routed request (control/src/headers.rs), as
--- funcatron_routes::Route::headers sets them.
function M.headers(t, r, now_ms, json_encode)
  local h = {}
  if r.kind == "preflight" then h[#h + 1] = { "x-funcatron-preflight", r.allow } end
  h[#h + 1] = { "x-funcatron-func", t.funcs[r.func].func }
  h[#h + 1] = { "x-funcatron-dispatched-ms", format("%.3f", now_ms) }
  h[#h + 1] = { "x-funcatron-operation", r.operation }
  h[#h + 1] = { "x-funcatron-route", r.method .. " " .. r.template }
  if r.params then h[#h + 1] = { "x-funcatron-path-params", json_encode(r.params) } end
  return h
end

--- What the Func's async policy says of a call (async or not, with a
--- callback URL or not), as funcatron_control::admission::refusal does:
--- nil to admit it, else status, code, message.
function M.refusal(f, is_async, callback)
  if not is_async and f.async_only then
    return 400, "async_only", "Func " .. f.func
      .. " takes only asynchronous calls with a callback (Prefer: respond-async and X-Callback-Url)"
  elseif is_async and f.async_only and not callback then
    return 400, "callback_required", "Func " .. f.func .. " takes asynchronous calls only with an X-Callback-Url"
  elseif is_async and f.full then
    return 429, "queue_full", string.format("Func %s already has %d asynchronous calls waiting; retry later",
      f.func, tonumber(f.max_queued) or 0)
  end
  return nil
end

return M
