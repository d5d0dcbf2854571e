-- Look up every DRO connection of the partition the benchmark filled.
wrk.method = "POST"
wrk.path = "/getconnection/bench"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"data_type":"TPSet","uid_regex":"DRO.*"}'
