"""The LoRA runtime and the pipeline LoRA API alone: side branch == fused == closed form, fuse/unfuse/unload round
trips, adapter weights and per-call scales, disabling, naming, bad input leaving the model untouched, dtypes,
saving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import minidiff
from minidiff.adapters import lora
from minidiff.adapters.lora import LoRALayer, add_lora_adapter, scaled_lora
from minidiff.adapters.lora_formats import LoRAWeights
from tests.tiny_components import run_tiny, tiny_pipeline
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: one thread, as the other test files)

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
TARGETS = {  # path -> (down shape, up shape): a Linear, a 1x1 conv (SD1 proj_in), a 3x3 conv (LoCon)
    f"{ATTN}.to_q": ((2, 16), (16, 2)),
    "down_blocks.1.attentions.0.proj_in": ((2, 16, 1, 1), (16, 2, 1, 1)),
    "down_blocks.0.resnets.0.conv1": ((3, 8, 3, 3), (8, 3, 1, 1)),
}
TE_Q = "encoder.layers.0.self_attn.q_proj"


def random_weights(seed: int, targets=TARGETS, alpha: float | None = 4.0) -> dict[str, LoRAWeights]:
    generator = torch.Generator().manual_seed(seed)
    return {path: LoRAWeights(torch.randn(down, generator=generator) * 0.3,
                              torch.randn(up, generator=generator) * 0.3, alpha)
            for path, (down, up) in targets.items()}


def tiny_unet() -> minidiff.UNet2DConditionModel:
    torch.manual_seed(0)
    return minidiff.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).eval()


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=generator), 10, torch.randn(2, 7, 16, generator=generator)


def run_unet(unet, **kwargs) -> torch.Tensor:
    sample, t, text = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, text, **kwargs).sample


def closed_form(weight: torch.Tensor, weights: LoRAWeights, scale: float) -> torch.Tensor:
    """W + scale * (alpha / r) * up @ down, written out for each kind of target."""
    rank = weights.down.shape[0]
    update = torch.einsum("or,ri...->oi...", weights.up.flatten(1), weights.down)  # (out, r) x (r, in, ...)
    return weight + scale * (weights.alpha / rank) * update


@pytest.fixture
def pipe():
    return tiny_pipeline(minidiff.StableDiffusionPipeline)


def te_lora_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"text_encoder.text_model.{TE_Q}.lora_A.weight": torch.randn(2, 16, generator=generator),
            f"text_encoder.text_model.{TE_Q}.lora_B.weight": torch.randn(16, 2, generator=generator)}


def unet_lora_dict(seed: int = 4) -> dict[str, torch.Tensor]:
    return {f"unet.{path}.lora_{ab}.weight": tensor for path, w in random_weights(seed).items()
            for ab, tensor in (("A", w.down), ("B", w.up))}


# ---------------------------------------------------------------------------------------------------------- maths

@pytest.mark.parametrize("path", list(TARGETS))
def test_side_branch_equals_fused_equals_closed_form(path):
    unet = tiny_unet()
    weights = random_weights(0, {path: TARGETS[path]})
    base_weight = unet.get_submodule(path).weight.detach().clone()
    add_lora_adapter(unet, "a", weights)
    unfused = run_unet(unet)
    lora.fuse_lora(unet, lora_scale=0.5)
    layer = unet.get_submodule(path)
    torch.testing.assert_close(layer.base_layer.weight, closed_form(base_weight, weights[path], 0.5), rtol=0, atol=1e-6)
    lora.unfuse_lora(unet)
    with scaled_lora(unet, 0.5):
        torch.testing.assert_close(run_unet(unet), _fused_output(unet, 0.5), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unfused, run_unet(unet, cross_attention_kwargs={"scale": 0.0}))


def _fused_output(unet, scale):
    lora.fuse_lora(unet, lora_scale=scale)
    out = run_unet(unet)
    lora.unfuse_lora(unet)
    return out


def test_fuse_unfuse_restores_weights_from_the_stored_delta():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    add_lora_adapter(unet, "a", random_weights(0))
    lora.fuse_lora(unet, lora_scale=0.7)
    lora.set_lora_adapters(unet, ["a"], [3.0])  # a recomputed delta would now differ: the stored one is subtracted
    lora.unfuse_lora(unet)
    lora.unload_lora(unet)
    after = unet.state_dict()
    assert list(after) == list(before)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)


def test_unload_gives_back_the_same_modules_and_bit_identical_outputs():
    unet = tiny_unet()
    base = run_unet(unet)
    originals = {path: unet.get_submodule(path) for path in TARGETS}
    add_lora_adapter(unet, "a", random_weights(0))
    add_lora_adapter(unet, "b", random_weights(1))
    assert all(isinstance(unet.get_submodule(path), LoRALayer) for path in TARGETS)
    assert not any(module.training for module in unet.modules())  # the adapters join in eval mode
    assert any(".base_layer." in key for key in unet.state_dict())
    lora.unload_lora(unet)
    assert all(unet.get_submodule(path) is module for path, module in originals.items())
    assert not any("base_layer" in key or "adapters" in key for key in unet.state_dict())
    assert torch.equal(run_unet(unet), base)


def test_scale_zero_and_weight_zero_are_the_base_model_exactly():
    unet = tiny_unet()
    base = run_unet(unet)
    add_lora_adapter(unet, "a", random_weights(0, {**TARGETS, "time_embedding.linear_1": ((2, 8), (32, 2))}))
    assert torch.equal(run_unet(unet, cross_attention_kwargs={"scale": 0.0}), base)
    lora.set_lora_adapters(unet, ["a"], [0.0])
    assert torch.equal(run_unet(unet), base)


def test_two_adapters_with_weights_add_their_deltas():
    path = f"{ATTN}.to_q"
    unet = tiny_unet()
    first, second = random_weights(0, {path: TARGETS[path]}), random_weights(1, {path: TARGETS[path]}, alpha=None)
    base_weight = unet.get_submodule(path).weight.detach().clone()
    add_lora_adapter(unet, "a", first)
    add_lora_adapter(unet, "b", second)
    lora.set_lora_adapters(unet, ["a", "b"], [0.5, -1.5])
    second[path].alpha = 2.0  # alpha None means alpha = rank (2)
    expected = closed_form(closed_form(base_weight, first[path], 0.5), second[path], -1.5)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    layer = unet.get_submodule(path)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, expected, layer.base_layer.bias),
                                   rtol=1e-5, atol=1e-6)
    lora.fuse_lora(unet)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)


def test_per_call_scale_multiplies_the_adapter_weight_and_skips_fused_adapters():
    unet = tiny_unet()
    add_lora_adapter(unet, "a", random_weights(0))
    lora.set_lora_adapters(unet, ["a"], [0.8])
    scaled = run_unet(unet, cross_attention_kwargs={"scale": 0.5})
    lora.set_lora_adapters(unet, ["a"], [0.4])
    torch.testing.assert_close(run_unet(unet), scaled, rtol=1e-6, atol=1e-7)
    lora.fuse_lora(unet)
    fused = run_unet(unet)
    assert torch.equal(run_unet(unet, cross_attention_kwargs={"scale": 0.0}), fused)


def test_scaled_lora_nests_and_restores():
    unet = tiny_unet()
    add_lora_adapter(unet, "a", random_weights(0))
    layer = unet.get_submodule(f"{ATTN}.to_q")
    with scaled_lora(unet, 0.5):
        with scaled_lora(unet, None):
            assert layer.call_scale == 0.5
        with scaled_lora(unet, 0.5):
            assert layer.call_scale == 0.25
        assert layer.call_scale == 0.5
    assert layer.call_scale == 1.0
    with pytest.raises(ValueError, match="finite number"):
        with scaled_lora(unet, float("nan")):
            pass


def test_disable_runs_the_base_model_and_unfuses_enable_brings_the_adapters_back():
    unet = tiny_unet()
    base = run_unet(unet)
    add_lora_adapter(unet, "a", random_weights(0))
    adapted = run_unet(unet)
    lora.fuse_lora(unet)
    lora.set_lora_enabled(unet, False)
    assert not lora.fused_lora_adapters(unet)
    torch.testing.assert_close(run_unet(unet), base, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="enable_lora"):
        lora.fuse_lora(unet)
    lora.set_lora_enabled(unet, True)
    torch.testing.assert_close(run_unet(unet), adapted, rtol=1e-5, atol=1e-6)


def test_the_last_loaded_adapter_is_the_only_active_one_and_delete_hands_over():
    unet = tiny_unet()
    add_lora_adapter(unet, "a", random_weights(0))
    add_lora_adapter(unet, "b", random_weights(1, {f"{ATTN}.to_q": TARGETS[f"{ATTN}.to_q"]}))
    assert lora.active_lora_adapters(unet) == ["b"] and lora.list_lora_adapters(unet) == ["a", "b"]
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv.active == ["b"] and list(conv.adapters) == ["a"]  # "a" is off there too, as in peft
    lora.delete_lora_adapters(unet, ["b"])
    assert lora.active_lora_adapters(unet) == ["a"]


# ---------------------------------------------------------------------------------------------------------- bad input

def assert_untouched(unet, keys, types):
    assert list(unet.state_dict()) == keys
    assert [type(m) for m in unet.modules()] == types


@pytest.mark.parametrize("change, message", [
    (lambda w: w.update({f"{ATTN}.to_k": LoRAWeights(torch.ones(2, 16), torch.ones(16, 3))}),
     rf"{ATTN}.to_k is Linear \(16 -> 16\): LoRA down must be \(r, 16\) and up \(16, r\).*got down \(2, 16\) and up "
     r"\(16, 3\)"),
    (lambda w: w.update({"down_blocks.0.resnets.0.conv2": LoRAWeights(torch.ones(2, 8, 1, 1), torch.ones(8, 2, 1, 1))}),
     r"conv2 is Conv2d \(8 -> 8, kernel \(3, 3\)\): LoRA down must be \(r, 8, 3, 3\)"),
    (lambda w: w.update({"down_blocks.0.resnets.0.norm1": LoRAWeights(torch.ones(2, 8), torch.ones(8, 2))}),
     "norm1 is a GroupNorm; LoRA adapts Linear and"),
    (lambda w: w.update({"down_blocks.9.to_q": LoRAWeights(torch.ones(2, 8), torch.ones(8, 2))}),
     "has no module 'down_blocks.9.to_q'"),
    (lambda w: w.update({f"{ATTN}.to_v": LoRAWeights(torch.full((2, 16), float("nan")), torch.ones(16, 2))}),
     "the down weight must be finite"),
    (lambda w: w.update({f"{ATTN}.to_v": LoRAWeights(torch.ones(2, 16), torch.ones(16, 2), alpha=-1.0)}),
     "alpha must be a positive number"),
])
def test_a_bad_adapter_is_refused_naming_module_and_shapes_and_nothing_changes(change, message):
    unet = tiny_unet()
    add_lora_adapter(unet, "a", random_weights(0))
    keys, types = list(unet.state_dict()), [type(m) for m in unet.modules()]
    weights = random_weights(1)
    change(weights)  # the bad entry comes last: everything before it was valid
    with pytest.raises(ValueError, match=message):
        add_lora_adapter(unet, "b", weights, "my.safetensors")
    assert_untouched(unet, keys, types)
    assert lora.list_lora_adapters(unet) == ["a"]


@pytest.mark.parametrize("name, message", [("a", "adapter name 'a' is already in use"), ("", "non-empty string"),
                                           ("x.y", "without '.'"), (3, "non-empty string")])
def test_adapter_names_in_use_or_malformed_are_refused(name, message):
    unet = tiny_unet()
    add_lora_adapter(unet, "a", random_weights(0))
    with pytest.raises(ValueError, match=message):
        add_lora_adapter(unet, name, random_weights(1))


def test_safe_fusing_refuses_non_finite_weights_and_fuses_nothing():
    unet = tiny_unet()
    huge = {f"{ATTN}.to_q": LoRAWeights(torch.full((2, 16), 1e30), torch.full((16, 2), 1e30))}
    add_lora_adapter(unet, "a", {**random_weights(0), **huge})
    before = {k: v.clone() for k, v in lora.base_state_dict(unet).items()}
    with pytest.raises(ValueError, match=rf"NaN/Inf in 1 weight\(s\), e.g. \['{ATTN}.to_q'\]; nothing fused"):
        lora.fuse_lora(unet, safe_fusing=True)
    assert not lora.fused_lora_adapters(unet)
    assert all(torch.equal(before[k], v) for k, v in lora.base_state_dict(unet).items())


@pytest.mark.parametrize("kwargs, message", [
    ({"foo": 1}, r"cross_attention_kwargs \['foo'\] are not supported.*accepted key is 'scale'"),
    ({"scale": "big"}, "LoRA scale must be a finite number"),
    ({"scale": True}, "LoRA scale must be a finite number"),
])
def test_unet_cross_attention_kwargs_take_only_a_numeric_scale(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_unet(tiny_unet(), cross_attention_kwargs=kwargs)


def test_unet_cross_attention_kwargs_must_be_a_dict():
    with pytest.raises(ValueError, match="cross_attention_kwargs must be a dict"):
        run_unet(tiny_unet(), cross_attention_kwargs=[("scale", 1.0)])


# ---------------------------------------------------------------------------------------------------------- dtypes, saving

def test_adapters_follow_the_base_dtype_on_load_and_move_with_the_model():
    unet = tiny_unet().to(torch.float64)
    add_lora_adapter(unet, "a", random_weights(0))
    layer = unet.get_submodule(f"{ATTN}.to_q")
    assert layer.adapters["a"].down.weight.dtype == torch.float64
    lora.fuse_lora(unet)
    unet.to(torch.float32)
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    assert layer.adapters["a"].fused_delta.dtype == torch.float32
    assert unet.get_submodule("down_blocks.0.resnets.0.conv1").adapters["a"].down.weight.is_contiguous(
        memory_format=torch.channels_last)


def test_save_pretrained_refuses_unfused_adapters_and_bakes_fused_ones_in(tmp_path):
    unet = tiny_unet()
    add_lora_adapter(unet, "a", random_weights(0))
    with pytest.raises(ValueError, match=r"runs LoRA adapter\(s\) \['a'\] unfused.*fuse_lora\(\)"):
        unet.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    lora.fuse_lora(unet)
    fused = run_unet(unet)
    unet.save_pretrained(tmp_path / "fused")
    lora.unload_lora(unet)  # diffusers' fuse_lora(); unload_lora_weights(): the fused weights stay
    assert torch.equal(run_unet(unet), fused)
    unet.save_pretrained(tmp_path / "unloaded")
    for folder in ("fused", "unloaded"):
        assert torch.equal(run_unet(minidiff.UNet2DConditionModel.from_pretrained(tmp_path / folder)), fused)


def test_load_weights_refuses_a_model_with_adapters():
    unet = tiny_unet()
    state = unet.state_dict()
    add_lora_adapter(unet, "a", random_weights(0))
    with pytest.raises(ValueError, match=r"has LoRA adapters \['a'\]: call unload_lora_weights\(\)"):
        unet.load_weights(state)


def test_lora_state_dict_and_metadata_name_modules_as_peft():
    unet = tiny_unet()
    weights = random_weights(0)
    weights["down_blocks.0.resnets.0.conv1"].alpha = 1.0
    add_lora_adapter(unet, "a", weights)
    state = lora.lora_state_dict(unet, "a")
    assert sorted(state) == sorted(f"{p}.lora_{ab}.weight" for p in TARGETS for ab in "AB")
    assert torch.equal(state[f"{ATTN}.to_q.lora_A.weight"], weights[f"{ATTN}.to_q"].down)
    metadata = lora.lora_adapter_metadata(unet, "a")
    assert metadata["r"] == 2 and metadata["lora_alpha"] == 4.0
    assert metadata["rank_pattern"] == {"down_blocks.0.resnets.0.conv1": 3}
    assert metadata["alpha_pattern"] == {"down_blocks.0.resnets.0.conv1": 1.0}
    with pytest.raises(ValueError, match="no LoRA adapter 'b'"):
        lora.lora_state_dict(unet, "b")


# ---------------------------------------------------------------------------------------------------------- pipeline

def test_pipeline_round_trip_through_save_lora_weights(pipe, tmp_path):
    base = run_tiny(pipe).images
    pipe.load_lora_weights({**unet_lora_dict(), **te_lora_dict()}, adapter_name="style")
    adapted = run_tiny(pipe).images
    assert abs(adapted - base).max() > 1e-3
    path = pipe.save_lora_weights(tmp_path, unet_lora_layers=lora.lora_state_dict(pipe.unet, "style"),
                                  text_encoder_lora_layers=lora.lora_state_dict(pipe.text_encoder, "style"),
                                  unet_lora_adapter_metadata=lora.lora_adapter_metadata(pipe.unet, "style"))
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and (run_tiny(pipe).images == base).all()
    pipe.load_lora_weights(tmp_path)
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    assert path.endswith("pytorch_lora_weights.safetensors") and (run_tiny(pipe).images == adapted).all()
    pipe.load_lora_weights(tmp_path)  # diffusers' default names count the adapters loaded: default_1 next
    assert pipe.get_list_adapters() == {"unet": ["default_0", "default_1"], "text_encoder": ["default_0", "default_1"]}


def test_pipeline_scale_reaches_the_text_encoder(pipe):
    base = run_tiny(pipe).images
    pipe.load_lora_weights(te_lora_dict(), adapter_name="te")
    assert pipe.get_list_adapters() == {"text_encoder": ["te"]}
    assert (run_tiny(pipe, cross_attention_kwargs={"scale": 0.0}).images == base).all()
    half = run_tiny(pipe, cross_attention_kwargs={"scale": 0.5}).images
    pipe.set_adapters("te", 0.5)
    assert (run_tiny(pipe).images == half).all() and abs(half - base).max() > 1e-4


def test_pipeline_fuse_unfuse_and_fused_loras(pipe):
    pipe.load_lora_weights({**unet_lora_dict(), **te_lora_dict()}, adapter_name="style")
    unfused = run_tiny(pipe).images
    pipe.fuse_lora(components=["unet"])
    assert pipe.fused_loras == {"style"} and pipe.num_fused_loras == 1
    assert abs(run_tiny(pipe).images - unfused).max() < 1e-5
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['vae'\]"):
        pipe.fuse_lora(components=["vae"])
    with pytest.raises(ValueError, match=r"adapter name\(s\) \['nope'\] are not loaded"):
        pipe.fuse_lora(adapter_names=["nope"])


def test_pipeline_set_adapters_weights_per_component_and_errors(pipe):
    pipe.load_lora_weights({**unet_lora_dict(), **te_lora_dict()}, adapter_name="a")
    pipe.load_lora_weights(unet_lora_dict(seed=5), adapter_name="b")
    assert pipe.get_active_adapters() == ["b", "a"]  # the unet's (b, loaded last), then the text encoder's (a)
    pipe.set_adapters(["a", "b"], [{"unet": 0.5, "text_encoder": 2.0}, None])
    layer = pipe.unet.get_submodule(f"{ATTN}.to_q")
    assert layer.weights == {"a": 0.5, "b": 1.0} and layer.active == ["a", "b"]
    assert pipe.text_encoder.get_submodule(TE_Q).weights == {"a": 2.0}
    for args, message in [((["a", "c"],), r"\['c'\] are not loaded"), ((["a"], [1.0, 2.0]), "1 adapter name"),
                          (("a", float("inf")), "must be a finite number"),
                          (("a", {"vae": 1.0}), r"unknown component\(s\) \['vae'\]"),
                          (("a", {"unet": {"down": 1.0}}), "per-block adapter weights")]:
        with pytest.raises(ValueError, match=message):
            pipe.set_adapters(*args)
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == {"unet": ["b"]}
    assert type(pipe.text_encoder.get_submodule(TE_Q)) is nn.Linear


def test_pipeline_failed_load_leaves_every_component_as_it_was(pipe):
    pipe.load_lora_weights(te_lora_dict(), adapter_name="a")
    keys = {name: list(getattr(pipe, name).state_dict()) for name in ("unet", "text_encoder")}
    with pytest.raises(ValueError, match="adapter name 'a' is already in use"):
        pipe.load_lora_weights({**unet_lora_dict(), **te_lora_dict(seed=9)}, adapter_name="a")
    assert {name: list(getattr(pipe, name).state_dict()) for name in keys} == keys
    with pytest.raises(TypeError, match=r"unsupported LoRA loading option\(s\) \['cache_dir'\]"):
        pipe.load_lora_weights(unet_lora_dict(), cache_dir="x")


def test_pipeline_failed_set_adapters_and_safe_fusing_change_no_component(pipe):
    """Every component is checked before any changes: a bad text-encoder weight leaves the UNet as it was too."""
    pipe.load_lora_weights({**unet_lora_dict(), **te_lora_dict()}, adapter_name="a")
    pipe.load_lora_weights(unet_lora_dict(seed=5), adapter_name="b")
    layer = pipe.unet.get_submodule(f"{ATTN}.to_q")
    with pytest.raises(ValueError, match="the text_encoder weight of adapter 'a' must be a finite number"):
        pipe.set_adapters(["a"], [{"unet": 0.3, "text_encoder": float("nan")}])
    assert layer.active == ["b"] and layer.weights == {"a": 1.0, "b": 1.0}
    pipe.delete_adapters(["a", "b"])
    huge = {f"text_encoder.text_model.{TE_Q}.lora_A.weight": torch.full((2, 16), 1e30),
            f"text_encoder.text_model.{TE_Q}.lora_B.weight": torch.full((16, 2), 1e30)}
    pipe.load_lora_weights({**unet_lora_dict(), **huge}, adapter_name="c")
    with pytest.raises(ValueError, match="nothing fused"):
        pipe.fuse_lora(safe_fusing=True)
    assert not pipe.fused_loras and not lora.fused_lora_adapters(pipe.unet)


def test_save_lora_weights_refuses_pickles_and_nothing_to_save(tmp_path):
    mixin = minidiff.StableDiffusionPipeline
    with pytest.raises(ValueError, match="safetensors only"):
        mixin.save_lora_weights(tmp_path, unet_lora_layers={"a.lora_A.weight": torch.ones(1)}, safe_serialization=False)
    with pytest.raises(ValueError, match="at least one of `unet_lora_layers`"):
        mixin.save_lora_weights(tmp_path)


def test_unet_load_attn_procs_reads_the_attention_processor_layout(tmp_path):
    from safetensors.torch import save_file

    weights = random_weights(0, {f"{ATTN}.to_q": TARGETS[f"{ATTN}.to_q"]}, alpha=None)[f"{ATTN}.to_q"]
    save_file({f"{ATTN}.processor.to_q_lora.down.weight": weights.down,
               f"{ATTN}.processor.to_q_lora.up.weight": weights.up}, tmp_path / "procs.safetensors")
    unet, reference = tiny_unet(), tiny_unet()
    unet.load_attn_procs(tmp_path, weight_name="procs.safetensors")
    add_lora_adapter(reference, "default_0", {f"{ATTN}.to_q": weights})
    assert lora.list_lora_adapters(unet) == ["default_0"]
    assert torch.equal(run_unet(unet), run_unet(reference))
