"""Bounded queues, micro-batching and the thread bridge: the plumbing of the pipeline, free of model knowledge."""

from queues.batcher import next_batch
from queues.bounded import BoundedQueue, EndOfStream, QueueClosed, QueueObserver
from queues.thread_bridge import DedicatedThread

__all__ = ["BoundedQueue", "DedicatedThread", "EndOfStream", "QueueClosed", "QueueObserver", "next_batch"]
