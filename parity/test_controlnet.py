"""ControlNetModel parity with diffusers 0.42.1, and the UNet with ControlNet residuals.

Each case builds a seeded diffusers ControlNetModel (every parameter perturbed, so the zero convolutions count),
saves it, loads the folder with minidiff's from_pretrained and compares every residual (1e-5 relative, the worst of
the down residuals and the mid residual recorded per case) and, for one case, the gradients (1e-4). The UNet is
checked with residuals added (diffusers' residuals into both UNets, and each library's ControlNet feeding its own
UNet), ``from_unet`` against diffusers' ``from_unet``, and the reverse direction (a minidiff-saved folder read by
diffusers).
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

from minidiff.models import ControlNetModel, UNet2DConditionModel
from minidiff.models.controlnet import ControlNetConfig
from parity.pipeline_fixtures import randomize_
from parity.report import compare, compare_gradients
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
DOWN2, UP2 = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
CROSS_BOTH = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")


def encoder(down=DOWN2, channels=(8, 16), groups=4, cross=12, heads=2, layers=1, **extra) -> dict:
    """The options a ControlNet shares with its UNet."""
    return dict(block_out_channels=list(channels), norm_num_groups=groups, down_block_types=list(down),
                cross_attention_dim=cross, attention_head_dim=heads, layers_per_block=layers, **extra)


SD1 = encoder(SD_DOWN, channels=(16, 32, 32, 32), groups=8, cross=48, heads=8, layers=2)
SD2 = encoder(SD_DOWN, channels=(16, 32, 32, 32), groups=8, cross=40, heads=[1, 2, 4, 4], layers=2,
              use_linear_projection=True, upcast_attention=True)
SDXL = encoder(("DownBlock2D", "CrossAttnDownBlock2D"), heads=[1, 2], use_linear_projection=True,
               transformer_layers_per_block=[0, 2], addition_embed_type="text_time", addition_time_embed_dim=4,
               projection_class_embeddings_input_dim=6 + 6 * 4)
SMALL_EMBEDDING = dict(conditioning_embedding_out_channels=[4, 8, 8, 16])  # /8 as the default, 4 levels

CASES = {
    # diffusers tests/models/controlnets/test_models_controlnet.py-like tiny config, default condition encoder
    "SD1-like (4 levels, conv proj, 8 heads)": (dict(SD1, **SMALL_EMBEDDING), {}),
    "SD2-like (linear proj, heads per level, upcast)": (dict(SD2, **SMALL_EMBEDDING), {}),
    "default conditioning embedding (16, 32, 96, 256)": (encoder(), {}),
    "global_pool_conditions": (encoder(global_pool_conditions=True, conditioning_embedding_out_channels=[4, 8]), {}),
    "conditioning_scale=0.5": (encoder(conditioning_embedding_out_channels=[4, 8]), dict(conditioning_scale=0.5)),
    "guess_mode (logspace scales), conditioning_scale=0.7": (
        dict(SD1, **SMALL_EMBEDDING), dict(guess_mode=True, conditioning_scale=0.7)),
    "guess_mode + global_pool_conditions": (
        encoder(global_pool_conditions=True, conditioning_embedding_out_channels=[4, 8]), dict(guess_mode=True)),
    "bgr channel order, 1 conditioning channel": (
        encoder(controlnet_conditioning_channel_order="bgr", conditioning_channels=1,
                conditioning_embedding_out_channels=[4, 8]), {}),
    "bgr, 3 channels": (encoder(controlnet_conditioning_channel_order="bgr", conditioning_channels=3,
                                conditioning_embedding_out_channels=[4, 8]), {}),
    "mid UNetMidBlock2D, scale_shift, class embeds (timestep)": (
        encoder(mid_block_type="UNetMidBlock2D", resnet_time_scale_shift="scale_shift", class_embed_type="timestep",
                conditioning_embedding_out_channels=[4, 8]), {}),
    "transformer depths per layer [[1], [2]], only_cross_attention per level": (
        encoder(CROSS_BOTH, transformer_layers_per_block=[[1], [2]], only_cross_attention=[True, False],
                conditioning_embedding_out_channels=[4, 8]), {}),
    "SDXL-like (text_time, transformer depths [0, 2])": (dict(SDXL, conditioning_embedding_out_channels=[4, 8]), {}),
}


def factor(config: dict) -> int:
    return 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)


def inputs(config: dict, batch: int = 2, size=(8, 8), seed: int = 1) -> dict:
    """Seeded ControlNet inputs: latents, timesteps, text states, a condition image at ``size`` x factor."""
    g = torch.Generator().manual_seed(seed)
    f = factor(config)
    args = dict(sample=torch.randn(batch, 4, *size, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                encoder_hidden_states=torch.randn(batch, 5, config["cross_attention_dim"], generator=g),
                controlnet_cond=torch.rand(batch, config.get("conditioning_channels", 3), size[0] * f, size[1] * f,
                                           generator=g))
    if config.get("class_embed_type") == "timestep":
        args["class_labels"] = torch.randint(0, 1000, (batch,), generator=g)
    if config.get("addition_embed_type") == "text_time":
        args["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 6, generator=g),
                                         time_ids=torch.randint(0, 64, (batch, 6), generator=g).float())
    return args


def reference_and_minidiff(config: dict, folder, seed: int = 0):
    torch.manual_seed(seed)
    reference = diffusers.ControlNetModel(**config)
    randomize_(reference, seed)
    reference.save_pretrained(folder)
    return reference.eval(), ControlNetModel.from_pretrained(folder)


def residuals(model, args: dict, options: dict) -> list[torch.Tensor]:
    down, mid = model(**args, **options, return_dict=False)
    return [*down, mid]


def compare_residuals(case: str, mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(mine) == len(theirs)
    for my_residual, their_residual in zip(mine, theirs):  # one record per case: the worst residual
        compare("ControlNetModel", f"{case}: residuals", my_residual, their_residual, FORWARD_TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet(tmp_path, case):
    config, options = CASES[case]
    reference, ours = reference_and_minidiff(config, tmp_path)
    args = inputs(config)
    with torch.no_grad():
        compare_residuals(case, residuals(ours, args, options), residuals(reference, args, options))


def test_controlnet_gradients(tmp_path):
    """d(sum of projected residuals) w.r.t. the sample, the condition image and every parameter, by name."""
    config, options = CASES["SD2-like (linear proj, heads per level, upcast)"]
    reference, ours = reference_and_minidiff(config, tmp_path)
    args = inputs(config, batch=1)
    grads, outputs = [], []
    for model in (ours, reference):
        model.zero_grad(set_to_none=True)
        call = {k: v.clone().requires_grad_(k in ("sample", "controlnet_cond")) if torch.is_tensor(v) else v
                for k, v in args.items()}
        out = residuals(model, call, options)
        g = torch.Generator().manual_seed(7)
        sum(torch.sum(r * torch.randn(r.shape, generator=g)) for r in out).backward()
        found = {f"input {k}": call[k].grad for k in ("sample", "controlnet_cond")}
        found.update({name: p.grad for name, p in model.named_parameters()})
        grads.append(found)
        outputs.append([r.detach() for r in out])
    compare_residuals("gradients case (SD2-like), batch 1", *outputs)
    compare_gradients("ControlNetModel", "SD2-like", grads[0], grads[1], GRAD_TOL)


def unet_config(config: dict, up: tuple[str, ...]) -> dict:
    accepted = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    shared = {k: v for k, v in config.items() if k in accepted}
    return dict(shared, up_block_types=list(up), sample_size=8)


UNET_CASES = {
    "SD1-like": (CASES["SD1-like (4 levels, conv proj, 8 heads)"][0], SD_UP),
    "global_pool_conditions (residuals broadcast over the map)": (CASES["global_pool_conditions"][0], UP2),
    "SDXL-like (text_time)": (CASES["SDXL-like (text_time, transformer depths [0, 2])"][0],
                              ("CrossAttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_with_controlnet_residuals(tmp_path, case):
    """The UNet adds the residuals where diffusers does: same residuals into both UNets, then each library's
    ControlNet feeding its own UNet (as in a ControlNet pipeline step)."""
    config, up = UNET_CASES[case]
    reference_net, our_net = reference_and_minidiff(config, tmp_path / "controlnet")
    ucfg = unet_config(config, up)
    if config.get("addition_embed_type") == "text_time":
        ucfg["transformer_layers_per_block"] = [0, 2]
        ucfg["reverse_transformer_layers_per_block"] = [2, 0]  # up block 0 has cross-attention here
    torch.manual_seed(5)
    reference_unet = diffusers.UNet2DConditionModel(**ucfg)
    randomize_(reference_unet, 5)
    reference_unet.save_pretrained(tmp_path / "unet")
    our_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    reference_unet.eval()
    args = inputs(config)
    unet_args = {k: v for k, v in args.items() if k != "controlnet_cond"}
    if config.get("class_embed_type"):
        unet_args.pop("class_labels")
    with torch.no_grad():
        down, mid = reference_net(**args, return_dict=False)
        expected = reference_unet(**unet_args, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
        plain = reference_unet(**unet_args).sample
        same = our_unet(**unet_args, down_block_additional_residuals=tuple(down),
                        mid_block_additional_residual=mid).sample
        compare("UNet2DConditionModel", f"with ControlNet residuals (diffusers' residuals) {case}", same, expected,
                FORWARD_TOL)
        my_down, my_mid = our_net(**args, return_dict=False)
        chained = our_unet(**unet_args, down_block_additional_residuals=my_down,
                           mid_block_additional_residual=my_mid).sample
        compare("UNet2DConditionModel", f"with ControlNet residuals (each library's ControlNet) {case}", chained,
                expected, FORWARD_TOL)
    assert (expected - plain).abs().max() > 1e-3  # the residuals did change the output


def _seeded_like(tensor: torch.Tensor, name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    return 0.05 * torch.randn(tensor.shape, generator=generator)


@pytest.mark.parametrize("case", ["SD2-like", "SDXL-like (text_time)"])
def test_from_unet_matches_diffusers(tmp_path, case):
    """from_unet: the same config and the same copied weights as diffusers' from_unet; with the ControlNet's own
    layers (condition encoder, zero convs) set to the same values in both, the same residuals."""
    config, up = UNET_CASES.get(case) or (CASES["SD2-like (linear proj, heads per level, upcast)"][0], SD_UP)
    ucfg = unet_config(config, up)
    if config.get("addition_embed_type") == "text_time":
        ucfg.update(transformer_layers_per_block=[0, 2], reverse_transformer_layers_per_block=[2, 0])
    torch.manual_seed(5)
    reference_unet = diffusers.UNet2DConditionModel(**ucfg)
    randomize_(reference_unet, 5)
    reference_unet.save_pretrained(tmp_path)
    our_unet = UNet2DConditionModel.from_pretrained(tmp_path)
    embedding = dict(conditioning_embedding_out_channels=(4, 8), conditioning_channels=2)
    theirs = diffusers.ControlNetModel.from_unet(reference_unet, **embedding)
    ours = ControlNetModel.from_unet(our_unet, **embedding)
    their_config = {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    for key in ControlNetConfig.field_names():
        mine, reference = ours.config[key], their_config[key]
        normalise = (lambda v: [normalise(x) for x in v] if isinstance(v, (list, tuple)) else v)  # noqa: E731
        assert normalise(mine) == normalise(reference), key
    args = inputs(dict(config, **embedding))
    with torch.no_grad():  # zero convolutions: a fresh ControlNet adds nothing to the UNet
        assert not any(r.any() for r in residuals(ours.eval(), args, {}))
    own = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
    their_state, my_state = theirs.state_dict(), ours.state_dict()
    assert set(their_state) == set(my_state)
    for name, tensor in their_state.items():
        if name.startswith(own):
            if name.startswith(own[1:]):
                assert not my_state[name].any(), f"{name} is not zero-initialised"
            value = _seeded_like(tensor, name)
            their_state[name], my_state[name] = value, value.clone()
        else:
            compare("ControlNetModel", f"from_unet ({case}): copied weights", my_state[name], tensor, 0.0)
    theirs.load_state_dict(their_state)
    ours.load_weights(my_state)
    with torch.no_grad():
        compare_residuals(f"from_unet ({case})", residuals(ours.eval(), args, {}), residuals(theirs.eval(), args, {}))


@pytest.mark.parametrize("case", ["SD2-like (linear proj, heads per level, upcast)", "global_pool_conditions",
                                  "SDXL-like (text_time, transformer depths [0, 2])"])
def test_minidiff_saved_folder_loads_in_diffusers(tmp_path, case):
    config, options = CASES[case]
    torch.manual_seed(3)
    ours = ControlNetModel(**config)
    randomize_(ours, 3)
    ours.save_pretrained(tmp_path)
    reference = diffusers.ControlNetModel.from_pretrained(tmp_path)
    assert type(reference) is diffusers.ControlNetModel
    saved = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    assert set(saved) == set(ControlNetConfig.field_names())
    reloaded = ControlNetModel.from_pretrained(tmp_path)  # and minidiff reads its own folder back, bit for bit
    assert reloaded.config.to_dict() == ours.config.to_dict()
    assert all(torch.equal(tensor, ours.state_dict()[name]) for name, tensor in reloaded.state_dict().items())
    args = inputs(config)
    with torch.no_grad():
        compare_residuals(f"reverse (minidiff-saved, diffusers-loaded): {case}",
                          residuals(ours.eval(), args, options), residuals(reference.eval(), args, options))
