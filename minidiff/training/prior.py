"""DreamBooth's prior preservation with the frozen model as the target of the class images' loss.

``train_dreambooth.py`` fits the class images (drawn by the frozen model) as any training image: the prediction
against the noise that made x_t (Ruiz et al. 2023, Eq. 2). On the built-in model that still forgets: every shape
prompt follows the grammar less after a ring is learned (84.4% held-out match at best against the base model's
90.6%), whatever the class images. Sampling follows the classifier-free-guided prediction (Ho & Salimans 2022,
Eq. 6), ``eps(x, ∅) + g (eps(x, c) - eps(x, ∅))``, whose conditional part is a small difference of two large
predictions; a noise target constrains each prediction only up to its irreducible error, far above that difference.

``prior_target="frozen-model"`` instead asks the trained model to reproduce the frozen model's predictions on the
class rows' x_t. With ``d_c = eps_theta(x_t, c) - eps_0(x_t, c)`` and ``d_u`` the same for the empty caption, a
class row's loss is

    L_prior = mean((d_u + g (d_c - d_u))^2) + mean(d_u^2)

the change of the guided prediction at guidance ``g`` (``prior_guidance_scale``) and of the unconditional one
(which guidance at any other scale also uses). For ``v_prediction`` models read v for eps. The frozen model is the
base UNet (LoRA adapters scaled to 0, or a copy made before training for the whole UNet), so the target is exact
and has no noise.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from minidiff.adapters.lora import scaled_lora


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of (B, ...) tensors -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class FrozenModelPrior:
    """The class rows' loss against the frozen model's guided prediction (module docstring).

    ``frozen`` yields the frozen denoiser (called as the trained one: ``model(x_t, t, input_ids=...)``);
    ``unconditional_ids`` (1, L) are the empty caption's token ids."""

    def __init__(self, frozen: Callable[[], ContextManager[nn.Module]], unconditional_ids: torch.Tensor,
                 guidance_scale: float):
        self.frozen, self.unconditional_ids, self.guidance_scale = frozen, unconditional_ids, guidance_scale

    def per_sample_losses(self, forward: Callable[..., torch.Tensor], noisy: torch.Tensor, timesteps: torch.Tensor,
                          conditioning: dict, target: torch.Tensor, class_rows: int) -> torch.Tensor:
        """(B,) losses of a batch whose last ``class_rows`` rows are class images: the instance rows' squared error
        against ``target``, the class rows' L_prior. One forward of the trained model (DDP sees one) takes the
        batch and the class rows again under the empty caption; ``forward(model, x, t, conditioning)`` runs it
        (``model`` None: the trained one), as the frozen model's does without a graph."""
        instance_rows = noisy.shape[0] - class_rows
        ids = conditioning["input_ids"]  # (B, L)
        unconditional = self.unconditional_ids.to(ids.device).expand(class_rows, -1)  # (K, L)
        x = torch.cat([noisy, noisy[instance_rows:]])  # (B + K, C, H, W)
        t = torch.cat([timesteps, timesteps[instance_rows:]])  # (B + K,)
        extended = {"input_ids": torch.cat([ids, unconditional])}  # (B + K, L)
        prediction = forward(None, x, t, extended)  # (B + K, C, H, W)
        with torch.no_grad(), self.frozen() as frozen:
            reference = forward(frozen, x[instance_rows:], t[instance_rows:],
                                {"input_ids": extended["input_ids"][instance_rows:]})  # (2K, C, H, W)
        change = prediction[instance_rows:].float() - reference.float()  # (2K, C, H, W): d_c rows, then d_u rows
        d_c, d_u = change[:class_rows], change[class_rows:]
        guided = d_u + self.guidance_scale * (d_c - d_u)
        prior = guided.pow(2).flatten(1).mean(1) + d_u.pow(2).flatten(1).mean(1)  # (K,)
        instance = squared_error(prediction[:instance_rows], target[:instance_rows])  # (B - K,)
        return torch.cat([instance, prior])


def lora_frozen(model: nn.Module) -> Callable[[], ContextManager[nn.Module]]:
    """The base model of a LoRA-trained ``model``: the same module with every adapter scaled to 0."""

    @contextlib.contextmanager
    def frozen():
        with scaled_lora(model, 0.0):
            yield model
    return frozen


def copy_frozen(model: nn.Module) -> Callable[[], ContextManager[nn.Module]]:
    """A frozen module (a copy made before training): yielded as is."""
    return lambda: contextlib.nullcontext(model)
