"""The layering of the packages: no import cycle between modules or between stages, and nothing in
keyface_jax imports data_pipelines (`python -m keyface_jax.testing.import_graph` prints the graph).
The rules are checked on the real tree and shown to fire on small trees that break them."""

import os

from keyface_jax.testing import import_graph


def test_the_repository_keeps_its_layering():
    assert import_graph.violations() == []


def _tree(tmp_path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in import_graph.PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return str(tmp_path)


def test_each_rule_fires(tmp_path):
    root = _tree(tmp_path, {
        "keyface_jax/a.py": "from keyface_jax import b\n",
        "keyface_jax/b.py": "def f():\n    from keyface_jax.a import g\n",       # lazy: counts
        "keyface_jax/data/__init__.py": "",
        "keyface_jax/data/reader.py": "import data_pipelines.writer\n",
        "keyface_jax/training/__init__.py": "",
        "keyface_jax/training/loop.py": "from keyface_jax.data import reader\n",
        "keyface_jax/data/batches.py": "from ..training.loop import x\n",          # relative
        "data_pipelines/writer.py": "from keyface_jax.data.reader import read\n",
    })
    problems = import_graph.violations(root)
    assert "module import cycle: keyface_jax.a → keyface_jax.b" in problems
    stage_cycles = [p for p in problems if p.startswith("stage import cycle")]
    assert any("keyface_jax.data → keyface_jax.training" in p for p in stage_cycles)
    assert any("data_pipelines → keyface_jax.data" in p for p in stage_cycles)
    assert any(p.startswith("keyface_jax.data.reader imports data_pipelines.writer") for p in problems)
    os.remove(os.path.join(root, "keyface_jax", "b.py"))
    assert not any("keyface_jax.a" in p for p in import_graph.violations(root))
