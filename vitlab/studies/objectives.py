"""Training objectives written by the studies area; importing this module registers them with
the engine (`vitlab.train.objectives.build_objective` imports it on demand)."""
from . import mpp  # noqa: F401  (registers objective 'mpp')
