-- The hello Func: a handler per Swagger operationId.
local M = {}

function M.hello(req)
  return "Hello, world!"
end

function M.helloName(req)
  return "Hello, " .. req.params.name .. "!"
end

return M
