"""The README's Python examples run as written, against a run with the default (`fast`)
config's shapes trained for a few steps: the model users get, on its default backends."""

import re
from pathlib import Path

from conftest import DATA, REPO


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(REPO)
    # train first (the last block), then run the others against that run
    train, uses = blocks[-1], blocks[:-1]
    few_steps = (
        "\nimport dataclasses\ncfg = dataclasses.replace(cfg, train=dataclasses.replace("
        "cfg.train, max_steps=3, batch_size=8, steps_per_call=1, sample_chars=0))\n"
    )
    assert 'load_config("configs/fast.toml")\n' in train
    train = (
        train.replace(
            'load_config("configs/fast.toml")\n', 'load_config("configs/fast.toml")' + few_steps
        )
        .replace("../shared/data/wonderland.txt", str(DATA / "wonderland.txt"))
        .replace("runs/mine", str(tmp_path / "mine"))
    )
    namespace: dict = {}
    exec(compile("import jaxchar\n" + train, "README-train", "exec"), namespace)
    assert (Path(tmp_path) / "mine" / "run.json").is_file()
    namespace = {}
    for i, block in enumerate(uses):
        exec(
            compile(block.replace("runs/alice", str(tmp_path / "mine")), f"README-{i}", "exec"),
            namespace,
        )
    assert namespace["ids"].shape[0] == 8  # the last example: 8 continuations in a user's jit
    assert namespace["cfg"].model.hidden == 256 and namespace["cfg"].model.layers == 2
