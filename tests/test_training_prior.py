"""The frozen-model target of DreamBooth's prior preservation (minidiff/training/prior.py): the class rows' loss
against the formula written out with separate calls, one forward of the trained model per step, and the two ways
to keep the frozen model (LoRA adapters scaled to 0, a copy of the whole UNet)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from minidiff.adapters import lora
from minidiff.training.prior import FrozenModelPrior, copy_frozen, lora_frozen, squared_error
from minidiff.models.unet_2d_condition import UNet2DConditionOutput

CLASS_ROWS, INSTANCE_ROWS, GUIDANCE = 3, 2, 4.0


class TokenConditioned(nn.Module):
    """A toy denoiser ``model(x, t, input_ids=...)``: a conv of x plus a per-token embedding summed over the
    caption, so conditional and unconditional predictions differ; counts its calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.tokens = nn.Embedding(10, 2)
        self.calls = 0

    def forward(self, sample, timestep, input_ids) -> UNet2DConditionOutput:
        self.calls += 1
        text = self.tokens(input_ids).sum(1)[:, :, None, None]  # (B, 2, 1, 1)
        return UNet2DConditionOutput(sample=self.conv(sample) * (1 + timestep[:, None, None, None] / 100) + text)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = INSTANCE_ROWS + CLASS_ROWS
    noisy = torch.randn(rows, 2, 4, 4, generator=g)
    timesteps = torch.randint(0, 100, (rows,), generator=g)
    ids = torch.randint(1, 10, (rows, 5), generator=g)
    return noisy, timesteps, {"input_ids": ids}, torch.randn(rows, 2, 4, 4, generator=g)


def plain_forward(module, x, t, condition):
    return module(x, t, **condition).sample


def test_class_rows_fit_the_frozen_models_guided_prediction():
    torch.manual_seed(0)
    trained, frozen = TokenConditioned(), TokenConditioned()
    empty = torch.zeros(1, 5, dtype=torch.long)
    prior = FrozenModelPrior(copy_frozen(frozen), empty, GUIDANCE)
    noisy, timesteps, conditioning, target = batch()
    losses = prior.per_sample_losses(lambda m, x, t, c: plain_forward(m or trained, x, t, c), noisy, timesteps,
                                     conditioning, target, CLASS_ROWS)
    assert trained.calls == 1, "the trained model must run once per step (DDP allows one forward)"

    x, t = noisy[INSTANCE_ROWS:], timesteps[INSTANCE_ROWS:]
    ids, empties = conditioning["input_ids"][INSTANCE_ROWS:], empty.expand(CLASS_ROWS, -1)
    with torch.no_grad():
        d_c = trained(x, t, ids).sample - frozen(x, t, ids).sample
        d_u = trained(x, t, empties).sample - frozen(x, t, empties).sample
        expected_prior = squared_error(d_u + GUIDANCE * (d_c - d_u), 0 * d_u) + squared_error(d_u, 0 * d_u)
        expected_instance = squared_error(trained(noisy, timesteps, **conditioning).sample[:INSTANCE_ROWS],
                                          target[:INSTANCE_ROWS])
    torch.testing.assert_close(losses[:INSTANCE_ROWS], expected_instance, rtol=1e-6, atol=0)
    torch.testing.assert_close(losses[INSTANCE_ROWS:], expected_prior, rtol=1e-5, atol=1e-7)
    assert (losses[INSTANCE_ROWS:] > 0).all()

    losses.sum().backward()
    assert all(p.grad is not None for p in trained.parameters()) and all(p.grad is None for p in frozen.parameters())


def test_an_unchanged_model_has_no_prior_loss_and_the_instance_rows_keep_theirs():
    torch.manual_seed(1)
    trained = TokenConditioned()
    prior = FrozenModelPrior(copy_frozen(copy.deepcopy(trained)), torch.zeros(1, 5, dtype=torch.long), GUIDANCE)
    noisy, timesteps, conditioning, target = batch(1)
    losses = prior.per_sample_losses(lambda m, x, t, c: plain_forward(m or trained, x, t, c), noisy, timesteps,
                                     conditioning, target, CLASS_ROWS)
    assert torch.equal(losses[INSTANCE_ROWS:], torch.zeros(CLASS_ROWS))
    assert (losses[:INSTANCE_ROWS] > 0).all()


def test_lora_frozen_is_the_base_model_inside_and_the_adapted_one_after():
    torch.manual_seed(2)
    model = TokenConditioned()
    noisy, timesteps, conditioning, _ = batch(2)
    with torch.no_grad():
        base = plain_forward(model, noisy, timesteps, conditioning)
        lora.inject_trainable_lora(model, ("conv",), 2, None, generator=torch.Generator().manual_seed(0))
        for layer in lora.lora_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.up.weight.normal_()  # a trained adapter (a fresh one starts at up = 0)
        adapted = plain_forward(model, noisy, timesteps, conditioning)
        with lora_frozen(model)() as frozen:
            assert frozen is model
            torch.testing.assert_close(plain_forward(frozen, noisy, timesteps, conditioning), base, rtol=0, atol=0)
        torch.testing.assert_close(plain_forward(model, noisy, timesteps, conditioning), adapted, rtol=0, atol=0)
    assert not torch.allclose(adapted, base)
