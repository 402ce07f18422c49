"""The README's library examples run as written, and do what they say."""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(first: str, last: str) -> list[str]:
    """The ```python blocks from the heading `first` up to the heading `last`."""
    text = README.read_text()
    section = text[text.index(first) : text.index(last)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.heavy
def test_library_use_and_bring_your_own_model_examples_run():
    blocks = python_blocks("## Library use", "### Budgets")
    assert len(blocks) == 6
    ns: dict = {}
    for block in blocks:
        if "import transformers" in block and importlib.util.find_spec("transformers") is None:
            continue  # transformers' Flax models: run where transformers is installed
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102
        if "import transformers" in block:
            vit_eval, _ = ns["vit_model"].apply(ns["vit_params"], ns["vit_state"], ns["pixels"])
            np.testing.assert_allclose(ns["same"], vit_eval["model"], rtol=1e-4, atol=1e-4)
            assert ns["logits"]["model"].shape == (8, 2)
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


def test_the_mixed_precision_example_computes_in_bf16_on_float32_params():
    (block,) = python_blocks("## Mixed precision", "## Several devices and hosts")
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)  # noqa: S102
    logits = ns["logits"]["model"]
    assert logits.shape == (8, 10) and logits.dtype == jnp.bfloat16
    assert [layer.path for layer in ns["model"].plan.layers] == ["Dense_0.kernel", "Dense_1.kernel"]
    for tree in (ns["params"], ns["dense"]):
        assert {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)} == {"float32"}
    plain = ns["MLP"]().apply({"params": ns["dense"]}, ns["features"])  # float32 throughout
    scale = float(np.abs(plain).max())
    np.testing.assert_allclose(logits.astype(np.float32), plain, atol=0.03 * scale)


def test_the_search_in_your_own_training_loop_runs():
    setup = python_blocks("## Library use", "## Bring your own model")[0]
    (block,) = python_blocks(
        "### The search in your own training loop", "## Ensembles and anytime prediction"
    )
    ns: dict = {}
    exec(compile(setup.split("model = archs.create")[0], str(README), "exec"), ns)  # noqa: S102
    exec(compile(block, str(README), "exec"), ns)  # noqa: S102
    searcher, result, final = ns["searcher"], ns["result"], ns["final"]
    assert float(ns["value"]) < 2.3  # the plain loop trained: below chance's log(10)
    layer_ids = {layer.id for layer in searcher.plan.layers}
    assert {i for c in result.clusters for i in c.layers} == layer_ids
    assert set(ns["grads"]) == layer_ids
    assert final.plan.clusters == result.clusters
    assert (
        final.plan.spent
        <= final.plan.budget_params
        == ns["budget"].resolve(sum(layer.size for layer in searcher.plan.layers))
    )
    assert result.tried[-1].taken and all(not c.taken for c in result.tried[:-1])
    assert set(ns["final_params"]) == {"bank", "unshared"}
