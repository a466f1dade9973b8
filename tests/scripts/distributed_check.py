"""Run in a subprocess with JAX_NUM_CPU_DEVICES=4 by test_distributed.py; prints JSON."""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxchar.checkpoint import RunDir
from jaxchar.config import Config, override
from jaxchar.corpus import prepare
from jaxchar.distributed import DATA_AXIS, DistributedError, make_mesh
from jaxchar.model import apply, init_params
from jaxchar.train import fit, with_vocab

with open(sys.argv[1]) as f:
    text = f.read()[:20000]
cfg = override(
    Config(),
    [
        "model.hidden=16",
        "model.encoding=embed",
        "model.embed_dim=8",
        "data.seq_length=16",
        "train.batch_size=8",
        "train.max_steps=8",
        "train.save_every_steps=2",
        "train.steps_per_call=2",
        "model.dropout=0.1",
    ],
)
corpus = prepare(text, cfg.data)
cfg = with_vocab(cfg, len(corpus.vocab))
one = fit(cfg, corpus.train_ids)
four = fit(cfg, corpus.train_ids, mesh=make_mesh(4))
out = {
    "devices": jax.device_count(),
    "one": [h["train_loss"] for h in one.history],
    "four": [h["train_loss"] for h in four.history],
    "sharding": str(jax.tree.leaves(four.state.params)[0].sharding),
}
# checkpoint on 4 devices, resume on 1 (and the other way round)
d = tempfile.mkdtemp()
half = override(cfg, ["train.max_steps=4"])
for name, first, second in (("4to1", make_mesh(4), None), ("1to4", None, make_mesh(4))):
    run = RunDir.create(f"{d}/{name}", cfg, corpus.vocab)
    fit(half, corpus.train_ids, checkpointer=run, mesh=first)
    run.close()
    run = RunDir.open(f"{d}/{name}")
    res = fit(cfg, corpus.train_ids, checkpointer=run, mesh=second)
    run.close()
    out[name] = [h["train_loss"] for h in res.history]
    out[name + "_maxdiff"] = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(
            jax.tree.leaves(res.state.params), jax.tree.leaves(one.state.params), strict=True
        )
    )
fsdp = fit(override(cfg, ["train.shard_params=true"]), corpus.train_ids, mesh=make_mesh(4))
out["fsdp"] = [h["train_loss"] for h in fsdp.history]
kernel = fsdp.state.params["lstm_0"]["cell"]["recurrent_kernel"]
out["fsdp_sharding"] = str(kernel.sharding.spec)
out["fsdp_shard_rows"] = kernel.addressable_shards[0].data.shape[0]
try:
    fit(override(cfg, ["train.batch_size=6"]), corpus.train_ids, mesh=make_mesh(4))
except DistributedError as e:
    out["error"] = str(e)
# hidden 64: the layers run jaxchar's C++ kernels, each device on its own rows of the batch
wide = override(cfg, ["model.hidden=64", "model.encoding=scaled", "model.layers=2"])
out["kernel_one"] = [h["train_loss"] for h in fit(wide, corpus.train_ids).history]
for name, sets in (("kernel_four", []), ("kernel_fsdp", ["train.shard_params=true"])):
    res = fit(override(wide, sets), corpus.train_ids, mesh=make_mesh(4))
    out[name] = [h["train_loss"] for h in res.history]
mesh = make_mesh(4)
params = init_params(wide.model, jax.random.PRNGKey(0))
ids = jax.device_put(np.zeros((8, 16), np.int32), NamedSharding(mesh, P(DATA_AXIS)))


def loss(p, ids):  # training: the lower layer also writes its outputs as [H, T, B]
    return jnp.mean(apply(p, wide.model, ids, train=True, key=jax.random.PRNGKey(1))[0] ** 2)


hlo = jax.jit(jax.grad(loss)).lower(params, ids).compile().as_text()
calls = [line for line in hlo.splitlines() if 'custom_call_target="jaxchar_lstm' in line]
out["kernel_calls"] = len(calls)
out["kernel_call_shapes"] = sorted(
    {line.split("custom-call(")[0].split("=", 1)[1] for line in calls}
)
out["kernel_all_gathers"] = hlo.count("all-gather(")
print(json.dumps(out))
