"""A run as one object: reading a trained run (`Run`, in reading.py: generate, evaluate,
export, what `serve` loads) and training one (`train_run` and its hooks, in training.py).

    import jaxchar
    jaxchar.train_run("alice.txt", "runs/alice", jaxchar.load_config("fast"))
    run = jaxchar.Run.open("runs/alice")
    print(run.generate("alice was ", seed=0))       # the text `jaxchar generate` prints
    print(run.evaluate("other.txt").loss)            # nats/char

This is the layer above the pure modules: it reads and writes run directories and corpora,
and nothing below imports it.
"""

from jaxchar.run.reading import Evaluation, Run
from jaxchar.run.training import train_run

__all__ = ["Evaluation", "Run", "train_run"]
