"""Where a stage replica runs: in its worker thread (``ThreadHost``) or in a spawned child process that the worker
thread drives (``ProcessHost``). Hosts adapt a stage; they are not stages, and the stages do not know them."""

from app.hosts.base import ReplicaHost, host_for
from app.hosts.process import ProcessHost, describe_exit
from app.hosts.thread import ThreadHost

__all__ = ["ProcessHost", "ReplicaHost", "ThreadHost", "describe_exit", "host_for"]
