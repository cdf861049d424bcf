"""The training application: distributed setup, optimiser, checkpoints, logging and the loop.

Library code (model, objectives, data, metrics) never imports this package.
"""

from stoa_vlp.train.distributed import DistEnv, init_distributed, shutdown_distributed
from stoa_vlp.train.loop import NonFiniteLossError, Trainer, TrainResult

__all__ = ["DistEnv", "NonFiniteLossError", "TrainResult", "Trainer", "init_distributed", "shutdown_distributed"]
