"""Fuzz the config of each model class (hypothesis): values of the wrong type, sign or size, missing and extra keys.

The only acceptable outcomes: a model that builds and whose forward pass on a tiny input is finite, or a ValueError /
TypeError whose message names a key that was changed (through a folder: names the folder or its config.json).
Values are bounded (channels <= 64, layers <= 3) so no example allocates more than a few MB.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, UNet2DModel
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

TINY = {
    UNet2DModel: dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, sample_size=8,
                      down_block_types=["DownBlock2D", "AttnDownBlock2D"], attention_head_dim=4,
                      up_block_types=["AttnUpBlock2D", "UpBlock2D"], in_channels=3, out_channels=3),
    UNet2DConditionModel: dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, sample_size=8,
                               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], in_channels=4, out_channels=4,
                               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8,
                               attention_head_dim=2),
    AutoencoderKL: dict(block_out_channels=[4, 8], norm_num_groups=2, latent_channels=2, sample_size=16,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        in_channels=3, out_channels=3, layers_per_block=1),
    CLIPTextModel: dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=12, bos_token_id=98, eos_token_id=99, pad_token_id=0),
}
# keys whose default builds a large model (SD-sized channels, a 49408-token vocabulary): never deleted
LARGE_DEFAULTS = {"block_out_channels", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"}
# keys that multiply compute or activation size: drawn small
SMALL_KEYS = ("layers", "padding", "kernel")

NAMES = ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D",
         "DownEncoderBlock2D", "UpDecoderBlock2D", "silu", "gelu", "fourier", "scale_shift", "32,64", ""]


def values_for(key: str, current) -> st.SearchStrategy:
    """Four draws in five keep the type of ``current`` (signs, zero, sizes, lengths); the others are anything."""
    small = any(part in key for part in SMALL_KEYS)
    ints = st.one_of(st.integers(-2, 3 if small else 64), st.sampled_from([1, 2] if small else [2, 4, 8, 16, 32]))
    floats = st.one_of(st.floats(-4, 4), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e-12, 1e6]))
    names = st.sampled_from(NAMES)
    anything = st.one_of(ints, ints.map(float), floats, st.booleans(), st.none(), names, st.lists(ints, max_size=4),
                         st.lists(st.sampled_from(NAMES[:7]), min_size=1, max_size=4))
    if isinstance(current, bool):
        same = st.booleans()
    elif isinstance(current, int):
        same = ints
    elif isinstance(current, float):
        same = floats
    elif isinstance(current, str):
        same = names
    elif isinstance(current, (list, tuple)) and current and isinstance(current[0], str):
        same = st.lists(names, max_size=4)
    elif isinstance(current, (list, tuple)):
        same = st.lists(ints, max_size=4)
    else:
        same = anything
    return st.sampled_from(["same"] * 4 + ["anything"]).flatmap(lambda kind: same if kind == "same" else anything)


@st.composite
def mutated_config(draw, model_class) -> tuple[dict, set[str]]:
    """The tiny config of ``model_class`` with 1-3 changes; returns it and the keys changed."""
    config = json.loads(json.dumps(TINY[model_class]))
    defaults = model_class.config_class()
    keys = sorted(set(model_class.config_class.field_names()) | {"not_a_key"})
    changed = set()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        current = config.get(key, defaults.get(key))
        kind = draw(st.sampled_from(["set", "delete", "entry"]))
        if kind == "delete" and key in config and key not in LARGE_DEFAULTS:
            del config[key]
        elif kind == "entry" and isinstance(config.get(key), list) and config[key]:
            entry = draw(st.integers(0, len(config[key]) - 1))
            config[key][entry] = draw(values_for(key, config[key][entry]))
        else:
            config[key] = draw(values_for(key, current))
        changed.add(key)
    return config, changed


def run_tiny(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's outputs on a tiny valid input (sized for its number of levels)."""
    c, generator = model.config, torch.Generator().manual_seed(0)
    if isinstance(model, CLIPTextModel):
        length = min(5, c.max_position_embeddings)
        ids = torch.randint(0, c.vocab_size, (1, length), generator=generator)
        ids[0, -1] = c.eos_token_id
        return [model(ids).last_hidden_state]
    size = max(8, 2 ** len(c.block_out_channels))
    if isinstance(model, AutoencoderKL):
        images = torch.randn(1, c.in_channels, size, size, generator=generator)
        latents = torch.randn(1, c.latent_channels, 2, 2, generator=generator)
        return [model.encode(images).latent_dist.mean, model.decode(latents).sample]
    sample = torch.randn(1, c.in_channels, size, size, generator=generator)
    timestep = torch.tensor([0]) if c.time_embedding_type == "learned" else torch.tensor([0.5])
    kwargs = dict(class_labels=class_labels_for(model))
    if isinstance(model, UNet2DConditionModel):
        dims = [m.cross_attention_dim for m in model.attention_modules() if m.is_cross_attention]
        kwargs["encoder_hidden_states"] = torch.randn(1, 3, dims[0], generator=generator) if dims else None
    return [model(sample, timestep, **kwargs).sample]


def class_labels_for(model) -> torch.Tensor | None:
    c = model.config
    if model.class_embedding is None:
        return None
    if c.class_embed_type is None:
        return torch.tensor([0])
    if c.class_embed_type == "timestep":
        return torch.tensor([1.0])
    if c.class_embed_type == "identity":
        return torch.zeros(1, model.time_embedding.linear_2.out_features)
    return torch.zeros(1, c.projection_class_embeddings_input_dim)


def check_outcome(model_class, config: dict, changed: set[str]) -> None:
    torch.manual_seed(0)
    try:
        model = model_class(**config).eval()
    except (ValueError, TypeError) as error:
        assert any(key in str(error) for key in changed), f"{error} names none of {sorted(changed)}"
        assert "\n" not in str(error)
        return
    with torch.no_grad():
        outputs = run_tiny(model)
    assert all(torch.isfinite(output).all() for output in outputs), f"non-finite output for {config}"


FUZZ = settings(max_examples=30, deadline=None)


@pytest.mark.parametrize("model_class", list(TINY), ids=lambda cls: cls.__name__)
def test_config_fuzz(model_class):
    @FUZZ
    @given(mutated_config(model_class))
    def fuzz(drawn):
        check_outcome(model_class, *drawn)

    fuzz()


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    folders = {}
    for model_class, config in TINY.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(model_class.__name__)
        model_class(**config).save_pretrained(folder)
        folders[model_class] = folder
    return folders


@pytest.mark.parametrize("model_class", list(TINY), ids=lambda cls: cls.__name__)
def test_config_fuzz_through_folder(model_class, saved_folders):
    """A saved tiny model whose config.json is then damaged: it loads and runs, or the error names the folder."""
    folder = saved_folders[model_class]
    original = json.loads((folder / "config.json").read_text())

    @settings(max_examples=6, deadline=None)
    @given(mutated_config(model_class))
    def fuzz(drawn):
        config, _ = drawn
        (folder / "config.json").write_text(json.dumps({**{k: v for k, v in original.items() if k.startswith("_")},
                                                        **config}))
        try:
            model = model_class.from_pretrained(folder)
        except (ValueError, TypeError) as error:
            assert str(folder) in str(error) and "\n" not in str(error)
            return
        with torch.no_grad():
            assert all(torch.isfinite(output).all() for output in run_tiny(model))

    fuzz()
