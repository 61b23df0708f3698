-- The pipeline bundle's operations are flows (x-funcatron-flow in
-- swagger.yaml): no handler code runs for them.
return {}
