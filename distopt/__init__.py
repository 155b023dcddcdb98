"""distopt: ZeRO-style sharded optimizers for data-parallel MLX training.

Change one line of an MLX training loop::

    group = distopt.init()
    optimizer = distopt.Adamax(learning_rate=1e-3)   # was mlx.optimizers.Adamax
    optimizer.update(model, grads)                     # local grads: averaged over ranks here
"""

from .group import DistoptError, init
from .optimizers import SGD, Adagrad, Adamax
from .sharded import ShardedOptimizer
from .accumulate import GradientAccumulator
from .checkpoint import load_checkpoint, save_checkpoint
from .manifest import CheckpointError
from .plan import plan
from .precision import DynamicLossScale
from .progress import Progress

__version__ = "0.1.0"

__all__ = ["init", "DistoptError", "ShardedOptimizer", "SGD", "Adagrad", "Adamax", "GradientAccumulator", "DynamicLossScale", "plan", "save_checkpoint", "load_checkpoint", "CheckpointError", "Progress"]
