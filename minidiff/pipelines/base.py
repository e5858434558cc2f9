"""DiffusionPipeline: a bag of named components plus folder I/O in diffusers' layout (model_index.json).

A pipeline folder holds one subfolder per component (unet/, vae/, text_encoder/, tokenizer/, scheduler/) and a
``model_index.json`` naming each component's class. minidiff reads the folders diffusers writes and writes folders
diffusers reads. Components diffusers pipelines carry but minidiff does not run (safety_checker, feature_extractor,
image_encoder) are skipped when loading.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from minidiff.loading.components import component_class
from minidiff.loading.hub import resolve_folder
from minidiff.loading.safetensors_io import read_json_object
from minidiff.models.modeling import check_safe_serialization, merge_dtype_arguments
from minidiff.pipelines.images import numpy_to_pil

SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def read_model_index(folder: str) -> tuple[str, dict[str, Any]]:
    """The path and contents of ``folder``/model_index.json: a JSON object, or a ValueError naming the file."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.lexists(index_path):
        looks_like = " (it has a config.json: a single model folder, load it with that model's from_pretrained)"
        raise FileNotFoundError(
            f"{index_path} does not exist: a pipeline folder needs model_index.json"
            f"{looks_like if os.path.isfile(os.path.join(folder, 'config.json')) else ''} "
            "(for a single .safetensors/.ckpt checkpoint use from_single_file)"
        )
    return index_path, read_json_object(index_path, "model_index.json",
                                        "a JSON object of component -> [library, class]")


def entry_class_name(index_path: str, name: str, entry: Any) -> str | None:
    """The class name of one model_index.json entry ``[library, class]`` (None: the component is absent)."""
    if entry is None:
        return None
    if not isinstance(entry, list) or len(entry) != 2 or not all(i is None or isinstance(i, str) for i in entry):
        raise ValueError(f"{index_path}: the {name!r} entry is {entry!r}; it must be [library, class name] "
                         'such as ["diffusers", "UNet2DConditionModel"] (or [null, null] for none)')
    return entry[1]


class DiffusionPipeline:
    """Base of every pipeline. Subclasses list their ``component_names`` and write ``__call__``."""

    component_names: tuple[str, ...] = ()
    optional_components: tuple[str, ...] = ()

    def __init__(self, **components: Any) -> None:
        missing = [n for n in self.component_names if components.get(n) is None and n not in self.optional_components]
        unknown = sorted(set(components) - set(self.component_names))
        if missing or unknown:
            raise TypeError(
                f"{type(self).__name__} needs components {list(self.component_names)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for name in self.component_names:
            setattr(self, name, components.get(name))
        self._progress_bar_config: dict[str, Any] = {}

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.component_names}

    def _modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        modules = self._modules()
        return next(modules[0].parameters()).device if modules else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        modules = self._modules()
        return next(modules[0].parameters()).dtype if modules else torch.float32

    def to(self, *args: Any, **kwargs: Any) -> "DiffusionPipeline":
        """Move every model to a device and/or dtype: ``pipe.to("cpu")``, ``pipe.to(torch.bfloat16)``."""
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    # ---- memory -----------------------------------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Compute the UNet's attention in query chunks (the ``chunked`` backend) so memory stays bounded:
        ``slice_size`` query rows per chunk, or sized to a score budget for ``"auto"``/``"max"``/None."""
        chunk = None if slice_size in ("auto", "max", None) else int(slice_size)
        self.unet.enable_attention_slicing(chunk)

    def disable_attention_slicing(self) -> None:
        self.unet.disable_attention_slicing()

    # ---- progress bars ----------------------------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for tqdm, e.g. ``disable=True`` to silence the bars."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total=None):
        return tqdm(iterable, total=total, **self._progress_bar_config)

    numpy_to_pil = staticmethod(numpy_to_pil)

    # ---- folders ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant: str | None = None, *,
                        dtype: Any = None, device_map: Any = None, low_cpu_mem_usage: bool = True,
                        use_safetensors: bool | None = None, **overrides):
        """Load every component from a diffusers pipeline folder; pass ``name=object`` to supply one yourself.
        Pipeline-level values of model_index.json (``cls.config_names``, e.g. SDXL's force_zeros_for_empty_prompt)
        go to the pipeline's __init__; a keyword argument of the same name overrides the file's value.

        As in diffusers: ``torch_dtype`` (or ``dtype``) is a dtype or a dict ``{component: dtype, "default": dtype}``;
        ``variant`` loads ``*.<variant>.safetensors`` weights; ``device_map`` puts every model on one device (see
        ModelMixin.from_pretrained, which also describes ``low_cpu_mem_usage`` and ``use_safetensors``)."""
        dtypes = merge_dtype_arguments(torch_dtype, dtype)
        folder = resolve_folder(pretrained_model_name_or_path)
        index_path, index = read_model_index(folder)
        config_names = getattr(cls, "config_names", ())
        config = {key: overrides.pop(key) if key in overrides else index[key]
                  for key in config_names if key in overrides or key in index}
        classes = {}  # check every entry before loading anything
        for name in cls.component_names:
            if name in overrides:
                continue
            class_name = entry_class_name(index_path, name, index.get(name))
            if class_name is None:
                if name in cls.optional_components:
                    continue
                saved_as = index.get("_class_name")
                other = isinstance(saved_as, str) and saved_as != cls.__name__
                hint = f" (the folder holds a {saved_as}: load it with that class)" if other else ""
                raise ValueError(f"{index_path} has no entry for the {name!r} component {cls.__name__} needs{hint}")
            classes[name] = component_class(name, class_name, index_path)
        for name in classes:
            if not os.path.isdir(os.path.join(folder, name)):
                raise FileNotFoundError(f"{index_path} lists {name!r} but {os.path.join(folder, name)} is not a "
                                        f"folder; restore it or pass {name}=... to from_pretrained")
        if variant is not None:
            check_variant_present(folder, [name for name in classes if not name.startswith(TOKENIZER_OR_SCHEDULER)],
                                  variant)
        components = {name: overrides.pop(name) for name in cls.component_names if name in overrides}
        model_options = dict(variant=variant, device_map=device_map, low_cpu_mem_usage=low_cpu_mem_usage,
                             use_safetensors=use_safetensors)
        for name, component_cls in classes.items():
            if name.startswith(TOKENIZER_OR_SCHEDULER):
                components[name] = component_cls.from_pretrained(folder, subfolder=name)
            else:
                components[name] = component_cls.from_pretrained(folder, subfolder=name, **model_options,
                                                                 torch_dtype=component_dtype(dtypes, name))
        if overrides:
            raise TypeError(f"unknown components {sorted(overrides)}; {cls.__name__} has {list(cls.component_names)}")
        return cls(**components, **config)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None) -> None:
        """Write each component to its subfolder plus model_index.json (diffusers' layout). Models take ``variant``
        (``*.fp16.safetensors``) and ``max_shard_size`` (see ModelMixin.save_pretrained); ``safe_serialization=False``
        is refused: minidiff never writes pickles."""
        check_safe_serialization(safe_serialization)
        model_options = {"variant": variant, **({} if max_shard_size is None else {"max_shard_size": max_shard_size})}
        os.makedirs(save_directory, exist_ok=True)
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": "0.42.1"}
        for name, component in self.components.items():
            if component is None:
                index[name] = [None, None]
                continue
            library = "transformers" if name.startswith(("text_encoder", "tokenizer")) else "diffusers"
            index[name] = [library, type(component).__name__]
            options = model_options if isinstance(component, torch.nn.Module) else {}
            component.save_pretrained(os.path.join(os.fspath(save_directory), name), **options)
        for name in SKIPPED_COMPONENTS[:2]:
            index[name] = [None, None]
        index["requires_safety_checker"] = False
        for key in getattr(self, "config_names", ()):  # pipeline-level values diffusers keeps in model_index.json
            index[key] = getattr(self, key)
        with open(os.path.join(save_directory, "model_index.json"), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)


TOKENIZER_OR_SCHEDULER = ("tokenizer", "scheduler")
MODEL_LOAD_OPTIONS = ("dtype", "device_map", "low_cpu_mem_usage", "use_safetensors")  # keywords of from_pretrained


def component_dtype(dtypes: Any, name: str) -> Any:
    """The dtype for component ``name``: ``dtypes`` itself, or its entry (or ``"default"``) when it is a dict."""
    if isinstance(dtypes, dict):
        return dtypes.get(name, dtypes.get("default"))
    return dtypes


def check_variant_present(folder: str, model_names: list[str], variant: str) -> None:
    """A ``variant`` that none of the model folders has is an error naming what the folders hold (diffusers' text)."""
    found = {name: sorted(os.listdir(os.path.join(folder, name))) for name in model_names}
    if not any(f".{variant}." in file for files in found.values() for file in files):
        weights = {name: [f for f in files if f.endswith(".safetensors")] for name, files in found.items()}
        raise ValueError(f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                         f"files are available in {folder}: the model folders hold {weights}; pass the variant "
                         "they were saved with, or variant=None")
