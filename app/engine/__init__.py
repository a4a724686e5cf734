"""The local engine: feeder -> bounded queues -> stage runners -> sink, and the parts the Ray engine shares with it
(admission, routing, containment, finishing, accounting), so that both engines treat a file the same way."""

from app.engine.accounting import FINISHED, RunStats
from app.engine.admission import admit, final_failure
from app.engine.containment import BatchCap, CallObserver, contain
from app.engine.finishing import DISK_ERRNOS, Finisher, PlacementBlocked, remove_inputs
from app.engine.pipeline import MetricsObserver, Pipeline
from app.engine.routing import needs, next_stage
from app.engine.runner import AUTO_BATCH_CEILING, Hosting, StageRunner, StageSetupError

__all__ = ["AUTO_BATCH_CEILING", "DISK_ERRNOS", "FINISHED", "BatchCap", "CallObserver", "Finisher", "Hosting",
           "MetricsObserver", "Pipeline", "PlacementBlocked", "RunStats", "StageRunner", "StageSetupError", "admit",
           "contain", "final_failure", "needs", "next_stage", "remove_inputs"]
