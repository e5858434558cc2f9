"""The LoRA API of pipelines (``pipe.load_lora_weights`` ...) and of the UNet (``unet.load_attn_procs``), with
diffusers' names and arguments. Files are read by ``lora_formats``, adapters run in ``lora``; every load is
checked for every component before any model changes, so a failed load leaves the pipeline as it was."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from minidiff.adapters import lora
from minidiff.adapters.lora_formats import COMPONENTS, parse_lora, read_lora_file, write_lora_file

LOAD_OPTIONS = ("weight_name", "subfolder")


def read_lora_source(source, weight_name: str | None = None, subfolder: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, safetensors metadata and a name for messages, from a file, a folder (+ weight_name) or a state
    dict (copied, as diffusers does)."""
    if isinstance(source, dict):
        return dict(source), {}, "the LoRA state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path_or_dict must be a path or a state dict, got "
                        f"{type(source).__name__}")
    if subfolder:
        source = os.path.join(source, subfolder)
    return read_lora_file(source, weight_name)


def _check_load_options(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(LOAD_OPTIONS))
    if unknown:
        raise TypeError(f"unsupported LoRA loading option(s) {unknown}; minidiff reads local files and takes "
                        f"{list(LOAD_OPTIONS)}")


def load_into_models(models: dict[str, nn.Module], source, adapter_name: str | None, kwargs: dict) -> str:
    """Read ``source``, check it against every model, then add one adapter to each model it targets; its name."""
    _check_load_options(kwargs)
    tensors, metadata, where = read_lora_source(source, **kwargs)
    parsed = parse_lora(tensors, metadata, where, models)
    taken = list(dict.fromkeys(name for model in models.values() for name in lora.list_lora_adapters(model)))
    name = lora.default_adapter_name(taken) if adapter_name is None else adapter_name
    for component, weights in parsed.items():
        lora.check_lora_adapter(models[component], name, weights, f"{where} ({component})", taken)
    for component, weights in parsed.items():
        lora.attach_lora_adapter(models[component], name, weights)
    return name


class UNet2DConditionLoadersMixin:
    """``unet.load_attn_procs(path, weight_name=...)``: the 2023 tutorials' way to load a UNet LoRA (attention
    processor or diffusers layout, unprefixed or ``unet.`` keys); the adapter is named and activated as by
    ``load_lora_weights``. (diffusers 0.42 itself only loads Custom Diffusion processors here.)"""

    def load_attn_procs(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        load_into_models({"unet": self}, pretrained_model_name_or_path_or_dict, adapter_name, kwargs)


def _names(adapter_names, what: str) -> list[str]:
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{what} must be an adapter name or a list of names, got {adapter_names!r}")
    return list(names)


def _weight(value, where: str) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number (or None for 1.0), got {value!r}")
    return float(value)


class StableDiffusionLoraLoaderMixin:
    """LoRA on ``self.unet`` and ``self.text_encoder`` (diffusers' StableDiffusionLoraLoaderMixin), and on
    ``self.text_encoder_2`` in the SDXL pipelines (diffusers' StableDiffusionXLLoraLoaderMixin)."""

    unet_name = "unet"
    text_encoder_name = "text_encoder"

    @property
    def _lora_loadable_modules(self) -> list[str]:
        """The pipeline's components LoRA can adapt: unet, text_encoder and (SDXL) text_encoder_2."""
        return [name for name in COMPONENTS if name in self.component_names]

    def _lora_models(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self._lora_loadable_modules
                if getattr(self, name, None) is not None}

    def _components(self, components, what: str) -> dict[str, nn.Module]:
        if not components:
            raise ValueError(f"`components` cannot be empty; pass some of {self._lora_loadable_modules}")
        unknown = [name for name in components if name not in self._lora_loadable_modules]
        if unknown:
            raise ValueError(f"{what}: unknown component(s) {unknown}; LoRA components: {self._lora_loadable_modules}")
        models = self._lora_models()
        return {name: models[name] for name in components if name in models}

    # ---- loading
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          **kwargs) -> None:
        """UNet and text-encoder LoRA from a .safetensors file, a folder (+ ``weight_name``, default
        ``pytorch_lora_weights.safetensors``) or a state dict, in the diffusers/peft, kohya or attention-processor
        layout. The adapter (``adapter_name``, default ``default_<n>``) becomes the only active one."""
        load_into_models(self._lora_models(), pretrained_model_name_or_path_or_dict, adapter_name, kwargs)

    def unload_lora_weights(self) -> None:
        """Remove every adapter and put the original layers back (fused adapters stay in the weights)."""
        for model in self._lora_models().values():
            lora.unload_lora(model)

    # ---- fusing
    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Merge ``adapter_names`` (default: the active adapters), each with its weight x ``lora_scale``, into the
        weights of ``components`` (default: every LoRA component). The per-call ``cross_attention_kwargs`` scale no
        longer applies to them."""
        models = self._components(self._lora_loadable_modules if components is None else components, "fuse_lora")
        lora_scale = _weight(lora_scale, "lora_scale")
        if adapter_names is not None:
            adapter_names = _names(adapter_names, "adapter_names")
            self._check_known(adapter_names)
        plans = [lora.plan_fuse_lora(model, lora_scale, adapter_names, safe_fusing) for model in models.values()]
        for layer, deltas in (step for plan in plans for step in plan):  # all components checked first
            layer.fuse(deltas)

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        """Subtract what ``fuse_lora`` added (stored, not recomputed) in ``components`` (default: all)."""
        components = self._lora_loadable_modules if components is None else components
        for model in self._components(components, "unfuse_lora").values():
            lora.unfuse_lora(model)

    @property
    def fused_loras(self) -> set[str]:
        return set().union(*(lora.fused_lora_adapters(m) for m in self._lora_models().values()))

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    # ---- several adapters
    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` for the components holding adapters."""
        listed = {name: lora.list_lora_adapters(model) for name, model in self._lora_models().items()}
        return {name: adapters for name, adapters in listed.items() if adapters}

    def get_active_adapters(self) -> list[str]:
        active: dict[str, None] = {}
        for model in self._lora_models().values():
            active.update(dict.fromkeys(lora.active_lora_adapters(model)))
        return list(active)

    def _check_known(self, names: list[str]) -> None:
        loaded = {name for adapters in self.get_list_adapters().values() for name in adapters}
        missing = [name for name in names if name not in loaded]
        if missing:
            raise ValueError(f"adapter name(s) {missing} are not loaded; loaded adapters: {sorted(loaded)}")

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights=None) -> None:
        """Activate exactly ``adapter_names``; ``adapter_weights``: one number for all, one per adapter (None =
        1.0), or per adapter a dict ``{"unet": w, "text_encoder": w}``."""
        names = _names(adapter_names, "adapter_names")
        self._check_known(names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter name(s) but {len(weights)} adapter weight(s)")
        models = self._lora_models()
        per_model = {component: [_weight(self._component_weight(w, component), f"the {component} weight of adapter "
                                         f"{n!r}") for n, w in zip(names, weights)] for component in models}
        for component, model in models.items():  # every weight checked above: nothing changes on a failed call
            lora.set_lora_adapters(model, names, per_model[component])

    def _component_weight(self, weight, component: str):
        if not isinstance(weight, dict):
            return weight
        unknown = sorted(set(weight) - set(self._lora_loadable_modules))
        if unknown:
            raise ValueError(f"adapter_weights name unknown component(s) {unknown}; accepted keys: "
                             f"{self._lora_loadable_modules}")
        if isinstance(weight.get(component), dict):
            raise ValueError("per-block adapter weights (a dict inside the unet/text_encoder weight) are not "
                             "supported; give one number per component")
        return weight.get(component)

    def disable_lora(self) -> None:
        """Run the base models (fused adapters are unfused first, as peft does)."""
        for model in self._lora_models().values():
            lora.set_lora_enabled(model, False)

    def enable_lora(self) -> None:
        for model in self._lora_models().values():
            lora.set_lora_enabled(model, True)

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        names = _names(adapter_names, "adapter_names")
        self._check_known(names)
        for model in self._lora_models().values():
            lora.delete_lora_adapters(model, names)

    # ---- saving
    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers=None, text_encoder_lora_layers=None,
                          text_encoder_2_lora_layers=None, is_main_process: bool = True, weight_name: str | None = None,
                          save_function=None, safe_serialization: bool = True,
                          unet_lora_adapter_metadata: dict | None = None,
                          text_encoder_lora_adapter_metadata: dict | None = None,
                          text_encoder_2_lora_adapter_metadata: dict | None = None) -> str | None:
        """Write diffusers' LoRA file from peft-named layers (``lora_state_dict(model, name)`` or peft's
        ``get_peft_model_state_dict``; a module's ``state_dict()`` too) and their LoraConfig metadata;
        ``text_encoder_2_*`` for the SDXL pipelines' second text encoder."""
        if save_function is not None or not safe_serialization:
            raise ValueError("minidiff writes LoRA weights as safetensors only: leave save_function=None and "
                             "safe_serialization=True")
        if text_encoder_2_lora_layers and "text_encoder_2" not in cls.component_names:
            raise ValueError(f"{cls.__name__} has no text_encoder_2: save SDXL LoRA layers with "
                             "StableDiffusionXLPipeline.save_lora_weights")
        layers, metadata = {}, {}
        for component, given, config in (("unet", unet_lora_layers, unet_lora_adapter_metadata),
                                         ("text_encoder", text_encoder_lora_layers,
                                          text_encoder_lora_adapter_metadata),
                                         ("text_encoder_2", text_encoder_2_lora_layers,
                                          text_encoder_2_lora_adapter_metadata)):
            if given:
                layers[component] = given.state_dict() if isinstance(given, nn.Module) else dict(given)
                metadata[component] = config
        if not layers:
            raise ValueError("You must pass at least one of `unet_lora_layers` or `text_encoder_lora_layers`.")
        if not is_main_process:
            return None
        return write_lora_file(save_directory, weight_name, layers, metadata)
