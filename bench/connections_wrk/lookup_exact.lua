-- Look up one exact uid, as the C++ client does (the uid itself is the regex).
wrk.method = "POST"
wrk.path = "/getconnection/bench"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"data_type":"TPSet","uid_regex":"DRO-000500-tp_to_trigger"}'
