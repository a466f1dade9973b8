"""jaxchar's Pallas kernels for NVIDIA GPUs and TPUs, interpreted on CPUs for tests: one
module per concept. `grid` (the split of the work over programs and the barrier at which they meet),
`layer` (the training layer's two recurrences, one kernel launch each per sequence) and
`sampling` (the whole stateful sampling loop in one kernel launch per chunk of characters);
`tpu` holds the training layer's kernels for TPUs (Mosaic), the same design on a TensorCore.
`jaxchar.lstm.backends` decides whether one runs.
"""

from jaxchar.lstm.pallas import sampling, tpu
from jaxchar.lstm.pallas.grid import ROWS, UNITS, piece_width
from jaxchar.lstm.pallas.layer import (
    backward,
    forward,
    layer_backward,
    layer_forward,
    supports,
)

__all__ = [
    "ROWS",
    "UNITS",
    "backward",
    "forward",
    "layer_backward",
    "layer_forward",
    "piece_width",
    "sampling",
    "supports",
    "tpu",
]
