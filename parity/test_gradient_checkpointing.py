"""Gradient checkpointing parity: minidiff with ``enable_gradient_checkpointing()`` against diffusers' UNets and
transformers' CLIP towers with theirs enabled, on the same seeded tiny weights (saved by the reference library with
save_pretrained, loaded by minidiff), both in train mode: the loss and every parameter's gradient (1e-4 relative,
as the models' gradient parity) and the gradient with respect to the float inputs.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import transformers

import minidiff
from parity.pipeline_fixtures import randomize_
from parity.report import compare, compare_gradients
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

COMPONENT = "gradient checkpointing"
GRAD_TOL = 1e-4
LOSS_TOL = 1e-5
UNET_COND = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=2, sample_size=16,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=12, attention_head_dim=2)
UNET_PLAIN = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=2, sample_size=16,
                  down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=4)
TEXT = dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            bos_token_id=998, eos_token_id=999, pad_token_id=1, projection_dim=8)


def unet_inputs(in_channels: int, cross: bool, g: torch.Generator) -> dict:
    args = dict(sample=torch.randn(2, in_channels, 16, 16, generator=g), timestep=torch.tensor([15, 640]))
    if cross:
        args["encoder_hidden_states"] = torch.randn(2, 5, UNET_COND["cross_attention_dim"], generator=g)
    return args


def text_inputs(g: torch.Generator) -> dict:
    return dict(input_ids=torch.randint(0, TEXT["vocab_size"] - 2, (2, 9), generator=g))


CASES = {  # name: reference builder, minidiff class, inputs, the output tensors the loss reads
    "UNet2DConditionModel": (lambda: diffusers.UNet2DConditionModel(**UNET_COND), minidiff.UNet2DConditionModel,
                             lambda g: unet_inputs(4, True, g), lambda out: (out.sample,)),
    "UNet2DModel": (lambda: diffusers.UNet2DModel(**UNET_PLAIN), minidiff.UNet2DModel,
                    lambda g: unet_inputs(3, False, g), lambda out: (out.sample,)),
    "CLIPTextModel": (lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), minidiff.CLIPTextModel,
                      text_inputs, lambda out: (out.last_hidden_state, out.pooler_output)),
    "CLIPTextModelWithProjection": (
        lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)),
        minidiff.CLIPTextModelWithProjection, text_inputs, lambda out: (out.last_hidden_state, out.text_embeds)),
}


def loss_and_gradients(model, inputs: dict, outputs) -> tuple[torch.Tensor, dict]:
    """A fixed random projection of the outputs, and its gradients w.r.t. the float inputs and every parameter."""
    inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    weights = torch.Generator().manual_seed(7)
    loss = sum((out * torch.randn(out.shape, generator=weights)).sum() for out in outputs(model(**inputs)))
    loss.backward()
    grads = {f"input {k}": v.grad for k, v in inputs.items() if v.is_floating_point()}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return loss.detach(), grads


@pytest.mark.parametrize("name", CASES)
def test_checkpointed_gradients_match_the_reference(name, tmp_path):
    build_reference, minidiff_class, make_inputs, outputs = CASES[name]
    torch.manual_seed(0)
    reference = build_reference()
    randomize_(reference, 0, scale=0.1)
    reference.save_pretrained(tmp_path)
    ours = minidiff_class.from_pretrained(tmp_path)
    for model in (reference, ours):
        model.train()
        if isinstance(model, transformers.PreTrainedModel):  # transformers 5 renamed gradient_checkpointing_enable
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        else:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
    inputs = make_inputs(torch.Generator().manual_seed(1))
    their_loss, their_grads = loss_and_gradients(reference, inputs, outputs)
    my_loss, my_grads = loss_and_gradients(ours, inputs, outputs)
    compare(COMPONENT, f"{name}: loss", my_loss, their_loss, LOSS_TOL)
    compare_gradients(COMPONENT, name, my_grads, their_grads, GRAD_TOL)


@pytest.mark.parametrize("name, config", [("UNet2DConditionModel", UNET_COND), ("UNet2DModel", UNET_PLAIN)])
def test_the_same_modules_checkpoint(name, config):
    """``enable_gradient_checkpointing`` sets the flag on the same module classes as diffusers' (its own test)."""
    def flagged(model) -> set[str]:
        model.enable_gradient_checkpointing()
        return {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)}

    assert flagged(getattr(minidiff, name)(**config)) == flagged(getattr(diffusers, name)(**config))
