"""jaxchar's C++ kernels for CPUs (jaxchar/csrc/): stateful generation of up to 64 rows at
once, and the recurrences of the LSTM layer's training step, as XLA FFI calls.

This package only loads the kernels and wraps their calls; `jaxchar.lstm.backends` decides
whether one runs. One module per concept: `loader` (the built variants, this CPU's flags,
which variant loads), `generation` (the sampling loop) and `layer` (the training
recurrences), each with its `vmap` and sharding rules.
"""

from jaxchar.lstm.native.generation import MAX_ROWS, generate, generate_supports
from jaxchar.lstm.native.layer import layer_backward, layer_forward, layer_supports
from jaxchar.lstm.native.loader import (
    CPU_KINDS,
    VARIANTS,
    available,
    bf16,
    cpu_flags,
    cpu_model,
    threads_for,
    variant,
)

__all__ = [
    "CPU_KINDS",
    "MAX_ROWS",
    "VARIANTS",
    "available",
    "bf16",
    "cpu_flags",
    "cpu_model",
    "generate",
    "generate_supports",
    "layer_backward",
    "layer_forward",
    "layer_supports",
    "threads_for",
    "variant",
]
