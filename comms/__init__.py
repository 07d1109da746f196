"""Process groups and device meshes, collective tracing, topology and placement, MoE
communication scheduling. Imports nothing else of Kintsugi."""
from comms import dist_utils, trace
from comms.errors import UserError, exits_on_user_error

__all__ = ["UserError", "exits_on_user_error", "dist_utils", "trace"]
