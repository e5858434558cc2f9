import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidiff.models.clip import CLIPTextModel, causal_attention_mask

TINY = dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, bos_token_id=98, eos_token_id=99, pad_token_id=0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CLIPTextModel(**TINY).eval()


def ids_with_eos(length=10):
    ids = torch.randint(1, 98, (2, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 98
    ids[0, 4] = 99
    ids[1, length - 1] = 99
    return ids


def test_output_access(model):
    ids = ids_with_eos()
    out = model(ids, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 10, 8) and out.pooler_output.shape == (2, 8)
    assert out["last_hidden_state"] is out.last_hidden_state is out[0]
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    torch.testing.assert_close(model.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)
    assert model.text_model.final_layer_norm is model.final_layer_norm  # diffusers' clip_skip path
    assert not any(name.startswith("text_model") for name in model.state_dict())
    as_tuple = model(ids, return_dict=False)
    assert len(as_tuple) == 2  # hidden_states left out when not asked for
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)


def test_pooling_takes_first_eos_or_legacy_argmax(model):
    ids = ids_with_eos()
    ids[0, 7] = 99  # a second eos (padding with eos, SD1 style): the first one counts
    out = model(ids)
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, 4])
    torch.testing.assert_close(out.pooler_output[1], out.last_hidden_state[1, 9])
    legacy = CLIPTextModel(**{**TINY, "eos_token_id": 2})
    legacy_ids = torch.tensor([[0, 5, 90, 3, 2]])
    legacy_out = legacy(legacy_ids)
    torch.testing.assert_close(legacy_out.pooler_output[0], legacy_out.last_hidden_state[0, 2])  # the largest id


def test_causal_and_padding_masks(model):
    ids = ids_with_eos()
    changed = ids.clone()
    changed[:, 6:] = 7
    before, after = model(ids).last_hidden_state, model(changed).last_hidden_state
    torch.testing.assert_close(before[:, :6], after[:, :6])  # no position sees the future
    assert not torch.allclose(before[:, 6:], after[:, 6:])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, 3] = 0
    changed = ids.clone()
    changed[:, 3] = 5
    masked_before, masked_after = model(ids, mask).last_hidden_state, model(changed, mask).last_hidden_state
    keep = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    torch.testing.assert_close(masked_before[:, keep], masked_after[:, keep])  # a padded key is invisible


def test_causal_attention_mask_values():
    mask = causal_attention_mask(torch.tensor([[1, 1, 0]]), 3, torch.float32, torch.device("cpu"))
    low = torch.finfo(torch.float32).min
    expected = torch.tensor([[0, low, low], [0, 0, low], [0, 0, low]])
    assert mask.shape == (1, 1, 3, 3)
    torch.testing.assert_close(mask[0, 0], expected)


def test_attention_backends_agree(model):
    ids = ids_with_eos()
    reference = model(ids).last_hidden_state
    for backend in ("math", "chunked", None):
        model.set_attention_backend(backend)
        torch.testing.assert_close(model(ids).last_hidden_state, reference, atol=1e-6, rtol=1e-5)
    model.enable_attention_slicing(3)
    assert model.encoder.layers[1].self_attn.chunk_size == 3
    torch.testing.assert_close(model(ids).last_hidden_state, reference, atol=1e-6, rtol=1e-5)
    model.disable_attention_slicing()
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash3'; registered backends: \[.*'math'"):
        model.set_attention_backend("flash3")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(hidden_act="relu"), ValueError, "hidden_act='relu' is not supported; accepted values: 'quick_gelu', 'gelu'"),
    (dict(hidden_size=9), ValueError, "hidden_size=9 is not divisible by num_attention_heads=2"),
    (dict(attention_dropout=0.1), ValueError, "attention_dropout=0.1 is not supported"),
    (dict(eos_token_id=[2, 3]), TypeError, r"eos_token_id=\[2, 3\] has the wrong type list; expected int"),
    (dict(hidden_dim=8), ValueError, r"unknown config option\(s\) \['hidden_dim'\]"),
])
def test_bad_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        CLIPTextModel(**{**TINY, **kwargs})


@pytest.mark.parametrize("make_input, message", [
    (lambda ids: ids[0], r"input_ids must be an integer tensor of shape \(batch, sequence\), got torch.int64 tensor"),
    (lambda ids: ids.float(), r"input_ids must be an integer tensor .* got torch.float32"),
    (lambda ids: torch.cat([ids, ids], 1), "input_ids has 20 tokens; max_position_embeddings is 12"),
    (lambda ids: ids + 50, r"token ids in \[\d+, \d+\]; vocab_size is 100"),
])
def test_bad_input_ids(model, make_input, message):
    with pytest.raises(ValueError, match=message):
        model(make_input(ids_with_eos()))


def test_bad_attention_mask_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 9\); expected the input_ids shape \(2, 10\)"):
        model(ids_with_eos(), attention_mask=torch.ones(2, 9))


def test_round_trip_writes_transformers_folder(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip_text_model" and config["architectures"] == ["CLIPTextModel"]
    assert not any(key.startswith("_") for key in config)
    assert "embeddings.position_ids" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = ids_with_eos()
    torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)
    half = CLIPTextModel.from_pretrained(tmp_path, torch_dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half(ids).last_hidden_state.dtype == torch.bfloat16


def test_transformers_4_config_keys_are_ignored(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(_name_or_path="openai/clip-vit-large-patch14", torch_dtype="float32", dropout=0.0,
                  id2label={"0": "LABEL_0"}, transformers_version="4.25.0.dev0")
    (tmp_path / "config.json").write_text(json.dumps(config))
    CLIPTextModel.from_pretrained(tmp_path)
    config["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config field\(s\) \['num_layers'\] that CLIPTextModel does not know"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["text_projection.weight"] = torch.zeros(8, 8)
    del weights["final_layer_norm.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing key\(s\): final_layer_norm.bias; "
                                         r"1 unexpected key\(s\): text_projection.weight"):
        CLIPTextModel.from_pretrained(tmp_path)


def test_prefixed_keys_load(model):
    state = {f"text_model.{key}": value for key, value in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    other = CLIPTextModel(**TINY).load_weights(state)
    ids = ids_with_eos()
    torch.testing.assert_close(other(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)


def test_positional_config_gives_the_keyword_model(model):
    """transformers' form ``CLIPTextModel(config)`` (a config object or mapping) builds what the keywords build."""
    from minidiff import CLIPTextConfig
    config = CLIPTextConfig(**TINY)
    for form in (config, dict(TINY)):
        torch.manual_seed(0)
        assert CLIPTextModel(form).config == model.config
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(CLIPTextModel(config).state_dict().values(),
                                                 model.state_dict().values()))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((dict(TINY),), dict(hidden_size=4), TypeError, r"CLIPTextModel\(config\) takes no other arguments, got "
                                                    r"\['hidden_size'\]"),
    ((42,), {}, TypeError, r"config must be a CLIPTextConfig \(minidiff's or transformers'\) or a mapping, got int"),
    ((dict(TINY, hidden_layers=3),), {}, ValueError, r"CLIPTextModel\(config\) has config field\(s\) "
                                                     r"\['hidden_layers'\] that CLIPTextModel does not know"),
    ((dict(TINY, eos_token_id=100),), {}, ValueError, r"CLIPTextModel\(config\): eos_token_id=100 is invalid"),
])
def test_bad_positional_configs_are_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        CLIPTextModel(*args, **kwargs)
