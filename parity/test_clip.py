"""CLIPTextModel parity with transformers 5.23: seeded tiny towers saved with save_pretrained, loaded both ways."""

from __future__ import annotations

import diffusers
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.models.clip import CLIPTextModel
from parity.pipeline_fixtures import randomize_, save_reference_pipeline
from parity.report import compare

COMPONENT = "CLIPTextModel"
FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4

# diffusers' pipeline tests (tests/pipelines/stable_diffusion/test_stable_diffusion.py, get_dummy_components)
DIFFUSERS_TEST = dict(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, layer_norm_eps=1e-5,
                      num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000)
# SD1: OpenAI CLIP-L layout (quick_gelu, real vocabulary and special ids), narrow
SD1_LIKE = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=32)
# SD2: OpenCLIP-H layout (exact gelu, pad id 0, head dim 64 like ViT-H), narrow and shallow
SD2_LIKE = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=64)


def reference_model(config: dict, seed: int = 0) -> transformers.CLIPTextModel:
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    randomize_(model, seed, scale=0.1)
    return model.eval()


def reference_and_minidiff(config: dict, folder, seed: int = 0):
    reference = reference_model(config, seed)
    reference.save_pretrained(folder)
    return reference, CLIPTextModel.from_pretrained(folder)


def token_ids(config: dict, batch: int, length: int, seed: int) -> torch.Tensor:
    """Prompts as the tokenizer makes them: bos, words, eos, then padding (with eos for SD1, pad id for SD2)."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(3, config["vocab_size"] - 2, (batch, length), generator=generator)
    ids = torch.full((batch, length), config["pad_token_id"])
    for row in range(batch):
        n_words = int(torch.randint(0, length - 1, (1,), generator=generator))
        ids[row, 0] = config["bos_token_id"]
        ids[row, 1:1 + n_words] = words[row, :n_words]
        ids[row, 1 + n_words] = config["eos_token_id"]
    return ids


def compare_outputs(case: str, ours, theirs) -> None:
    compare(COMPONENT, f"{case}: last_hidden_state", ours.last_hidden_state, theirs.last_hidden_state, FORWARD_TOL)
    compare(COMPONENT, f"{case}: pooler_output", ours.pooler_output, theirs.pooler_output, FORWARD_TOL)
    if theirs.hidden_states is not None:
        assert len(ours.hidden_states) == len(theirs.hidden_states)
        for ours_h, theirs_h in zip(ours.hidden_states, theirs.hidden_states):
            compare(COMPONENT, f"{case}: hidden_states", ours_h, theirs_h, FORWARD_TOL)


def run_both(reference, ours, ids, attention_mask=None):
    with torch.no_grad():
        theirs_out = reference(ids, attention_mask=attention_mask, output_hidden_states=True)
        ours_out = ours(ids, attention_mask=attention_mask, output_hidden_states=True)
    return ours_out, theirs_out


@pytest.mark.parametrize("case, config", [("diffusers test config", DIFFUSERS_TEST), ("SD1-like", SD1_LIKE),
                                          ("SD2-like", SD2_LIKE)])
def test_forward(tmp_path, case, config):
    reference, ours = reference_and_minidiff(config, tmp_path)
    ids = token_ids(config, batch=3, length=77 if config is not DIFFUSERS_TEST else 16, seed=1)
    compare_outputs(case, *run_both(reference, ours, ids))


def test_attention_mask(tmp_path):
    reference, ours = reference_and_minidiff(SD1_LIKE, tmp_path)
    ids = token_ids(SD1_LIKE, batch=3, length=20, seed=2)
    attention_mask = torch.tensor([[1] * 20, [1] * 12 + [0] * 8, [1] * 3 + [0] * 17])
    compare_outputs("SD1-like, attention_mask", *run_both(reference, ours, ids, attention_mask))


@pytest.mark.parametrize("backend", ["math", "chunked"])
def test_attention_backends(tmp_path, backend):
    reference, ours = reference_and_minidiff(SD2_LIKE, tmp_path)
    if backend == "chunked":
        ours.enable_attention_slicing(5)  # 5 query rows per slice: the causal+padding mask is sliced too
    else:
        ours.set_attention_backend(backend)
    ids = token_ids(SD2_LIKE, batch=2, length=77, seed=3)
    attention_mask = (torch.arange(77) < torch.tensor([[77], [30]])).long()
    compare_outputs(f"SD2-like, attention_mask, {backend} backend", *run_both(reference, ours, ids, attention_mask))


def test_text_model_prefix_and_position_ids(tmp_path):
    """transformers 4.x files: ``text_model.``-prefixed keys, some with the position_ids buffer."""
    reference, _ = reference_and_minidiff(SD1_LIKE, tmp_path)
    state = {f"text_model.{key}": value for key, value in load_file(str(tmp_path / "model.safetensors")).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids = token_ids(SD1_LIKE, batch=2, length=77, seed=4)
    compare_outputs("SD1-like, text_model. prefixed file", *run_both(reference, ours, ids))


@pytest.mark.parametrize("model_class", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_positional_config_as_transformers_takes_it(model_class):
    """``CLIPTextModel(config)`` with transformers' own CLIPTextConfig object (diffusers' pipeline tests build the
    text encoder so) is the same model: transformers' state dict loads strictly and the outputs agree."""
    config = transformers.CLIPTextConfig(**{**DIFFUSERS_TEST, "projection_dim": 8})
    torch.manual_seed(0)
    reference = getattr(transformers, model_class)(config).eval()
    randomize_(reference, 0, scale=0.1)
    ours = getattr(minidiff, model_class)(config).eval()
    assert ours.config.hidden_size == config.hidden_size and ours.config.eos_token_id == config.eos_token_id
    ours.load_weights(reference.state_dict())
    ids = token_ids(DIFFUSERS_TEST, batch=2, length=16, seed=7)
    with torch.no_grad():
        theirs_out, ours_out = reference(ids), ours(ids)
    field = "text_embeds" if model_class == "CLIPTextModelWithProjection" else "pooler_output"
    compare(COMPONENT, f"{model_class}(transformers config): last_hidden_state", ours_out.last_hidden_state,
            theirs_out.last_hidden_state, FORWARD_TOL)
    compare(COMPONENT, f"{model_class}(transformers config): {field}", ours_out[field], theirs_out[field],
            FORWARD_TOL)
    assert isinstance(minidiff.CLIPTextModel(ours.config), minidiff.CLIPTextModel)  # minidiff's config object too


def test_gradients(tmp_path):
    reference, ours = reference_and_minidiff(SD1_LIKE, tmp_path)
    ids = token_ids(SD1_LIKE, batch=2, length=24, seed=5)
    attention_mask = (torch.arange(24) < torch.tensor([[24], [10]])).long()
    weights = torch.randn(2, 24, SD1_LIKE["hidden_size"], generator=torch.Generator().manual_seed(6))
    for model in (reference, ours):
        out = model(ids, attention_mask=attention_mask)
        ((out.last_hidden_state * weights).sum() + out.pooler_output.square().sum()).backward()
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        compare(COMPONENT, "SD1-like: parameter gradients", param.grad, theirs[name].grad, GRAD_TOL)


def test_minidiff_saved_folder_loads_in_transformers(tmp_path):
    torch.manual_seed(7)
    ours = CLIPTextModel(**SD2_LIKE)
    randomize_(ours, 7, scale=0.1)
    ours.eval().save_pretrained(tmp_path)
    reference, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), f"transformers reported loading problems: {info}"
    ids = token_ids(SD2_LIKE, batch=2, length=77, seed=8)
    compare_outputs("SD2-like, minidiff save -> transformers load", *run_both(reference.eval(), ours, ids))


@st.composite
def text_configs(draw):
    heads = draw(st.integers(1, 4))
    config = dict(
        vocab_size=draw(st.integers(16, 300)), hidden_size=heads * draw(st.integers(1, 12)),
        intermediate_size=draw(st.integers(1, 48)), num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads, max_position_embeddings=draw(st.integers(8, 40)),
        hidden_act=draw(st.sampled_from(["quick_gelu", "gelu"])),
        layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6])), pad_token_id=1, bos_token_id=0,
    )
    config["eos_token_id"] = draw(st.sampled_from([2, config["vocab_size"] - 1]))
    return config


@settings(max_examples=12, deadline=None)
@given(config=text_configs(), batch=st.integers(1, 3), data=st.data())
def test_hypothesis_configs(tmp_path_factory, config, batch, data):
    folder = tmp_path_factory.mktemp("clip")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    reference, ours = reference_and_minidiff(config, folder, seed)
    length = data.draw(st.integers(2, config["max_position_embeddings"]), label="length")
    ids = token_ids(config, batch, length, seed)
    # padding anywhere except the first token: every query then sees at least one key (see causal_attention_mask)
    keep = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.7
    keep[:, 0] = True
    use_mask = data.draw(st.booleans(), label="use attention_mask")
    compare_outputs("hypothesis configs", *run_both(reference, ours, ids, keep.long() if use_mask else None))


def test_drop_in_for_diffusers_pipeline_with_clip_skip(tmp_path):
    """minidiff's text encoder inside diffusers' StableDiffusionPipeline with clip_skip=1 (diffusers' own path calls
    ``text_encoder.text_model.final_layer_norm``, which transformers 5 lacks): the reference pipeline gets the same
    penultimate-layer embeddings computed by hand from the transformers encoder."""
    pipe, folder = save_reference_pipeline(tmp_path)
    ours = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    mixed = diffusers.StableDiffusionPipeline(**{**pipe.components, "text_encoder": ours})
    prompt = "a red cube on a table"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        penultimate = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        prompt_embeds = pipe.text_encoder.final_layer_norm(penultimate)
    options = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    expected = pipe(prompt_embeds=prompt_embeds, generator=torch.Generator().manual_seed(0), **options).images
    actual = mixed(prompt, clip_skip=1, generator=torch.Generator().manual_seed(0), **options).images
    compare(COMPONENT, "in diffusers StableDiffusionPipeline, clip_skip=1 (np)", actual, expected, 1e-4, metric="abs")
