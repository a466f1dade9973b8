"""LSTMLayer: one LSTM (or GRU) layer as a flax module, run by the backend that
jaxchar.lstm.backends chose. Every backend keeps the same parameters under the same names
(input_kernel [in, 4H], bias [4H], cell/recurrent_kernel [H, 4H]), so checkpoints do not
depend on the backend that trained them.

Layouts: `scan` and `cudnn` are batch-major (inputs [batch, time(, features)], outputs
[batch, time, H]); `fused`, `native` and `pallas` are time-major ([time, batch, ...]), so
that stacked fused layers need no transposes between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxchar.lstm import cudnn
from jaxchar.lstm.backends import Choice
from jaxchar.lstm.cells import GRUCell, LSTMCell, forget_bias_init, matmul
from jaxchar.lstm.fused import Loop, lstm_layer


@dataclass(frozen=True)
class LayerSpec:
    """One recurrent layer: what it is and how it runs, passed down as one value."""

    hidden: int
    scalar_input: bool = False  # inputs are scalars per (batch, time), else feature vectors
    cell_type: str = "lstm"  # or "gru" (always the scan backend)
    gate_activation: str = "sigmoid"  # or "hard_sigmoid" (Keras 1)
    dtype: Any = jnp.float32  # the products' dtype (ModelConfig.product_dtype)
    unroll: int = 1
    choice: Choice = Choice("scan", "the reference")  # backends.select's
    # time-major backends: also return hs transposed, [H, time, batch], for the next layer
    with_hs_fm: bool = False

    @property
    def loop(self) -> Loop:
        """The fused layer's static settings (jaxchar.lstm.fused.Loop)."""
        return Loop(
            self.dtype, self.gate_activation, self.with_hs_fm, self.choice.kernel, self.unroll
        )


class _RecurrentKernel(nn.Module):
    """Holds the recurrent kernel under the same name as the scanned LSTMCell does, so
    that every backend shares one parameter tree (and checkpoints)."""

    hidden: int

    @nn.compact
    def __call__(self):
        shape = (self.hidden, 4 * self.hidden)
        return self.param("recurrent_kernel", nn.initializers.orthogonal(), shape)


class LSTMLayer(nn.Module):
    spec: LayerSpec

    @nn.compact
    def __call__(self, carry, inputs, mask=None, inputs_fm=None):
        """(c, h), [.., H] outputs, and with `with_hs_fm` on a time-major backend the outputs
        as [H, time, batch]; `inputs_fm` is a time-major backend's inputs as [F, time, batch]
        (see jaxchar.lstm.fused.lstm_layer), ignored elsewhere."""
        spec = self.spec
        lstm = spec.cell_type == "lstm"
        width = (4 if lstm else 3) * spec.hidden
        in_dim = 1 if spec.scalar_input else inputs.shape[-1]
        w_in = self.param("input_kernel", nn.initializers.glorot_uniform(), (in_dim, width))
        bias = self.param("bias", forget_bias_init if lstm else nn.initializers.zeros, (width,))
        if spec.choice.time_major:
            return self._fused(carry, inputs, inputs_fm, w_in, bias)
        if spec.choice.backend == "cudnn":
            return self._cudnn(carry, inputs, w_in, bias)
        scan = nn.scan(
            LSTMCell if lstm else GRUCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(1, 1, nn.broadcast, nn.broadcast),
            out_axes=1,
            unroll=spec.unroll,
        )
        cell = scan(spec.hidden, spec.dtype, spec.gate_activation, name="cell")
        if spec.scalar_input:
            return cell(carry, inputs, mask, w_in[0], bias)
        # one [batch*time, in] x [in, 4*hidden] product for all timesteps, outside the loop
        gx = matmul(inputs, w_in, spec.dtype)
        return cell(carry, gx + bias, mask, None, None)

    def _fused(self, carry, inputs, inputs_fm, w_in, bias):
        """Time-major: inputs [time, batch] or [time, batch, features] -> [time, batch, H]."""
        w_h = _RecurrentKernel(self.spec.hidden, name="cell")()
        c0, h0 = carry
        # the layer projects vector inputs itself (one product before its loop), so that
        # it can also write their weight gradient as one product
        w_x = w_in[0] if self.spec.scalar_input else w_in
        hs, c, h, *hs_fm = lstm_layer(w_h, inputs, c0, h0, w_x, bias, inputs_fm, self.spec.loop)
        return ((c, h), hs, *hs_fm)

    def _cudnn(self, carry, inputs, w_in, bias):
        """Batch-major, like the scan: inputs [batch, time] or [batch, time, features]."""
        w_h = _RecurrentKernel(self.spec.hidden, name="cell")()
        x = inputs[..., None] if self.spec.scalar_input else inputs
        hs, c, h = cudnn.lstm_layer(x, carry[0], carry[1], w_in, w_h, bias)
        return (c, h), hs
