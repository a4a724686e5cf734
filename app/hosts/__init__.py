"""Where a stage replica runs: in its worker thread (``ThreadHost``) or in a spawned child process that the worker
thread drives (``ProcessHost``). Hosts adapt a stage; they are not stages, and the stages do not know them."""

from app.hosts.base import ReplicaHost, host_for
from app.hosts.phased import OVERLAP_DEPTH, PhasedReplica, PhaseObserver, concurrency_of
from app.hosts.process import ProcessHost, describe_exit
from app.hosts.thread import ThreadHost

__all__ = ["OVERLAP_DEPTH", "PhaseObserver", "PhasedReplica", "ProcessHost", "ReplicaHost", "ThreadHost", "concurrency_of",
           "describe_exit", "host_for"]
