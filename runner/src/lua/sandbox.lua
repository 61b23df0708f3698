-- The Lua runtime's sandbox wrappers (runner/src/lua.rs), run once in every
-- Func state before the Func's own code. The originals stay reachable only
-- as upvalues here (there is no `debug` library to reach them).
--
-- 1. pcall, xpcall, coroutine.resume and coroutine.close re-raise once the
--    call has run past its time limit: the hook's error cannot be caught;
--    an xpcall message handler is not called past the limit; a coroutine
--    stopped by the limit is never closed (its __close would run unhooked);
--    setmetatable refuses __gc (finalizers run unhooked).
-- 2. string.find/match/gmatch/gsub (also as methods: the string metatable's
--    __index is this same table) ask the pattern bound first
--    (runner/src/lua/pattern.rs); short subjects with short patterns skip it.
-- 3. table.move, and table.insert/table.remove at a position on a table with
--    a metatable (whose __len may lie), refuse to shift more than MAX_SHIFT
--    elements in one C loop.
local expired, pattern_check, MAX_SHIFT = ...
local error, select, type, tonumber, getmetatable = error, select, type, tonumber, getmetatable
local format = string.format
local raw_pcall, raw_xpcall, raw_setmetatable, rawget = pcall, xpcall, setmetatable, rawget
local create, resume, close = coroutine.create, coroutine.resume, coroutine.close
local find, match, gmatch, gsub = string.find, string.match, string.gmatch, string.gsub
local move, insert, remove = table.move, table.insert, table.remove

local function after(ok, ...)
  if not ok and expired() then
    error("time limit exceeded", 0)
  end
  return ok, ...
end

pcall = function(...) return after(raw_pcall(...)) end
-- The hook's error calls the message handler while Lua runs no hooks (it
-- is still inside the hook): past the limit the Func's handler never runs.
xpcall = function(f, handler, ...)
  if type(handler) ~= "function" then
    return raw_xpcall(f, handler, ...)
  end
  local function guarded(e)
    if expired() then
      return e
    end
    return handler(e)
  end
  return after(raw_xpcall(f, guarded, ...))
end
coroutine.resume = function(...) return after(resume(...)) end

-- A coroutine the hook stopped still has Lua's hooks off: closing it would
-- run its pending __close handlers unhooked. Past the limit it is never
-- closed (coroutine.wrap here closes only after ordinary errors, as the
-- original does).
coroutine.close = function(co)
  if expired() then
    error("time limit exceeded", 0)
  end
  return after(close(co))
end
local function unwrap(co, ok, ...)
  if ok then
    return ...
  end
  local e = ...
  if expired() then
    error("time limit exceeded", 0)
  end
  local closed, why = close(co)
  if not closed then
    e = why
  end
  error(e, type(e) == "string" and 2 or 0)
end
coroutine.wrap = function(f)
  local co = create(f)
  return function(...) return unwrap(co, resume(co, ...)) end
end

-- Finalizers run with hooks off (lgc.c, GCTM): a looping __gc could never
-- be stopped. Lua code cannot mark an object for finalization any other way.
setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not available in the sandbox", 2)
  end
  return raw_setmetatable(t, mt)
end

-- kind: 0 find, 1 match/gsub, 2 gmatch, 3 plain find (see pattern.rs).
local function bound(s, p, kind)
  if type(s) ~= "string" or type(p) ~= "string" or #s > 32 or #p > 8 then
    local why = pattern_check(s, p, kind)
    if why then
      error(why, 3)
    end
  end
end

string.find = function(s, p, init, plain)
  bound(s, p, plain and 3 or 0)
  return find(s, p, init, plain)
end
string.match = function(s, p, init)
  bound(s, p, 1)
  return match(s, p, init)
end
string.gmatch = function(s, p, init)
  bound(s, p, 2)
  return gmatch(s, p, init)
end
string.gsub = function(s, p, repl, n)
  bound(s, p, 1)
  return gsub(s, p, repl, n)
end

local function too_many(name, count, level)
  error(format("table.%s: %.0f elements in one call; the sandbox allows %d", name, count, MAX_SHIFT), level)
end

table.move = function(a1, f, e, t, a2)
  local nf, ne = tonumber(f), tonumber(e)
  if nf and ne and ne - nf >= MAX_SHIFT then
    too_many("move", ne - nf + 1, 3)
  end
  return move(a1, f, e, t, a2)
end

local function shifted(name, t, pos)
  if getmetatable(t) ~= nil then
    local n, p = #t, tonumber(pos)
    if type(n) == "number" and p and n - p >= MAX_SHIFT then
      too_many(name, n - p, 4)
    end
  end
end

table.insert = function(t, ...)
  if select("#", ...) >= 2 then
    shifted("insert", t, (...))
  end
  return insert(t, ...)
end
table.remove = function(t, ...)
  if select("#", ...) >= 1 then
    shifted("remove", t, (...))
  end
  return remove(t, ...)
end

-- The tables one request could change for the next (see LuaFunc in
-- runner/src/lua.rs), taken before the Func's code runs; `snapshot` is
-- called once the Func has loaded and returns the restore function (run
-- after every call) and the tables whose metatables Rust puts back.
--
-- The libraries become empty proxies of a hidden copy (their metatable
-- protected, __pairs lists the copy): what a request writes into one lands
-- in the proxy, and restoring is one `next` per table. The string
-- metatable is protected (getmetatable("") is false). The globals and
-- `env` are copied and written back.
local next, rawset = next, rawset
local globals, strings = _G, getmetatable("")
local libraries = { string, table, math, utf8, coroutine, json, store }
local function proxy(t)
  local real = {}
  for k, v in next, t do
    real[k] = v
  end
  for k in next, real do
    rawset(t, k, nil)
  end
  raw_setmetatable(t, {
    __index = real,
    __metatable = false,
    -- An iterator that keeps the copy to itself (`next, real` would hand
    -- it out: pairs returns its state).
    __pairs = function()
      return function(_, k) return next(real, k) end, nil, nil
    end,
  })
end
local function snapshot()
  local copied, proxied = { globals, env }, {}
  for _, t in next, libraries do
    if getmetatable(t) == nil then
      proxy(t)
      proxied[#proxied + 1] = t
    else
      copied[#copied + 1] = t
    end
  end
  strings.__metatable = false
  local saved = {}
  for i = 1, #copied do
    local copy = {}
    for k, v in next, copied[i] do
      copy[k] = v
    end
    saved[i] = copy
  end
  local function restore()
    for i = 1, #proxied do
      local t = proxied[i]
      for k in next, t do
        rawset(t, k, nil)
      end
    end
    for i = 1, #copied do
      local t, copy = copied[i], saved[i]
      for k in next, t do
        if rawget(copy, k) == nil then
          rawset(t, k, nil)
        end
      end
      for k, v in next, copy do
        rawset(t, k, v)
      end
    end
  end
  return restore, copied
end
return snapshot
