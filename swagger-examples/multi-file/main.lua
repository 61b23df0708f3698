-- The multi-file example's handlers: one per operationId.
local pets = { { name = "Rex", tag = "dog" } }

return {
  listPets = function(req) return pets end,
  addPet = function(req) table.insert(pets, req.json) return { status = 201, body = req.json } end,
  showPetById = function(req) return pets[tonumber(req.params.petId)] end,
  getTree = function(req) return { value = 1, children = { { value = 2, children = {} } } } end,
  putTree = function(req) return nil end,
}
