-- Pet data for the petshop Func (a module in the bundle, loaded by require).
local pets = {
  all = {
    { id = 1, name = "Rex", tag = "dog" },
    { id = 2, name = "Tom", tag = "cat" },
    { id = 3, name = "Nibbles", tag = "hamster" },
    { id = 4, name = "Fido", tag = "dog" },
  },
}

function pets.find(id)
  for _, pet in ipairs(pets.all) do
    if pet.id == id then return pet end
  end
  return nil
end

return pets
