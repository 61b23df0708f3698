-- clock: answers the schedule's ticks (and hand-made ones) with the tick
-- and how late it was fired. The Lua sandbox has no clock of its own, so
-- lateness comes from the body: `late_ms`, else `fired_ms - tick_ms`.
local M = {}

-- A JSON number as an integer, or nil (JSON null decodes to a value that
-- is not nil, so check the type).
local function int(v)
  if type(v) == "number" then
    return math.tointeger(v)
  end
  return nil
end

function M.tick(req)
  local body = req.json
  if type(body) ~= "table" or int(body.tick_ms) == nil then
    return { status = 400, body = { error = "expected a JSON body with an integer tick_ms" } }
  end
  local tick = int(body.tick_ms)
  local late = int(body.late_ms)
  if late == nil and int(body.fired_ms) ~= nil then
    late = math.max(0, int(body.fired_ms) - tick)
  end
  local trigger = req.headers["x-funcatron-trigger"]
  if type(body.trigger) == "string" then
    trigger = body.trigger
  end
  return { tick_ms = tick, late_ms = late or 0, trigger = trigger or "by hand" }
end

return M
