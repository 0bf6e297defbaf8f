"""README's "Your own model" examples run as written (so they cannot rot), and say
what they claim: the ViT's exact engine is Taylor mode and the maps are finite."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_your_own_model_examples_run():
    blocks = _blocks("Your own model")
    assert len(blocks) == 2
    scope: dict = {}
    exec(blocks[0], scope)  # linen residual CNN
    ex = scope["ex"]
    assert ex.method == "gradcam++" and ex.layer == "conv_b"
    assert ex.derivatives == "exact/factored" and np.all(np.asarray(ex.finite))
    assert "conv_b" in scope["model"].layers and scope["model"].num_classes == 4
    exec(blocks[1], scope)  # NNX ViT, same scope (x, jax, jnp, jaxcam)
    ex = scope["ex"]
    assert ex.derivatives == "exact/taylor" and ex.raw.shape == (2, 4, 4)
    assert np.all(np.asarray(ex.finite)) and not np.any(np.asarray(ex.degenerate))
