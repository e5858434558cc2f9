"""LoRA runtime: a Linear/Conv2d with low-rank side branches, and the model-level operations on them.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3: ``h = W0 x + B A x``, the update scaled
by ``alpha / r``. Here ``A`` is ``down`` (r, in[, kh, kw]) and ``B`` is ``up`` (out, r[, 1, 1]), so with the
adapter's weight ``w`` (``set_adapters``) and the per-call scale ``s`` (``cross_attention_kwargs={"scale": s}``):

    h = W0 x + sum over active adapters of  s * w * (alpha / r) * up(down(x))

``LoRALayer`` replaces the adapted module in its parent and keeps it as ``base_layer``; removing its last adapter
puts that very module object back, so the model's ``state_dict()`` keys and outputs are the base ones again.
Fusing adds ``w * lora_scale * (alpha / r) * up @ down`` to ``base_layer.weight`` and keeps that tensor, so unfusing
subtracts exactly what was added; a fused adapter no longer runs as a side branch (and the per-call scale no longer
reaches it, as in diffusers). Removing an adapter (``delete_lora_adapters``, ``unload_lora``) keeps what is fused in
the weights, as diffusers does: ``fuse_lora(); unload_lora_weights(); save_pretrained()`` bakes a LoRA in.

The active set, weights and enabled flag are kept per layer but always set for a whole model at once, as peft does:
loading an adapter makes it the model's only active adapter.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from minidiff.adapters.lora_formats import LoRAWeights

TARGET_TYPES = (nn.Linear, nn.Conv2d)


class LoRAAdapter(nn.Module):
    """One low-rank update of a Linear/Conv2d: ``down`` (same kernel, stride, padding as the base conv) then a 1x1
    ``up``, scaled by ``alpha / rank``. ``fused_delta`` is what fusing added to the base weight (None: not fused)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, weights: LoRAWeights):
        super().__init__()
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.rank = weights.rank
        self.alpha = float(weights.alpha) if weights.alpha is not None else float(self.rank)
        if isinstance(base, nn.Linear):
            self.down = nn.utils.skip_init(nn.Linear, base.in_features, self.rank, bias=False, **factory)
            self.up = nn.utils.skip_init(nn.Linear, self.rank, base.out_features, bias=False, **factory)
        else:
            self.down = nn.utils.skip_init(nn.Conv2d, base.in_channels, self.rank, base.kernel_size, base.stride,
                                           base.padding, base.dilation, bias=False, padding_mode=base.padding_mode,
                                           **factory)
            self.up = nn.utils.skip_init(nn.Conv2d, self.rank, base.out_channels, 1, bias=False, **factory)
            if base.weight.is_contiguous(memory_format=torch.channels_last):
                self.to(memory_format=torch.channels_last)  # the UNet keeps its convs NHWC (see ModelMixin)
        with torch.no_grad():
            self.down.weight.copy_(weights.down)
            self.up.weight.copy_(weights.up)
        self.register_buffer("fused_delta", None, persistent=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, weight: float) -> torch.Tensor:
        """``weight * (alpha / r) * up @ down`` in the base weight's shape, computed in float32 at least."""
        up, down = self.up.weight, self.down.weight
        compute = torch.promote_types(up.dtype, torch.float32)
        delta = up.flatten(1).to(compute) @ down.flatten(1).to(compute)  # (out, r) @ (r, in*kh*kw) -> (out, in*kh*kw)
        return (delta * (weight * self.scaling)).to(up.dtype).reshape(up.shape[0], *down.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., r) -> (..., out), or (B, in, H, W) -> (B, out, H', W')


class LoRALayer(nn.Module):
    """``base_layer(x)`` plus the side branches of the active, unfused adapters (module docstring)."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.weights: dict[str, float] = {}  # adapter -> its weight from set_adapters (1.0 when loaded)
        self.active: list[str] = []  # may name adapters other layers hold: those are skipped here
        self.enabled = True
        self.call_scale = 1.0  # the per-call scale of scaled_lora

    def add(self, name: str, weights: LoRAWeights) -> None:
        self.adapters[name] = LoRAAdapter(self.base_layer, weights).train(self.training)
        self.weights[name] = 1.0

    def branch_scale(self, name: str) -> float:
        return self.weights[name] * self.adapters[name].scaling * self.call_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        for name in self.active:
            adapter = self.adapters[name] if name in self.adapters else None
            if adapter is not None and adapter.fused_delta is None:
                out = out + adapter(x) * self.branch_scale(name)
        return out

    def fusable(self, names: list[str] | None) -> list[str]:
        """The adapters ``fuse`` would merge: ``names`` (default: the active ones) held here and not yet fused."""
        names = self.active if names is None else names
        return [name for name in names if name in self.adapters and self.adapters[name].fused_delta is None]

    def deltas(self, names: list[str], lora_scale: float) -> dict[str, torch.Tensor]:
        """What fusing ``names`` would add to the base weight, per adapter; nothing is changed yet."""
        return {name: self.adapters[name].delta_weight(self.weights[name] * lora_scale) for name in names}

    def fuse(self, deltas: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, delta in deltas.items():
                self.base_layer.weight += delta
                self.adapters[name].fused_delta = delta

    def unfuse(self) -> None:
        """Subtract the stored deltas (the base weight comes back within rounding, whatever changed since)."""
        with torch.no_grad():
            for adapter in reversed(list(self.adapters.values())):
                if adapter.fused_delta is not None:
                    self.base_layer.weight -= adapter.fused_delta.to(self.base_layer.weight.dtype)
                    adapter.fused_delta = None

    def remove(self, name: str) -> None:
        """Drop an adapter; what it fused stays in the base weight."""
        del self.adapters[name]
        del self.weights[name]


# ---------------------------------------------------------------------------------------------------------- queries

def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Module path -> LoRALayer, in model order."""
    return {path: module for path, module in model.named_modules() if isinstance(module, LoRALayer)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALayer) for module in model.modules())


def list_lora_adapters(model: nn.Module) -> list[str]:
    """Every adapter name the model holds, in load order."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under the base model's keys: LoRA layers seen through (``x.base_layer.weight`` ->
    ``x.weight``, with whatever is fused in it), their adapters left out."""
    prefixes = tuple(f"{path}." for path in lora_layers(model))
    state = {}
    for key, tensor in model.state_dict().items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            state[key] = tensor
        elif key.startswith(f"{prefix}base_layer."):
            state[prefix + key.removeprefix(f"{prefix}base_layer.")] = tensor
    return state


def unfused_lora_adapters(model: nn.Module) -> list[str]:
    """The adapters that run as side branches (active, enabled, not fused) somewhere in the model."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        if layer.enabled:
            names.update(dict.fromkeys(layer.fusable(None)))
    return list(names)


def active_lora_adapters(model: nn.Module) -> list[str]:
    layers = list(lora_layers(model).values())
    return list(layers[0].active) if layers else []


def fused_lora_adapters(model: nn.Module) -> set[str]:
    return {name for layer in lora_layers(model).values() for name, adapter in layer.adapters.items()
            if adapter.fused_delta is not None}


def default_adapter_name(taken: list[str]) -> str:
    """diffusers' naming: ``default_<number of adapters loaded>``, the next free number if that one is taken."""
    number = len(taken)
    while f"default_{number}" in taken:
        number += 1
    return f"default_{number}"


# ---------------------------------------------------------------------------------------------------------- checks

def check_adapter_name(name, taken: list[str]) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if name in taken:
        raise ValueError(f"adapter name {name!r} is already in use (loaded: {taken}); choose another adapter_name, "
                         "or delete_adapters/unload_lora_weights first")


def check_lora_fits(model: nn.Module, path: str, weights: LoRAWeights, where: str) -> None:
    """``path`` names a Linear/Conv2d of ``model`` that ``weights`` fit; ``where`` names the file/component."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{where}: {type(model).__name__} has no module {path!r} to adapt") from None
    layer = module.base_layer if isinstance(module, LoRALayer) else module
    if not isinstance(layer, TARGET_TYPES) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
        raise ValueError(f"{where}: {path} is a {type(layer).__name__}"
                         f"{' with groups' if isinstance(layer, nn.Conv2d) else ''}; LoRA adapts Linear and "
                         "(ungrouped) Conv2d layers only")
    down, up = weights.down, weights.up
    if not (isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor)):
        raise TypeError(f"{where}: {path}: down and up must be tensors, got {type(down).__name__} and "
                        f"{type(up).__name__}")
    if isinstance(layer, nn.Linear):
        kernel, unit, shape = (), (), f"Linear ({layer.in_features} -> {layer.out_features})"
        fan_in, fan_out = layer.in_features, layer.out_features
    else:
        kernel, unit = tuple(layer.kernel_size), (1, 1)
        shape = f"Conv2d ({layer.in_channels} -> {layer.out_channels}, kernel {kernel})"
        fan_in, fan_out = layer.in_channels, layer.out_channels
    rank = down.shape[0] if down.ndim else 0
    expected_down, expected_up = (rank, fan_in, *kernel), (fan_out, rank, *unit)
    if rank < 1 or tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        raise ValueError(f"{where}: {path} is {shape}: LoRA down must be (r, {', '.join(map(str, expected_down[1:]))}) "
                         f"and up ({', '.join(map(str, expected_up[:1]))}, r{', 1, 1' if unit else ''}) with one "
                         f"rank r >= 1, got down {tuple(down.shape)} and up {tuple(up.shape)}")
    for role, tensor in (("down", down), ("up", up)):
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: {path}: the {role} weight must be finite floating-point numbers "
                             f"(dtype {tensor.dtype})")
    alpha = weights.alpha
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"{where}: {path}: alpha must be a positive number or None (alpha = rank), got {alpha!r}")


def check_lora_adapter(model: nn.Module, adapter_name: str, weights: dict[str, LoRAWeights], where: str,
                       taken: list[str] | None = None) -> None:
    """Everything ``add_lora_adapter`` needs, checked without changing the model."""
    check_adapter_name(adapter_name, list_lora_adapters(model) if taken is None else taken)
    if not weights:
        raise ValueError(f"{where}: no LoRA weights for {type(model).__name__}")
    for path, item in weights.items():
        check_lora_fits(model, path, item, where)


# ---------------------------------------------------------------------------------------------------------- changes

def add_lora_adapter(model: nn.Module, adapter_name: str, weights: dict[str, LoRAWeights],
                     where: str = "state dict") -> None:
    """Add adapter ``adapter_name`` (module path -> LoRAWeights) to ``model`` and make it the only active one.
    Everything is checked first: a failed call leaves the model as it was."""
    check_lora_adapter(model, adapter_name, weights, where)
    attach_lora_adapter(model, adapter_name, weights)


def attach_lora_adapter(model: nn.Module, adapter_name: str, weights: dict[str, LoRAWeights]) -> None:
    """``add_lora_adapter`` for weights ``check_lora_adapter`` has passed."""
    enabled = all(layer.enabled for layer in lora_layers(model).values())  # a disabled model stays disabled
    for path, item in weights.items():
        module = model.get_submodule(path)
        if not isinstance(module, LoRALayer):
            module = _replace(model, path, LoRALayer(module).train(module.training))
            module.enabled = enabled
        module.add(adapter_name, item)
    set_lora_adapters(model, [adapter_name])


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, child = path.rpartition(".")
    model.get_submodule(parent_path).register_module(child, new)
    return new


def set_lora_adapters(model: nn.Module, names: list[str], weights: list[float] | None = None) -> None:
    """Activate exactly ``names`` in every layer, with their weights (None: keep them); a layer skips the names it
    does not hold."""
    for layer in lora_layers(model).values():
        layer.active = list(names)
        if weights is not None:
            layer.weights.update({name: weight for name, weight in zip(names, weights) if name in layer.adapters})


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Disabling unfuses first (as peft does), so a disabled model computes the base model."""
    for layer in lora_layers(model).values():
        if not enabled:
            layer.unfuse()
        layer.enabled = enabled


def plan_fuse_lora(model: nn.Module, lora_scale: float = 1.0, adapter_names: list[str] | None = None,
                   safe_fusing: bool = False) -> list[tuple[LoRALayer, dict[str, torch.Tensor]]]:
    """What ``fuse_lora`` would add to each layer, checked; nothing is changed yet."""
    layers = lora_layers(model)
    if any(not layer.enabled for layer in layers.values()):
        raise ValueError("the LoRA adapters are disabled: enable_lora() before fuse_lora()")
    plans = {path: layer.deltas(layer.fusable(adapter_names), lora_scale) for path, layer in layers.items()}
    if safe_fusing:
        broken = [path for path, deltas in plans.items()
                  if deltas and not bool(torch.isfinite(layers[path].base_layer.weight + sum(deltas.values())).all())]
        if broken:
            raise ValueError(f"fusing would put NaN/Inf in {len(broken)} weight(s), e.g. {broken[:3]}; nothing fused")
    return [(layers[path], deltas) for path, deltas in plans.items()]


def fuse_lora(model: nn.Module, lora_scale: float = 1.0, adapter_names: list[str] | None = None,
              safe_fusing: bool = False) -> None:
    """Merge ``adapter_names`` (default: the active adapters) into the weights, each with its weight x lora_scale.
    ``safe_fusing`` refuses (changing nothing) if a fused weight would hold NaN/Inf."""
    for layer, deltas in plan_fuse_lora(model, lora_scale, adapter_names, safe_fusing):
        layer.fuse(deltas)


def unfuse_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unfuse()


def delete_lora_adapters(model: nn.Module, names: list[str]) -> None:
    """Remove adapters; a layer left without any gets its original module back. What was fused stays fused."""
    for path, layer in lora_layers(model).items():
        for name in names:
            if name in layer.adapters:
                layer.remove(name)
        layer.active = [name for name in layer.active if name not in names]
        if not layer.active and layer.adapters:  # as peft: the first remaining adapter takes over
            layer.active = [next(iter(layer.adapters))]
        if not layer.adapters:
            _replace(model, path, layer.base_layer)


def unload_lora(model: nn.Module) -> None:
    delete_lora_adapters(model, list_lora_adapters(model))


def check_lora_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"the LoRA scale must be a finite number (or None), got {scale!r}")


@contextmanager
def scaled_lora(module: nn.Module, scale: float | None) -> Iterator[None]:
    """Multiply the side branches of ``module``'s unfused LoRA adapters by ``scale`` inside the block (None: as
    they are); fused adapters are in the weights and do not see it, as in diffusers."""
    check_lora_scale(scale)
    layers = list(lora_layers(module).values()) if scale is not None else []
    previous = [layer.call_scale for layer in layers]
    try:
        for layer in layers:
            layer.call_scale = layer.call_scale * scale
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.call_scale = value


# ---------------------------------------------------------------------------------------------------------- training

def matching_modules(model: nn.Module, target_modules: tuple[str, ...] | list[str]) -> list[str]:
    """Paths of the Linear/Conv2d modules peft's ``target_modules`` rule picks: the path equals a target or ends
    with ``"." + target`` (``"to_q"`` matches every ``...attn1.to_q`` and ``...attn2.to_q``)."""
    return [path for path, module in model.named_modules()
            if isinstance(module, TARGET_TYPES) and not isinstance(module, LoRALayer)
            and any(path == target or path.endswith("." + target) for target in target_modules)]


def inject_trainable_lora(model: nn.Module, target_modules: tuple[str, ...] | list[str], rank: int,
                          alpha: float | None = None, adapter_name: str = "default",
                          generator: torch.Generator | None = None) -> list[str]:
    """Add a fresh adapter of ``rank`` to every module ``target_modules`` picks and return their paths.

    Initialised as peft's ``init_lora_weights="gaussian"`` (what diffusers' LoRA training scripts use): ``down``
    (A) ~ N(0, (1/r)^2), ``up`` (B) = 0, so the adapted model starts equal to the base (Hu et al. 2021, Sec. 4.1).
    The adapters' parameters require grad; freezing the base model is the caller's choice. Draws come from
    ``generator`` (CPU) in module order, so a seed gives the same adapter anywhere."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    paths = matching_modules(model, target_modules)
    if not paths:
        raise ValueError(f"no Linear/Conv2d module of {type(model).__name__} matches target_modules "
                         f"{list(target_modules)}; e.g. to_q, to_k, to_v, to_out.0 (UNet), q_proj, k_proj, v_proj, "
                         "out_proj (CLIP)")
    weights = {}
    for path in paths:
        base = model.get_submodule(path)
        down_shape = (rank, base.in_features) if isinstance(base, nn.Linear) else (
            rank, base.in_channels, *base.kernel_size)
        up_shape = (base.out_features, rank) if isinstance(base, nn.Linear) else (base.out_channels, rank, 1, 1)
        down = torch.randn(down_shape, generator=generator) / rank
        weights[path] = LoRAWeights(down.to(base.weight.dtype), torch.zeros(up_shape, dtype=base.weight.dtype), alpha)
    check_lora_adapter(model, adapter_name, weights, f"inject_trainable_lora({list(target_modules)})")
    attach_lora_adapter(model, adapter_name, weights)
    for parameter in lora_parameters(model, adapter_name).values():
        parameter.requires_grad_(True)
    return paths


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The ``down``/``up`` weights of one adapter, by their ``named_parameters`` names (what training updates)."""
    marker = f".adapters.{adapter_name}."
    return {name: parameter for name, parameter in model.named_parameters() if marker in name}


# ---------------------------------------------------------------------------------------------------------- export

def peft_named_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The adapter's weights as peft's ``get_peft_model_state_dict`` names them: ``<module>.lora_A.weight`` (down)
    and ``<module>.lora_B.weight`` (up)."""
    named = {}
    for path, layer in lora_layers(model).items():
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            named[f"{path}.lora_A.weight"] = adapter.down.weight
            named[f"{path}.lora_B.weight"] = adapter.up.weight
    if not named:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}; it has "
                         f"{list_lora_adapters(model)}")
    return named


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (:func:`peft_named_parameters`), for ``save_lora_weights``."""
    return {key: parameter.detach() for key, parameter in peft_named_parameters(model, adapter_name).items()}


def lora_adapter_metadata(model: nn.Module, adapter_name: str = "default") -> dict:
    """The LoraConfig fields diffusers stores beside the tensors (``*_lora_adapter_metadata``): the most common rank
    and alpha as ``r``/``lora_alpha``, the others as ``rank_pattern``/``alpha_pattern`` keyed by module path."""
    adapters = {path: layer.adapters[adapter_name] for path, layer in lora_layers(model).items()
                if adapter_name in layer.adapters}
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}")
    rank = Counter(adapter.rank for adapter in adapters.values()).most_common(1)[0][0]
    alpha = Counter(adapter.alpha for adapter in adapters.values()).most_common(1)[0][0]
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(adapters),
            "rank_pattern": {path: a.rank for path, a in adapters.items() if a.rank != rank},
            "alpha_pattern": {path: a.alpha for path, a in adapters.items() if a.alpha != alpha}}
