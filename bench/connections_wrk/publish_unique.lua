-- One connection per request, a new uid each time (as a DAQ application's first publication).
local n = 0
request = function()
  n = n + 1
  local body = string.format(
    '{"connections":[{"connection_type":0,"data_type":"TPSet","uid":"APP-%08d-out","uri":"tcp://10.0.0.1:%d"}],"partition":"bench-publish"}',
    n, 1024 + n % 60000)
  return wrk.format("POST", "/publish", {["Content-Type"] = "application/json"}, body)
end
