-- The petshop Func: path and query parameters, JSON in and out, status codes
-- and headers, and a helper module loaded with require.
local pets = require("pets")

local M = {}

function M.listPets(req)
  local limit = tonumber(req.query.limit) or #pets.all
  local out = {}
  for _, pet in ipairs(pets.all) do
    if #out >= limit then break end
    if req.query.tag == nil or pet.tag == req.query.tag then
      out[#out + 1] = pet
    end
  end
  return { status = 200, headers = { ["x-total-count"] = tostring(#out) }, body = out }
end

function M.createPet(req)
  local pet = req.json
  if type(pet) ~= "table" or type(pet.name) ~= "string" or pet.name == "" then
    return { status = 400, body = { error = "a pet needs a name" } }
  end
  return {
    status = 201,
    headers = { location = "/petshop/pets/" .. (#pets.all + 1) },
    body = { id = #pets.all + 1, name = pet.name, tag = pet.tag },
  }
end

function M.showPetById(req)
  local pet = pets.find(tonumber(req.params.petId))
  if pet == nil then
    return { status = 404, body = { error = "no pet " .. req.params.petId } }
  end
  return pet
end

function M.echo(req)
  return {
    status = 200,
    headers = { ["content-type"] = req.headers["content-type"] or "application/octet-stream" },
    body = req.body,
  }
end

function M.inspect(req)
  return {
    method = req.method,
    path = req.path,
    query = req.query,
    headers = req.headers,
    id = req.id,
  }
end

return M
