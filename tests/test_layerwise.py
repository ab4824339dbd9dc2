"""Layer-wise calibration: captured inputs reproduce the model; statistics are the real ones."""

from __future__ import annotations

import pytest
import torch

from orstack.errors import BadInput
from orstack.io.checkpoint import load_model
from orstack.layerwise import (
    capture_layer_inputs,
    decoder_layers,
    linear_modules,
    record_input_stats,
    run_layer,
    weightless_model,
)


@pytest.fixture(scope="module")
def model(random_llama):
    torch.set_num_threads(1)
    m, _ = load_model(random_llama, with_tokenizer=False)
    return m


def test_layers_in_sequence_reproduce_the_model(model):
    ids = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(model, ids, batch_size=2)
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    assert inputs.n_samples == 5 and inputs.n_tokens == 5 * 24
    for layer in decoder_layers(model):
        inputs = run_layer(layer, inputs)
    hidden = torch.cat(inputs.hidden)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(hidden))
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_linear_modules_names(model):
    names = set(linear_modules(decoder_layers(model)[0]))
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} == names


def test_input_stats_match_the_inputs(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_layer_inputs(model, ids)
    layer = decoder_layers(model)[0]
    modules = linear_modules(layer)
    with record_input_stats(modules, hessian=True, keep_inputs=True) as stats:
        run_layer(layer, inputs)
    s = stats["mlp.down_proj"]
    x = s.stacked_inputs()
    assert x.shape == (3 * 16, model.config.intermediate_size) and s.count == 48
    torch.testing.assert_close(s.norm, x.norm(dim=0))
    torch.testing.assert_close(s.mean_abs, x.abs().mean(0))
    torch.testing.assert_close(s.hessian(), x.t() @ x / 48, rtol=1e-4, atol=1e-5)
    # hooks are removed on exit: another run records nothing more
    run_layer(layer, inputs)
    assert s.count == 48


def test_unsupported_architecture_is_bad_input():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(BadInput, match="unsupported architecture 'gpt2'"):
        decoder_layers(gpt2)


def test_weightless_model_has_the_shapes_and_no_data(model):
    import copy

    config = copy.deepcopy(model.config)
    config.quantization_config = {"quant_method": "compressed-tensors"}  # as a packed checkpoint's config
    skeleton = weightless_model(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {name: tuple(p.shape) for name, p in skeleton.named_parameters()} == shapes
    assert all(p.is_meta for p in skeleton.parameters())
    assert not hasattr(skeleton.config, "quantization_config")
    assert config.quantization_config == {"quant_method": "compressed-tensors"}  # the caller's config is kept


def test_each_layer_gets_its_own_keyword_arguments(family_checkpoint):
    """Gemma 3 gives sliding and full layers different rotary tables and masks: the inputs are
    recorded per layer, as the model passes them (layer 5 is the full-attention one)."""
    m, _ = load_model(family_checkpoint("gemma3_text"), with_tokenizer=False)
    ids = torch.randint(3, 290, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(m, ids)
    layers = decoder_layers(m)
    (first,), (last,) = inputs.kwargs_for(layers[0]), inputs.kwargs_for(layers[5])
    assert m.config.layer_types[0] == "sliding_attention" and m.config.layer_types[5] == "full_attention"
    assert not torch.equal(first["position_embeddings"][0], last["position_embeddings"][0])
    assert torch.equal(inputs.kwargs_for(layers[1])[0]["position_embeddings"][0], first["position_embeddings"][0])
    assert inputs.kwargs_for(None) is inputs.kwargs
