"""Workers on many hosts: the manager's registry of workers, their leases and liveness
(registry), and the worker role that pulls and runs a manager's jobs (agent, outbox)."""
