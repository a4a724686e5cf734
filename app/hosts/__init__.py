"""Where a stage replica runs: in this process (``ThreadHost``: its model calls on the replica's own model thread)
or in a spawned child process that the engine's threads drive (``ProcessHost``). Either way ``PhasedReplica`` runs
the model calls in order on one thread while host phases overlap them. Hosts adapt a stage; they are not stages,
and the stages do not know them."""

from app.hosts.base import ReplicaHost, host_for
from app.hosts.phased import OVERLAP_DEPTH, PhasedReplica, PhaseObserver, concurrency_of
from app.hosts.process import ProcessHost, describe_exit
from app.hosts.thread import ThreadHost

__all__ = ["OVERLAP_DEPTH", "PhaseObserver", "PhasedReplica", "ProcessHost", "ReplicaHost", "ThreadHost", "concurrency_of",
           "describe_exit", "host_for"]
