"""wmgr: one HTTPS daemon per machine for jobs, processes, tasks, services, databases and connections."""

__version__ = "0.1.0"
