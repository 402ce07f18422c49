"""The README's library examples run as written, and do what they say."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(first: str, last: str) -> list[str]:
    """The ```python blocks from the heading `first` up to the heading `last`."""
    text = README.read_text()
    section = text[text.index(first) : text.index(last)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_library_use_and_bring_your_own_model_examples_run():
    blocks = python_blocks("## Library use", "### Budgets")
    assert len(blocks) == 5
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102
        model = ns.get("model")
        if "class ResNet(" in block:
            eval_logits, _ = model.apply(ns["params"], ns["state"], ns["images"])
            np.testing.assert_allclose(ns["plain"], eval_logits["model"], rtol=1e-5, atol=1e-5)
        if "class TextClassifier(" in block:
            assert ns["logits"]["model"].shape == (8, 2)
            assert "model:classifier.kernel [64x2]" in model.report()
        if "class Scanned(" in block:
            assert ns["stacked"][:3] == [
                "model:blocks.Dense_1.kernel[0]",
                "model:blocks.Dense_0.kernel[0]",
                "model:blocks.Dense_1.kernel[1]",
            ]
            assert len(ns["stacked"]) == 16
        if "Member(" in block:
            assert [layer.path for layer in model.plan.layers] == ["conv"]
    assert ns["dense"]["head"]["kernel"].shape[-1] == 10  # the first example's export
