"""ΔCE splicing from the edited layer on (saes/splice.py `from_layer`): the same logits as a
full forward with the edit hooked in, for every tiny architecture."""
import pytest
import torch

from saeflow.lm.corpora import Corpus
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.saes.splice import edited_output, from_layer


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2", "qwen2"])
def test_from_layer_equals_the_hooked_full_forward(tiny_models, family):
    model = tiny_models[family]
    b = next(Corpus.from_spec("wiki", seed=0).token_batches(model.tokenizer, 2, 24))
    ids, am = b.input_ids.to(model.device), b.attention_mask.to(model.device)

    def edit(act):  # any change of the residual: scaled, and one direction added
        return act * 0.7 + torch.linspace(-1, 1, act.shape[-1], device=act.device)

    for L in range(model.n_layers):
        outs = {}
        h = model.hook_module("resid_post", L).register_forward_hook(
            lambda m, a, o: outs.__setitem__("clean", o))
        with torch.inference_mode():
            model.hf(input_ids=ids, attention_mask=am)
            h.remove()
            with Hooks(model, edits={HookPoint("resid_post", L): edit}):
                full = model.hf(input_ids=ids, attention_mask=am).logits
            with from_layer(model, L, edited_output(outs["clean"], edit)):
                fast = model.hf(input_ids=ids, attention_mask=am).logits
            again = model.hf(input_ids=ids, attention_mask=am).logits  # layers restored
        assert torch.allclose(fast, full, atol=1e-5, rtol=1e-5), (family, L)
        assert not torch.allclose(again, full, atol=1e-3), (family, L)
