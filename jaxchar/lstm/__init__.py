"""The LSTM layer as one concept with several backends (see jaxchar/lstm/backends.py).

cells.py holds the definition (nn.scan cells, the reference); fused.py the layer with a
hand-written backward pass; native/ the C++ kernels' wrappers (sources in jaxchar/csrc/);
cudnn.py the layer through cuDNN; layer.py the flax module that runs whichever `select`
picks.

Names: `gate_activation` is the gates' function ("sigmoid" or Keras 1's "hard_sigmoid")
everywhere, C++ included; a name ending in `_t` is a value at time t, one ending in `_fm` an
array in feature-major layout, [features, time, batch].
"""

from jaxchar.lstm.backends import BackendError, Choice, select
from jaxchar.lstm.cells import GRUCell, LSTMCell, gate, matmul
from jaxchar.lstm.layer import LayerSpec, LSTMLayer

__all__ = [
    "BackendError",
    "Choice",
    "GRUCell",
    "LSTMCell",
    "LSTMLayer",
    "LayerSpec",
    "gate",
    "matmul",
    "select",
]
