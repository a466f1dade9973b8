"""Plain numpy references the tests compare the JAX code against."""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def hard_sigmoid(x):
    """Keras 1's piecewise-linear gate."""
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def lstm_forward(params, cfg, ids):
    """Logits [batch, time, vocab] by a Python loop over timesteps and layers (no dropout)."""
    p = {k: v for k, v in params.items()}
    ids = np.asarray(ids)
    if cfg.encoding == "scaled":
        x = (ids.astype(np.float64) / cfg.vocab_size)[..., None]
    elif cfg.encoding == "onehot":
        x = np.eye(cfg.vocab_size)[ids]
    else:
        x = np.asarray(p["embed"]["embedding"], np.float64)[ids]
    batch, time = ids.shape
    gate = hard_sigmoid if cfg.gate_activation == "hard_sigmoid" else sigmoid
    for layer in range(cfg.layers):
        lp = p[f"lstm_{layer}"]
        w_in = np.asarray(lp["input_kernel"], np.float64)
        w_h = np.asarray(lp["cell"]["recurrent_kernel"], np.float64)
        b = np.asarray(lp["bias"], np.float64)
        h = np.zeros((batch, cfg.hidden))
        c = np.zeros((batch, cfg.hidden))
        outs = []
        for t in range(time):
            if cfg.cell == "gru":  # Keras' GRU with reset_after
                xz, xr, xn = np.split(x[:, t] @ w_in + b, 3, axis=-1)
                hh = h @ w_h + np.asarray(lp["cell"]["recurrent_bias"], np.float64)
                rz, rr, rn = np.split(hh, 3, axis=-1)
                z, r = gate(xz + rz), gate(xr + rr)
                h = z * h + (1 - z) * np.tanh(xn + r * rn)
            else:
                i, f, g, o = np.split(x[:, t] @ w_in + h @ w_h + b, 4, axis=-1)
                c = gate(f) * c + gate(i) * np.tanh(g)
                h = gate(o) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    head = p["head"]
    return x @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
