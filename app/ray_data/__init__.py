"""`binner once --engine ray`: the same stages, rules, placement and ledger, spread over a Ray cluster with Ray Data.

codec (items as Arrow rows), actor (a Stage as an actor class), tasks (loader and finishing), dataset (one window as
a Dataset) and driver (windows, the ledger, the summary). Ray is imported only when a run starts.
"""

from app.ray_data.driver import INSTALL_HINT, RayEngineError, RayRun, ray_missing, run_on_ray

__all__ = ["INSTALL_HINT", "RayEngineError", "RayRun", "ray_missing", "run_on_ray"]
