"""Gradient checkpointing (``enable_gradient_checkpointing``) on both UNets and both CLIP text towers.

Each tiny seeded model is saved with safetensors and loaded back, then trained one step with and without
checkpointing: the loss and every gradient must agree (recomputing a layer in the backward pass runs the same
kernels on the same inputs). Forward hooks count the calls of every resnet, attention and encoder layer, which shows
that each of them really is recomputed (called twice) when checkpointing is on, and called once otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import minidiff
from minidiff.adapters.lora import inject_trainable_lora, lora_parameters
from minidiff.training import Trainer
from minidiff.training.distributed import Distributed
from tests.tiny_components import tiny_components
from tests.training_fixtures import one_thread, personalise_config, write_personalise_folders  # noqa: F401

TOL = 1e-6
TEXT = dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            bos_token_id=998, eos_token_id=999, pad_token_id=1, projection_dim=8)
PLAIN_UNET = dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, layers_per_block=1,
                  sample_size=16)
# the layers checkpoint recomputes: resnets, pixel attentions (UNet2DModel) and, inside a Transformer2DModel (the
# cross-attention UNet's attentions), each transformer block, as in diffusers
_BLOCK = r"(resnets|attentions)\.\d+(\.transformer_blocks\.\d+)?"
UNET_LAYERS = rf"(down_blocks|up_blocks)\.\d+\.{_BLOCK}|mid_block\.{_BLOCK}"
TEXT_LAYERS = r"(text_model\.)?encoder\.layers\.\d+"
UNET_LORA = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class Case:
    build: Callable[[], minidiff.ModelMixin]
    inputs: Callable[[torch.Generator], tuple]
    outputs: Callable[[object], tuple[torch.Tensor, ...]]  # the tensors the loss reads
    checkpointed_layers: str  # regex of the module paths called through ``checkpointed``
    lora_targets: tuple[str, ...]


def _text_ids(generator: torch.Generator) -> tuple:
    return (torch.randint(0, TEXT["vocab_size"] - 2, (2, 7), generator=generator),)


CASES = {
    "UNet2DConditionModel": Case(
        lambda: tiny_components()["unet"],
        lambda g: (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g)),
        lambda out: (out.sample,), UNET_LAYERS, UNET_LORA),
    "UNet2DModel": Case(
        lambda: minidiff.UNet2DModel(**PLAIN_UNET),
        lambda g: (torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 500])),
        lambda out: (out.sample,), UNET_LAYERS, UNET_LORA),
    "CLIPTextModel": Case(
        lambda: minidiff.CLIPTextModel(**TEXT), _text_ids,
        lambda out: (out.last_hidden_state, out.pooler_output), TEXT_LAYERS, TEXT_LORA),
    "CLIPTextModelWithProjection": Case(
        lambda: minidiff.CLIPTextModelWithProjection(**TEXT), _text_ids,
        lambda out: (out.last_hidden_state, out.text_embeds), TEXT_LAYERS, TEXT_LORA),
}


def saved_and_loaded(case: Case, folder) -> minidiff.ModelMixin:
    torch.manual_seed(0)
    built = case.build()
    built.save_pretrained(folder)
    return type(built).from_pretrained(folder).train()


def add_lora(model: minidiff.ModelMixin, case: Case) -> dict[str, torch.nn.Parameter]:
    """Freeze the base, inject a rank-2 adapter, and give its ``up`` weights random values (peft's init sets them to
    zero, which would leave every ``down`` gradient zero and the comparison empty)."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    inject_trainable_lora(model, case.lora_targets, rank=2, generator=generator)
    adapter = lora_parameters(model)
    with torch.no_grad():
        for name, parameter in adapter.items():
            if ".up." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return adapter


class LayerCalls:
    """Counts the ``forward`` calls of every module whose path matches ``pattern`` (by wrapping ``forward``: torch
    does not run forward hooks when checkpoint recomputes a module), except modules that checkpoint their own layers
    (a Transformer2DModel: its transformer blocks are counted instead)."""

    def __init__(self, model: torch.nn.Module, pattern: str):
        self.counts = {name: 0 for name, module in model.named_modules()
                       if re.fullmatch(pattern, name) and not hasattr(module, "gradient_checkpointing")}
        assert self.counts, f"no module of {type(model).__name__} matches {pattern}"
        for name in self.counts:
            module = model.get_submodule(name)
            module.forward = self._counting(name, module.forward)

    def _counting(self, name: str, forward: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return forward(*args, **kwargs)
        return counted

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def all_called(self, times: int, names: list[str] | None = None) -> bool:
        return {self.counts[name] for name in names or self.counts} == {times}

    def holding(self, parameter_names) -> list[str]:
        """The counted layers that hold one of ``parameter_names`` (an adapter's, say)."""
        return [layer for layer in self.counts if any(name.startswith(layer + ".") for name in parameter_names)]


def training_step(model: minidiff.ModelMixin, case: Case, checkpointing: bool, autocast: bool = False, **options):
    """Loss and gradients (name -> grad of every parameter that requires grad) of one MSE step on fixed inputs
    (``options``: keyword arguments of the model call)."""
    model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(2)
    inputs = case.inputs(generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = case.outputs(model(*inputs, **options))
    loss = sum(((out.float() - torch.randn(out.shape, generator=generator)) ** 2).mean() for out in outputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_close_relative(mine: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    scale = reference.abs().max().clamp_min(1e-30)
    assert ((mine - reference).abs().max() / scale).item() <= TOL, what


def assert_same_step(plain, checkpointed) -> None:
    (loss, grads), (loss_ckpt, grads_ckpt) = plain, checkpointed
    assert_close_relative(loss_ckpt, loss, "loss")
    assert grads.keys() == grads_ckpt.keys() and grads
    assert any(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        assert_close_relative(grads_ckpt[name], grad, f"grad of {name}")


@pytest.mark.parametrize("name", CASES)
def test_checkpointing_gives_the_same_loss_and_gradients(name, tmp_path):
    case = CASES[name]
    model = saved_and_loaded(case, tmp_path)
    calls = LayerCalls(model, case.checkpointed_layers)
    plain = training_step(model, case, checkpointing=False)
    assert calls.all_called(1), calls.counts
    calls.reset()
    checkpointed = training_step(model, case, checkpointing=True)
    assert calls.all_called(2), calls.counts  # each layer is recomputed in the backward pass
    assert model.is_gradient_checkpointing
    assert len(checkpointed[1]) == sum(1 for _ in model.parameters())  # every parameter has a gradient
    assert_same_step(plain, checkpointed)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", CASES)
def test_checkpointing_with_a_lora_adapter(name, autocast, tmp_path):
    """Frozen base, trainable adapter (what LoRA training does): only the adapter has gradients, and they agree."""
    case = CASES[name]
    model = saved_and_loaded(case, tmp_path)
    adapter = add_lora(model, case)
    calls = LayerCalls(model, case.checkpointed_layers)
    plain = training_step(model, case, checkpointing=False, autocast=autocast)
    checkpointed = training_step(model, case, checkpointing=True, autocast=autocast)
    # once without, twice with checkpointing: every layer holding an adapter is recomputed (a layer that no
    # gradient passes through, such as a UNet's first resnet under a frozen base, need not be)
    adapted = calls.holding(adapter)
    assert adapted and calls.all_called(3, adapted), calls.counts
    assert plain[1].keys() == adapter.keys()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapter)
    assert_same_step(plain, checkpointed)


def test_checkpointing_recomputes_with_the_lora_scale_of_the_forward_pass(tmp_path):
    """``cross_attention_kwargs={"scale": s}`` scales the adapters for the one call; the backward pass, which runs
    after it, must recompute the layers with the same scale."""
    case = CASES["UNet2DConditionModel"]
    model = saved_and_loaded(case, tmp_path)
    add_lora(model, case)
    options = dict(cross_attention_kwargs={"scale": 0.3})
    plain = training_step(model, case, checkpointing=False, **options)
    assert_same_step(plain, training_step(model, case, checkpointing=True, **options))
    unscaled = training_step(model, case, checkpointing=False)
    assert not torch.allclose(unscaled[0], plain[0])  # the scale changes the loss: the case tests something


@pytest.mark.parametrize("name", CASES)
def test_disable_restores_plain_calls(name, tmp_path):
    case = CASES[name]
    model = saved_and_loaded(case, tmp_path)
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
    calls = LayerCalls(model, case.checkpointed_layers)
    training_step(model, case, checkpointing=False)
    assert calls.all_called(1), calls.counts


@pytest.mark.parametrize("name", CASES)
def test_eval_mode_and_no_grad_run_plainly(name, tmp_path):
    case = CASES[name]
    model = saved_and_loaded(case, tmp_path)
    model.enable_gradient_checkpointing()
    calls = LayerCalls(model, case.checkpointed_layers)
    inputs = case.inputs(torch.Generator().manual_seed(2))
    with torch.no_grad():
        case.outputs(model(*inputs))  # training mode, no grad
    assert calls.all_called(1), calls.counts
    model.eval()
    sum(out.sum() for out in case.outputs(model(*inputs))).backward()  # eval mode, grad enabled
    assert calls.all_called(2), calls.counts
    assert model.is_gradient_checkpointing


def test_unsupported_model_raises_naming_the_class():
    vae = minidiff.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    with pytest.raises(ValueError, match=r"AutoencoderKL does not support gradient checkpointing; models that do: "
                                         r"UNet2DModel, UNet2DConditionModel, CLIPTextModel"):
        vae.enable_gradient_checkpointing()
    vae.disable_gradient_checkpointing()  # nothing to disable, as in diffusers
    assert not vae.is_gradient_checkpointing


@pytest.mark.parametrize("cls", [minidiff.CLIPTextModel, minidiff.CLIPTextModelWithProjection])
def test_text_encoders_answer_to_transformers_names(cls):
    """diffusers' training scripts call ``text_encoder.gradient_checkpointing_enable()`` (transformers' name)."""
    text_encoder = cls(**TEXT)
    text_encoder.gradient_checkpointing_enable()
    assert text_encoder.is_gradient_checkpointing
    text_encoder.gradient_checkpointing_disable()
    assert not text_encoder.is_gradient_checkpointing
    text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert text_encoder.is_gradient_checkpointing
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs=\{'use_reentrant': True\} is not supported"):
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_a_training_run_recomputes_the_unet_and_the_trained_text_encoder(tmp_path):
    """``TrainConfig(gradient_checkpointing=True)`` with LoRA on the UNet and the text encoder: one optimizer step
    recomputes every adapted layer of both in the backward pass, and gives the same loss and adapter as without."""
    write_personalise_folders(tmp_path)
    runs = {}
    for checkpointing in (False, True):
        config = personalise_config(tmp_path, tmp_path / f"run-{checkpointing}", train_text_encoder=True,
                                    gradient_checkpointing=checkpointing)
        trainer = Trainer(config, Distributed())
        models = {"unet": (trainer.task.unet, UNET_LAYERS),
                  "text_encoder": (trainer.task.pipe.text_encoder, TEXT_LAYERS)}
        calls = {name: LayerCalls(model, pattern) for name, (model, pattern) in models.items()}
        loss = trainer.optimizer_step()
        for name, (model, _) in models.items():
            adapted = calls[name].holding(lora_parameters(model))
            assert adapted and calls[name].all_called(2 if checkpointing else 1, adapted), (name, calls[name].counts)
        runs[checkpointing] = loss, {name: p.detach().clone() for name, p in trainer.trainable.items()}
    (loss, weights), (loss_ckpt, weights_ckpt) = runs[False], runs[True]
    assert loss_ckpt == loss
    for name, weight in weights.items():
        torch.testing.assert_close(weights_ckpt[name], weight, rtol=1e-6, atol=0)
