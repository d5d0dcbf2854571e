"""The connection registry (the DUNE DAQ connectivity server's domain): DAQ applications publish
where they listen and look each other up. See registry (rules, in memory), journal (its SQL) and
service (the Service that ties them to the store and the clock)."""
