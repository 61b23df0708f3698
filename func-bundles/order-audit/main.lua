-- order-audit: one line per change of an order, from the store's change
-- event {event_id, type, collection, id, version, old, new, at_ms}
-- (`old` is null for a create, `new` for a delete).
local M = {}

function M.audit(req)
  local e = req.json
  if type(e) ~= "table" or type(e.type) ~= "string" or type(e.id) ~= "string" then
    return { status = 400, body = "expected a change event: {type, collection, id, version, ...}" }
  end
  local version = "?"
  if type(e.version) == "number" then
    version = tostring(math.tointeger(e.version) or e.version)
  end
  local collection = type(e.collection) == "string" and e.collection or "orders"
  local line = e.type .. " " .. collection .. "/" .. e.id .. " v" .. version
  print("audit: " .. line)
  return line
end

return M
