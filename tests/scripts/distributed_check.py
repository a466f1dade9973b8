"""Run in a subprocess with JAX_NUM_CPU_DEVICES=4 by test_distributed.py; prints JSON."""

import json
import sys
import tempfile

import jax
import numpy as np

from jaxchar.checkpoint import RunDir
from jaxchar.config import Config, override
from jaxchar.corpus import prepare
from jaxchar.distributed import DistributedError, make_mesh
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
print(json.dumps(out))
