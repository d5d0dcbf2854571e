# The twistd dropin. It must stay this small: importing anything that touches the reactor here
# breaks `twistd -r <reactor>`, so the real code lives in wmgr.tap and is loaded only when run.
from twisted.application.service import ServiceMaker

wmgr = ServiceMaker(
    "wmgr",
    "wmgr.tap",
    "Worker management daemon: wr jobs, pman, connections, Qserv services and databases, workers and "
    "Flamenco tasks over HTTPS",
    "wmgr",
)
