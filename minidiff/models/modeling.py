"""ModelMixin: config + ``from_pretrained`` / ``save_pretrained`` for every network, in diffusers' folder layout.

Module attribute paths equal the checkpoint keys, so a diffusers folder loads with ``load_state_dict`` and no
mapping table. Loading is all-or-nothing: a model is returned only when every tensor matched by name and shape.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minidiff.adapters.lora import base_state_dict, has_lora, list_lora_adapters, lora_layers, unfused_lora_adapters
from minidiff.configuration import ConfigMixin, build_config, config_attribute
from minidiff.loading.hub import resolve_folder
from minidiff.loading.safetensors_io import find_folder_weights, load_weights_path, parse_shard_size, save_weights

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(torch_dtype: Any) -> torch.dtype | None:
    """``torch_dtype`` as a floating torch.dtype (a dtype or its name); None stays None."""
    if torch_dtype is None:
        return None
    if isinstance(torch_dtype, str):
        name = torch_dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"torch_dtype={torch_dtype!r} is not supported; use one of {sorted(_DTYPES)} or a torch.dtype")
        return _DTYPES[name]
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype such as torch.float16, got {torch_dtype!r}")
    return torch_dtype


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def skip_weight_init():
    """Build modules without drawing random initial weights (they are about to be overwritten by a checkpoint):
    loading SD 1.5's UNet then takes a second instead of ~15. Only safe before a strict load of every tensor."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def merge_dtype_arguments(torch_dtype: Any, dtype: Any) -> Any:
    """diffusers takes the dtype as ``torch_dtype`` or ``dtype``; both given must agree."""
    if torch_dtype is not None and dtype is not None and parse_dtype(torch_dtype) != parse_dtype(dtype):
        raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree: pass one of them")
    return dtype if torch_dtype is None else torch_dtype


def device_of_map(device_map: Any) -> torch.device | None:
    """The one device a ``device_map`` names: a device or its name or index, ``{"": device}``, or ``"auto"`` (CUDA
    when present, else CPU). Maps that split a model across devices are refused: minidiff keeps a model whole."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if set(device_map) != {""} and len(devices) != 1:
            raise ValueError(f"device_map={device_map} splits the model across devices, which minidiff does not do; "
                             "pass one device (e.g. device_map='cuda') or move parts yourself")
        (device_map,) = devices
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r} spreads a model over several GPUs (accelerate), which minidiff "
                         "does not do; pass one device such as 'cuda' or 'auto'")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} is not a device: pass 'cpu', 'cuda', 'cuda:1', an index, "
                         "{'': device} or 'auto'") from None


def check_safe_serialization(safe_serialization: bool) -> None:
    if not safe_serialization:
        raise ValueError("safe_serialization=False would write pickled weights, which minidiff never writes (pickles "
                         "can run code when loaded); save safetensors, which diffusers reads too")


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError listing missing/unexpected keys (first few and a count) and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    for key in sorted(set(expected) & set(state_dict)):
        if expected[key].shape != state_dict[key].shape:
            problems.append(
                f"shape mismatch for {key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)}"
            )
    if problems:
        raise ValueError(f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems))
    check_weight_values(expected, state_dict, source)


def check_weight_values(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse an integer/bool tensor where the model holds a floating one (load_state_dict would cast it silently)
    and NaN/Inf values (they give an all-NaN image); integer buffers of the model stay integer and are accepted."""
    not_float = [f"{key} ({state_dict[key].dtype})" for key, tensor in expected.items()
                 if tensor.is_floating_point() and not state_dict[key].is_floating_point()]
    if not_float:
        raise ValueError(f"weights in {source} have {len(not_float)} non-floating tensor(s) where the model has "
                         f"floating ones: {_preview(not_float)}; the file is not a float checkpoint of this model")
    non_finite = [key for key, tensor in state_dict.items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if non_finite:
        counts = [f"{key} ({int((~torch.isfinite(state_dict[key])).sum())} values)" for key in non_finite]
        raise ValueError(f"weights in {source} hold NaN/Inf in {len(non_finite)} tensor(s): {_preview(counts)}; "
                         "the checkpoint is corrupt (or diverged in training): use an earlier one")


def _check_model_folder(cls: type, folder: str, config_path: str) -> None:
    """A clear error for a pipeline folder given where a model folder is expected (a config.json that is missing,
    a directory or a FIFO is reported by load_config)."""
    if not os.path.lexists(config_path) and os.path.isfile(os.path.join(folder, "model_index.json")):
        models = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, cls.config_name)))
        raise FileNotFoundError(f"{folder} is a pipeline folder (model_index.json, no {cls.config_name}): "
                                f"pass subfolder=, one of {models}, e.g. {cls.__name__}.from_pretrained(folder, "
                                f"subfolder={(models or ['unet'])[0]!r})")


def checkpointed(block: nn.Module, layer: Callable[..., Any], *args: Any) -> Any:
    """``layer(*args)``, run through ``torch.utils.checkpoint`` (Chen et al. 2016, "Training Deep Nets with
    Sublinear Memory Cost") when ``block.gradient_checkpointing`` is on, ``block`` is training and grad is enabled:
    the layer's activations are dropped after the forward pass and recomputed in the backward pass, which gives the
    same gradients with less memory. Otherwise a plain call."""
    if block.gradient_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, context_fn=lambda: _lora_scales_of_forward(layer))
    return layer(*args)


def _lora_scales_of_forward(layer: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """checkpoint's (forward, recompute) contexts: the recomputation sees the LoRA scales the forward pass saw
    (``scaled_lora`` sets them for one call, and the backward pass runs after it has restored them)."""
    layers = list(lora_layers(layer).values())
    scales = [lora.call_scale for lora in layers]

    @contextlib.contextmanager
    def as_in_forward():
        previous = [lora.call_scale for lora in layers]
        try:
            for lora, scale in zip(layers, scales):
                lora.call_scale = scale
            yield
        finally:
            for lora, scale in zip(layers, previous):
                lora.call_scale = scale

    return contextlib.nullcontext(), as_in_forward()


class ModelMixin(nn.Module, ConfigMixin):
    """Base of UNet2DModel, UNet2DConditionModel, AutoencoderKL and CLIPTextModel.

    Subclasses set ``config_class`` and build their layers from ``self.config`` in ``__init__(**kwargs)``.

    Memory layout: the convolutional models (both UNets, the VAE) keep their 4-D weights channels-last (NHWC), so
    their activations are channels-last too - oneDNN's native layout on CPU, measured 10-17% faster than NCHW at
    batch 1 and in bfloat16 on Stable Diffusion shapes (see the README's benchmarks), with the same kernels' rounding
    otherwise. What they return is contiguous (NCHW) as in diffusers.
    ``model.to(memory_format=torch.contiguous_format)`` switches a model back; loading and ``.to(dtype)`` keep it.
    """

    config_name = "config.json"
    weights_name = "diffusion_pytorch_model.safetensors"
    # config.json keys written by other tools that carry no architecture (diffusers/transformers bookkeeping)
    ignored_config_keys: frozenset[str] = frozenset()
    # models whose blocks call their layers through ``checkpointed`` (they hold a ``gradient_checkpointing`` flag)
    _supports_gradient_checkpointing = False
    # diffusers' modules kept in float32 whatever torch_dtype loads the rest in: none of minidiff's models has one
    _keep_in_fp32_modules: list[str] | None = None

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block layer's activations in the backward pass (see ``checkpointed``): training takes
        ~30% longer and keeps far fewer activations. Only in train mode with grad enabled; inference is unchanged."""
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing; models that do: "
                             "UNet2DModel, UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection")
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        """Keep activations again (a no-op on a model that does not support checkpointing, as in diffusers)."""
        if self._supports_gradient_checkpointing:
            self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def _set_gradient_checkpointing(self, enable: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enable

    def __getattr__(self, name: str) -> Any:
        # parameters, buffers and submodules first (nn.Module); then `model.in_channels` reads the config value
        # with a FutureWarning, as in diffusers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return config_attribute(self, name)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @staticmethod
    def _check_config(config: Any) -> None:
        """The semantic checks of a typed config (each model's own); ValueErrors naming the key."""

    @classmethod
    def config_from_file_values(cls, values: dict[str, Any], path: str) -> dict[str, Any]:
        """The constructor kwargs in a config.json, checked before any layer is built: unknown fields, values of
        the wrong type and invalid values are a one-line error naming the file and the key."""
        known = set(cls.config_class.field_names())
        values = {k: v for k, v in values.items() if not k.startswith("_") and k not in cls.ignored_config_keys}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has config field(s) {unknown} that {cls.__name__} does not know")
        try:
            cls._check_config(build_config(cls.config_class, cls.__name__, values))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path}: {error}") from None
        return values

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook for layouts that differ only by a prefix or similar (the text encoder overrides it)."""
        return state_dict

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> "ModelMixin":
        """Strictly load ``state_dict`` (checked first, so a failed load leaves the model untouched)."""
        if has_lora(self):
            raise ValueError(f"{type(self).__name__} has LoRA adapters {list_lora_adapters(self)}: call "
                             "unload_lora_weights() before loading weights into it")
        state_dict = self.convert_state_dict(state_dict)
        check_state_dict(self, state_dict, source)
        self.load_state_dict(state_dict, strict=True)
        return self

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: Any = None,
        variant: str | None = None,
        *,
        dtype: Any = None,
        device_map: Any = None,
        low_cpu_mem_usage: bool = True,
        output_loading_info: bool = False,
        use_safetensors: bool | None = None,
    ) -> "ModelMixin" | tuple["ModelMixin", dict[str, list]]:
        """Load a diffusers-layout folder: ``config.json`` + weights (single, sharded or ``variant`` files).

        diffusers' keywords: ``dtype`` is another name for ``torch_dtype``; ``device_map`` puts the whole model on
        one device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, an index, ``{"": device}``, or ``"auto"``: CUDA when present);
        ``low_cpu_mem_usage`` changes nothing (minidiff always builds without random weights, then loads every
        tensor strictly); ``output_loading_info=True`` also returns the missing/unexpected/mismatched keys, which a
        strict load leaves empty; ``use_safetensors=False`` is refused (minidiff reads safetensors only)."""
        if use_safetensors is False:
            raise ValueError("use_safetensors=False asks for pickled weights, which minidiff never loads: convert "
                             "them to safetensors")
        dtype = parse_dtype(merge_dtype_arguments(torch_dtype, dtype))
        device = device_of_map(device_map)
        del low_cpu_mem_usage  # accepted for diffusers' signature: loading is always without random init
        root = resolve_folder(pretrained_model_name_or_path)
        folder = os.path.join(root, subfolder) if subfolder else root
        config_path = os.path.join(folder, cls.config_name)
        _check_model_folder(cls, folder, config_path)
        kwargs = cls.config_from_file_values(cls.load_config(root, subfolder=subfolder), config_path)
        weights_path = find_folder_weights(folder, cls.weights_name, variant)
        state_dict = load_weights_path(weights_path, folder)
        with skip_weight_init():
            model = cls(**kwargs)
        model.load_weights(state_dict, source=weights_path)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                         torch_dtype: Any = None, **kwargs: Any) -> "ModelMixin":
        """This model out of an original (LDM layout) Stable Diffusion checkpoint file; ``config`` is an optional
        local diffusers pipeline folder whose configs to use (see minidiff.loading.single_file)."""
        from minidiff.loading.single_file import COMPONENT_OF_CLASS, load_single_file

        if cls.__name__ not in COMPONENT_OF_CLASS:
            raise TypeError(f"{cls.__name__} has no single-file layout; supported: {sorted(COMPONENT_OF_CLASS)}")
        component = COMPONENT_OF_CLASS[cls.__name__]
        return load_single_file(path, config=config, torch_dtype=torch_dtype, components=(component,), **kwargs)[component]

    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None, *,
                        max_shard_size: int | str = "10GB", safe_serialization: bool = True,
                        is_main_process: bool = True) -> None:
        """Write ``config.json`` and safetensors weights that diffusers' (or transformers') from_pretrained reads:
        one file, or shards of at most ``max_shard_size`` (``"5GB"``, ``"750KB"`` or bytes) with an index json.
        ``safe_serialization=False`` (pickled weights) is refused: minidiff never writes pickles. Only the main
        process writes (``is_main_process``, for distributed training).

        LoRA: fused adapters are saved in the weights, under the base keys (diffusers' ``fuse_lora();
        unload_lora_weights(); save_pretrained()``); adapters running unfused are refused rather than dropped."""
        check_safe_serialization(safe_serialization)
        unfused = unfused_lora_adapters(self)
        if unfused:
            raise ValueError(f"{type(self).__name__} runs LoRA adapter(s) {unfused} unfused, which its weights "
                             "cannot hold: fuse_lora() to save them baked in, unload_lora_weights() to save the base "
                             "model, or save the adapters with save_lora_weights()")
        parse_shard_size(max_shard_size)  # a bad size is refused before anything is written
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        save_weights(base_state_dict(self), os.fspath(save_directory), self.weights_name, variant, max_shard_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
