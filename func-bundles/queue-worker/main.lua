-- Each call is a batch of up to 10 messages of the `jobs` queue, as an
-- array of message events (docs/triggers.md): `message_id`, `headers`,
-- `content` (json, text or base64) and `body`.
function jobs(req)
  local batch = req.json
  local ids = {}
  for i, m in ipairs(batch) do
    ids[i] = m.message_id or "(no id)"
  end
  print("handled " .. #batch .. " jobs: " .. table.concat(ids, ", "))
  return {handled = #batch}
end
