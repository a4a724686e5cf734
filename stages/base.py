"""The stage contract shared by every model stage and by the engine that runs them.

A stage is a small class in the style of LitServe's ``LitAPI`` and NeMo Curator's ``ProcessingStage``:
it names itself, lists the devices it runs on and its batch policy, loads its models in
``setup(device)``, maps a micro-batch in ``process_batch(items)`` and frees everything in ``teardown()``.
Nothing here depends on the local engine, so the same classes can later run as Ray Data actors.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.rules import RuleThresholds


@dataclass(frozen=True)
class BatchPolicy:
    """How a worker gathers a micro-batch: up to ``max_batch_size`` items or ``max_wait_ms`` after the first.

    ``max_batch_size=None`` means "auto": the stage probes for the largest batch that fits its device.
    """

    max_batch_size: int | None = 8
    max_wait_ms: float = 20.0


@dataclass(frozen=True)
class ItemFailure:
    """A per-item failure. Not ``retryable``: quarantine under ``reason`` at once (bad input). ``retryable``:
    the item goes back to pending until it has used its attempts (a stage error that may be transient)."""

    reason: str
    message: str
    stage: str = ""
    retryable: bool = False


@dataclass
class ImageItem:
    """One input image on its way through the pipeline.

    ``key`` is the caller's identifier (the ledger row id); stages never interpret it. ``source`` is the
    path the loader reads; placement happens outside the stages.
    """

    key: int
    source: str
    seen_at: float = field(default_factory=time.time)
    size: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    image: Any | None = None  # PIL.Image.Image in RGB once loaded; dropped at the sink
    signals: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    failure: ItemFailure | None = None
    # The thresholds this item is decided by: a stage may skip work whose signals they no longer need.
    rules: RuleThresholds | None = None
    # Signals not computed for this item, with why (``{"caption": "confident_detection"}``): the decision did not
    # need them. Recorded with the decision, so ``explain`` and ``rebin`` know what is missing.
    not_computed: dict[str, str] = field(default_factory=dict)
    # The input's (size, mtime_ns, inode, ctime_ns) as the loader opened it: the file whose bytes were hashed and
    # decoded. Placement goes ahead only while the input is still that file (it changed while it was processed
    # otherwise); what the file was when it was first seen does not matter, since these bytes are the ones binned.
    opened: tuple[int, int, int, int] | None = None

    def fail(self, reason: str, message: str, stage: str = "", retryable: bool = False) -> None:
        self.failure = ItemFailure(reason=reason, message=message, stage=stage, retryable=retryable)
        self.image = None


class OutOfDeviceMemory(RuntimeError):
    """Raised (or translated) by a stage when its device ran out of memory for the current batch."""


class WorkerCrashed(RuntimeError):
    """The process that ran this call died (segfault, abort, ``os._exit``, OOM killer, SIGKILL); it was replaced.

    Raised by whatever hosts a stage out of process, never by a stage itself: the call's items were in the
    dead process and may be the cause.
    """


class WorkerStuck(WorkerCrashed):
    """The call ran past its time limit (``stall_timeout_s``): its process was killed and replaced."""


#: Batches in flight per replica of a stage with host phases: one being prepared, one on the device, one finished.
#: The engine's hosts drive a replica so (``app.hosts.PhasedReplica``); a stage sizes its memory probe by it.
OVERLAP_DEPTH = 3


class Stage(ABC):
    """One step of the pipeline; one instance (one model copy) per device, owned by one thread."""

    name: str = "stage"
    #: The signals this stage writes (keys of ``ImageItem.signals``). The engine passes an item by the stage when
    #: the rules need none of them for its decision; a stage that writes none (the loader) always runs.
    produces: frozenset[str] = frozenset()
    #: Where ``batch_size: auto`` starts probing (halving until it fits); None: the engine's default ceiling.
    max_auto_batch: int | None = None
    #: Whether a replica keeps nothing worth keeping between batches (no model): an engine may then set up a fresh
    #: replica per batch, as the Ray engine does with plain CPU tasks in place of an actor pool.
    stateless: bool = False

    def __init__(self, devices: list[str] | None = None, batch_policy: BatchPolicy | None = None) -> None:
        self.devices: list[str] = list(devices or ["cpu"])
        self.batch_policy: BatchPolicy = batch_policy or BatchPolicy()
        self.device: str | None = None

    def replicate(self) -> Stage:
        """A fresh, not yet set-up copy for another device (configuration is shared, models are not)."""
        clone = copy.copy(self)
        clone.device = None
        return clone

    def setup(self, device: str) -> None:
        """Load models onto ``device``. Called once, on the thread that will call ``process_batch``."""
        self.device = device

    @abstractmethod
    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        """Process a micro-batch and return the same items (same order), updated in place.

        Expected per-item problems set ``item.fail(...)``; an exception fails the whole call and the
        engine bisects the batch to find the item that causes it. Raise ``OutOfDeviceMemory`` (or let a
        CUDA OOM through) to make the engine halve the batch cap and retry.
        """

    # --- host work around the device call (optional) --------------------------------------------------------
    # The engine runs a batch as prepare -> forward -> finish. ``forward`` is the device call: it runs on the
    # replica's own thread, one batch at a time. ``prepare`` and ``finish`` are host work (decoding to arrays,
    # pinning memory, copying results back, turning outputs into signals): they run on other threads, while the
    # replica's previous or next batch is on the device, so they must not touch state that ``forward`` changes.
    # A stage without host work keeps the defaults and does everything in ``process_batch``; a stage with host
    # work overrides all three and makes ``process_batch`` their composition (``run_phases``).

    def prepare(self, items: list[ImageItem]) -> Any:
        """Host work before the device call; returns what ``forward`` takes. Default: the items themselves."""
        return items

    def forward(self, batch: Any) -> Any:
        """The device call on what ``prepare`` returned. Default: ``process_batch``."""
        return self.process_batch(batch)

    def finish(self, items: list[ImageItem], outputs: Any) -> list[ImageItem]:
        """Host work after the device call: the items, updated from ``outputs``. Default: the outputs are the items."""
        return outputs  # type: ignore[no-any-return]

    @property
    def has_host_phases(self) -> bool:
        """Whether this stage splits host work from its device call (the engine then overlaps them)."""
        cls = type(self)
        return cls.prepare is not Stage.prepare or cls.finish is not Stage.finish

    def probe_batch_size(self, device: str, ceiling: int) -> int:
        """Largest batch that fits ``device`` (for ``batch_size: auto``); CPU and unknowns use ``ceiling``."""
        return ceiling

    def warmup(self) -> None:
        """Run the models once so that the first real batch is not slow (READY waits for this)."""

    def teardown(self) -> None:
        """Release the models and device memory."""


def run_phases(stage: Stage, items: list[ImageItem]) -> list[ImageItem]:
    """One batch through a stage's three phases in sequence, on the calling thread (what ``process_batch`` of a stage
    with host phases does)."""
    return stage.finish(items, stage.forward(stage.prepare(items)))


# torch's allocator ("CUDA out of memory"), a CUDA runtime call failing with cudaErrorMemoryAllocation ("CUDA error: out
# of memory": pinning host memory for an upload, cudaHostAlloc, says it this way), onnxruntime, cuBLAS and cuDNN.
_OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "Failed to allocate memory",
                 "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """True for our OOM, torch's CUDA OOM and onnxruntime's allocation failures ("Failed to allocate memory",
    possibly wrapped by RapidOCR), without importing torch; follows the ``raise ... from`` chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OutOfDeviceMemory, MemoryError)):
            return True
        if type(current).__name__ in {"OutOfMemoryError", "CUDAOutOfMemoryError"}:
            return True
        if any(message in str(current) for message in _OOM_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False
