"""The README's Python examples run as written, against a run with the default (`fast`)
config's shapes trained for a few steps: the model users get, on its default backends."""

import re
from pathlib import Path

from conftest import DATA, REPO

from jaxchar.config import load_config


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(REPO)
    # the block that trains runs first (with a few steps), then the others use its run
    (train,) = [b for b in blocks if "jaxchar.train_run(" in b]
    uses = [b for b in blocks if b is not train]
    few_steps = (
        "\nimport dataclasses\ncfg = dataclasses.replace(cfg, train=dataclasses.replace("
        "cfg.train, max_steps=3, batch_size=8, steps_per_call=1, sample_chars=0), "
        "sample=dataclasses.replace(cfg.sample, length=60))\n"
    )
    assert 'load_config("fast")\n' in train
    (tmp_path / "held_out.txt").write_text((DATA / "wonderland.txt").read_text()[100000:105000])
    run = str(tmp_path / "alice")
    train = (
        train.replace('load_config("fast")\n', 'load_config("fast")' + few_steps)
        .replace("runs/alice", run)
        .replace("held_out.txt", str(tmp_path / "held_out.txt"))
    )
    namespace: dict = {}
    exec(compile(train, "README-train", "exec"), namespace)
    assert (Path(run) / "run.json").is_file() and namespace["done"].best_step == 3
    assert len(namespace["texts"]) == 4 and all(len(t) == 200 for t in namespace["texts"])
    out = capsys.readouterr().out
    assert "Total Characters" in out  # log=print shows the events
    namespace = {}
    for i, block in enumerate(uses):
        exec(compile(block.replace("runs/alice", run), f"README-{i}", "exec"), namespace)
    assert namespace["ids"].shape[0] == 8  # the last example: 8 continuations in a user's jit
    shipped = load_config("fast").model  # the run's model is the default config's
    assert (namespace["cfg"].model.hidden, namespace["cfg"].model.layers) == (
        shipped.hidden,
        shipped.layers,
    )
