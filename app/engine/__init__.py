"""The local engine: feeder -> bounded queues -> stage runners -> sink, and the parts the Ray engine shares with it
(admission, routing, containment, finishing, accounting), so that both engines treat a file the same way."""

from app.engine.accounting import FINISHED, RunStats, say
from app.engine.admission import admit, final_failure
from app.engine.containment import AUTO_BATCH_CEILING, BatchCap, CallObserver, contain, probe_ceiling, starting_batch_cap
from app.engine.finishing import DISK_ERRNOS, Finisher, PlacementBlocked, PlacementPause, remove_inputs
from app.engine.pipeline import MetricsObserver, Pipeline
from app.engine.routing import later_signals, needs, next_stage
from app.engine.runner import Hosting, StageRunner, StageSetupError, first_error, set_up_runners

__all__ = ["AUTO_BATCH_CEILING", "DISK_ERRNOS", "FINISHED", "BatchCap", "CallObserver", "Finisher", "Hosting",
           "MetricsObserver", "Pipeline", "PlacementBlocked", "PlacementPause", "RunStats", "StageRunner",
           "StageSetupError", "admit", "contain", "final_failure", "first_error", "later_signals", "needs",
           "next_stage", "probe_ceiling", "remove_inputs", "say", "set_up_runners", "starting_batch_cap"]
