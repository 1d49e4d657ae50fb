"""The README's Python snippets run as written, in order, in one namespace (on the committed checkpoints)."""

import re

from conftest import ROOT, needs_data


@needs_data
def test_readme_python_snippets_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("num_samples=16", "num_samples=4").replace("torch.randn(16,", "torch.randn(4,"),
                     "README.md", "exec"), namespace)
    assert namespace["out"].masks.shape == (1, 4, 64, 64)
    steps = namespace["pipe"].config.default_num_inference_steps
    assert len(capsys.readouterr().out.splitlines()) == steps  # the step callback printed once per step
