"""The "Use it in your model" example in the docs runs as written."""
import os
import re
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    # The section lives in docs_use_it.md until it is spliced into README.md.
    for name in ("docs_use_it.md", "README.md"):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            text = open(path).read()
            if "## Use it in your model" in text:
                section = text.split("## Use it in your model", 1)[1]
                return re.search(r"```python\n(.*?)```", section, re.S).group(1)
    pytest.skip("no 'Use it in your model' section found")


def test_use_it_in_your_model_example_runs():
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_example(), "docs_use_it.md", "exec"), scope)
    import moka_ext

    assert scope["loss"].item() > 0
    assert not any(isinstance(m, moka_ext.MoKALinear) for m in scope["plain"].modules())
    assert sorted(os.listdir(scope["out_dir"])) == ["adapter_config.json", "adapter_model.safetensors"]
