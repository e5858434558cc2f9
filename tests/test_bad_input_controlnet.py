"""Bad ControlNet configs and inputs, and bad ControlNet residuals given to the UNet, give a one-line
ValueError/TypeError naming the option, the shapes and the fix, never a torch error from inside a layer."""

from __future__ import annotations

import pytest
import torch

from minidiff.models import ControlNetModel, UNet2DConditionModel
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

ENCODER = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, in_channels=4,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], cross_attention_dim=8, attention_head_dim=2)
CONTROLNET = dict(ENCODER, conditioning_embedding_out_channels=[4, 8])  # the image is twice the sample's size
UNET = dict(ENCODER, up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)


@pytest.fixture(scope="module")
def controlnet():
    torch.manual_seed(0)
    return ControlNetModel(**CONTROLNET).eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).eval()


def call_args(batch=2, size=(8, 8), cond_size=(16, 16), cond_channels=3) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(batch, 4, *size, generator=g), timestep=10,
                encoder_hidden_states=torch.randn(batch, 3, 8, generator=g),
                controlnet_cond=torch.rand(batch, cond_channels, *cond_size, generator=g))


def unet_args(args: dict) -> dict:
    return {k: v for k, v in args.items() if k != "controlnet_cond"}


CONFIG_ERRORS = [
    (dict(controlnet_conditioning_channel_order="rgba"),
     r"controlnet_conditioning_channel_order='rgba' is not supported; accepted values: 'rgb', 'bgr'"),
    (dict(mid_block_type=None), r"mid_block_type=None is not supported; accepted values: 'UNetMidBlock2DCrossAttn'"),
    (dict(class_embed_type="simple_projection", projection_class_embeddings_input_dim=4),
     r"class_embed_type='simple_projection' is not supported"),
    (dict(conditioning_embedding_out_channels=[]), r"conditioning_embedding_out_channels=\[\] is invalid"),
    (dict(conditioning_channels=0), r"conditioning_channels=0 is invalid"),
    (dict(addition_embed_type="text"), r"addition_embed_type='text' is not supported by minidiff's ControlNetModel"),
    (dict(addition_embed_type="text_time"), r"addition_time_embed_dim=None is invalid"),
    (dict(norm_num_groups=3), r"norm_num_groups=3 does not divide block_out_channels"),
    (dict(attention_head_dim=[2]), r"attention_head_dim has 1 entries but there are 2 down_block_types"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_ERRORS)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        ControlNetModel(**dict(CONTROLNET, **overrides))


def test_per_block_layers_refused():
    """diffusers' ControlNet takes one layers_per_block for every block (its zero convs are counted with it)."""
    with pytest.raises(TypeError, match=r"layers_per_block=\[1, 2\] has the wrong type list; expected int"):
        ControlNetModel(**dict(CONTROLNET, layers_per_block=[1, 2]))


@pytest.mark.parametrize("size, cond_size, shown", [
    ((8, 8), (8, 8), r"controlnet_cond of 8x8 does not fit sample of 8x8: the condition embedding divides the image "
                     r"size by 2 \(to 4x4\), so pass a condition image of 16x16 \(sample size x 2\)"),
    ((8, 6), (16, 16), r"controlnet_cond of 16x16 does not fit sample of 8x6: .* pass a condition image of 16x12"),
    ((8, 8), (64, 64), r"controlnet_cond of 64x64 does not fit sample of 8x8: .* \(to 32x32\)"),
])
def test_condition_image_size(controlnet, size, cond_size, shown):
    with pytest.raises(ValueError, match=shown):
        controlnet(**call_args(size=size, cond_size=cond_size))


def test_odd_condition_size_that_fits_is_accepted(controlnet):
    """Stride-2 convs round up: a 15x15 image embeds to 8x8 (diffusers accepts it too)."""
    down, mid = controlnet(**call_args(cond_size=(15, 15)), return_dict=False)
    assert down[0].shape == (2, 8, 8, 8) and mid.shape == (2, 16, 4, 4)


def test_wrong_conditioning_channels(controlnet):
    with pytest.raises(ValueError, match=r"controlnet_cond has 1 channels \(shape \(2, 1, 16, 16\)\) but this "
                                         r"ControlNetModel was built with conditioning_channels=3; "
                                         r"pass \(2, 3, 16, 16\)"):
        controlnet(**call_args(cond_channels=1))


def test_condition_batch_and_type(controlnet):
    args = call_args()
    with pytest.raises(ValueError, match=r"controlnet_cond must have shape \(B, C, H, W\) with the batch of sample "
                                         r"\(2\), e.g. \(2, 3, 16, 16\), got \(3, 3, 16, 16\)"):
        controlnet(**dict(args, controlnet_cond=torch.rand(3, 3, 16, 16)))
    with pytest.raises(TypeError, match=r"controlnet_cond must be a tensor \(2, 3, 16, 16\)"):
        controlnet(**dict(args, controlnet_cond=[[0.0]]))
    with pytest.raises(ValueError, match=r"controlnet_cond has dtype torch.float64 but the model's weights are "
                                         r"torch.float32"):
        controlnet(**dict(args, controlnet_cond=args["controlnet_cond"].double()))
    down, _ = controlnet(**dict(args, controlnet_cond=args["controlnet_cond"][:1]), return_dict=False)  # broadcast
    assert down[0].shape[0] == 2


def test_bad_call_options(controlnet):
    args = call_args()
    with pytest.raises(TypeError, match=r"conditioning_scale must be a finite number .* got 'strong'"):
        controlnet(**args, conditioning_scale="strong")
    with pytest.raises(TypeError, match=r"conditioning_scale must be a finite number .* got nan"):
        controlnet(**args, conditioning_scale=float("nan"))
    with pytest.raises(TypeError, match=r"guess_mode must be True or False, got 'yes'"):
        controlnet(**args, guess_mode="yes")
    with pytest.raises(ValueError, match=r"cross_attention_kwargs \['mask'\] are not supported by minidiff's "
                                         r"ControlNetModel; the accepted key is 'scale'"):
        controlnet(**args, cross_attention_kwargs={"mask": 1})
    with pytest.raises(ValueError, match=r"attention_mask is not supported by minidiff's ControlNetModel"):
        controlnet(**args, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"timestep_cond was given but this ControlNetModel has no time_cond_proj_dim"):
        controlnet(**args, timestep_cond=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"this ControlNetModel cross-attends to text: pass encoder_hidden_states"):
        controlnet(**dict(args, encoder_hidden_states=None))
    with pytest.raises(ValueError, match=r"added_cond_kwargs=\['text_embeds'\] given, but this ControlNetModel has "
                                         r"no added conditioning"):
        controlnet(**args, added_cond_kwargs={"text_embeds": torch.ones(2, 4)})
    with pytest.raises(ValueError, match=r"sample has 3 channels but ControlNetModel was built with in_channels=4"):
        controlnet(**dict(args, sample=torch.randn(2, 3, 8, 8)))


def test_controlnet_with_other_block_channels(unet):
    """A ControlNet of another UNet: the first residual whose shape differs is named, with both shapes."""
    torch.manual_seed(0)
    other = ControlNetModel(**dict(CONTROLNET, block_out_channels=[8, 32])).eval()
    args = call_args()
    down, mid = other(**args, return_dict=False)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[3\] has shape \(2, 32, 4, 4\) but the UNet "
                                         r"expects \(2, 16, 4, 4\) .* the ControlNet must share this UNet's "
                                         r"block_out_channels"):
        unet(**unet_args(args), down_block_additional_residuals=down, mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual has shape \(2, 32, 4, 4\) but the UNet "
                                         r"expects \(2, 16, 4, 4\)"):
        unet(**unet_args(args), down_block_additional_residuals=down[:3] + (torch.zeros(2, 16, 4, 4),),
             mid_block_additional_residual=mid)


def test_residuals_of_another_sample_size(unet, controlnet):
    args = call_args()
    down, mid = controlnet(**call_args(size=(4, 4), cond_size=(8, 8)), return_dict=False)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[0\] has shape \(2, 8, 4, 4\) but the UNet "
                                         r"expects \(2, 8, 8, 8\) .* for sample \(2, 4, 8, 8\)"):
        unet(**unet_args(args), down_block_additional_residuals=down, mid_block_additional_residual=mid)


def test_bad_residual_counts(unet):
    torch.manual_seed(0)
    deeper = ControlNetModel(**dict(CONTROLNET, layers_per_block=2)).eval()  # 6 residuals, the UNet has 4
    args = call_args()
    down, mid = deeper(**args, return_dict=False)
    assert len(down) == 6
    with pytest.raises(ValueError, match=r"down_block_additional_residuals must be a tuple of 4 tensors \(one per "
                                         r"down-block residual of this UNet.*\), got 6; use a ControlNet built from "
                                         r"this UNet's config \(ControlNetModel.from_unet\)"):
        unet(**unet_args(args), down_block_additional_residuals=down, mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"got 0"):
        unet(**unet_args(args), down_block_additional_residuals=(), mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"got Tensor"):
        unet(**unet_args(args), down_block_additional_residuals=down[0], mid_block_additional_residual=mid)


def test_residuals_must_come_together(unet, controlnet):
    args = call_args()
    down, mid = controlnet(**args, return_dict=False)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals was given without "
                                         r"mid_block_additional_residual: pass both"):
        unet(**unet_args(args), down_block_additional_residuals=down)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual was given without "
                                         r"down_block_additional_residuals: pass both"):
        unet(**unet_args(args), mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[1\] must be a tensor of shape "
                                         r"\(2, 8, 8, 8\), got list"):
        unet(**unet_args(args), down_block_additional_residuals=(down[0], [1.0]) + down[2:],
             mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual has dtype torch.float64 but the model's "
                                         r"weights are torch.float32"):
        unet(**unet_args(args), down_block_additional_residuals=down, mid_block_additional_residual=mid.double())
    # the matching ControlNet's residuals pass, global-pooled ones (B, C, 1, 1) too
    assert unet(**unet_args(args), down_block_additional_residuals=down, mid_block_additional_residual=mid).sample \
        .shape == (2, 4, 8, 8)
    pooled = [r.mean(dim=(2, 3), keepdim=True) for r in down]
    unet(**unet_args(args), down_block_additional_residuals=pooled, mid_block_additional_residual=mid[..., :1, :1])


def test_from_unet_refusals():
    with pytest.raises(TypeError, match=r"ControlNetModel.from_unet takes a minidiff UNet2DConditionModel, got dict"):
        ControlNetModel.from_unet({})
    torch.manual_seed(0)
    fourier = UNet2DConditionModel(**dict(UNET, time_embedding_type="fourier"))
    with pytest.raises(ValueError, match=r"from_unet: the UNet's \{'time_embedding_type': 'fourier'\} shape its "
                                         r"encoder but a ControlNet cannot hold them"):
        ControlNetModel.from_unet(fourier)
    with pytest.raises(TypeError, match=r"layers_per_block=\(1, 2\) has the wrong type tuple; expected int"):
        ControlNetModel.from_unet(UNet2DConditionModel(**dict(UNET, layers_per_block=[1, 2])))
