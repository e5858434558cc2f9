"""LoRA file formats: reading any of the three common layouts into one record, writing diffusers' layout.

Every format names a target by its module path, so the mapping is a rule, never a per-tensor table:

1. diffusers / peft (what ``save_lora_weights`` writes): ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``,
   ``text_encoder.text_model.<module>...`` (SDXL: ``text_encoder_2.text_model.<module>...`` too); alpha comes from
   the adapter metadata diffusers stores in the safetensors header (``lora_adapter_metadata``: JSON with
   ``unet.lora_alpha``, ``unet.alpha_pattern`` ...), else alpha = rank.
   Unprefixed ``<module>.lora_A.weight`` keys (``unet.load_attn_procs``) belong to the UNet.
2. kohya / A1111: ``lora_unet_<module path with "." replaced by "_">.lora_down.weight``, ``.lora_up.weight``,
   ``.alpha`` (``lora_te_text_model_...`` for the text encoder; SDXL: ``lora_te1_`` / ``lora_te2_`` for the two
   encoders), resolved against the model's own module names. kohya trains SDXL on Stability's SGM UNet, so SDXL
   files name UNet modules by their LDM paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k``):
   those are resolved through the single-file key rule (``minidiff.loading.single_file``), not a table.
3. attention processors (diffusers < 0.21): ``<block>.processor.to_q_lora.down.weight`` (``to_k``, ``to_v``,
   ``to_out`` -> ``to_out.0``), text encoder ``...q_proj.lora_linear_layer.down.weight``; alpha = rank.

minidiff's CLIP has no ``text_model.`` level, so that prefix is dropped for the text encoder (as diffusers does for
transformers' flattened CLIPTextModel) and put back when writing; SDXL's CLIPTextModelWithProjection keeps it, as
transformers does.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from minidiff.fileio import atomic_write
from minidiff.loading.hub import cached_snapshot
from minidiff.loading.safetensors_io import PICKLE_SUFFIXES, looks_like_pickle, require_regular_file
from minidiff.loading.single_file import unet_module_to_ldm

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"  # diffusers' default file name
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry (lora_base.py)
TEXT_MODEL_PREFIX = "text_model."
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoRAWeights:
    """One LoRA target: ``W' = W + scale * (alpha / rank) * up @ down`` (Hu et al. 2021, Eq. 3).

    ``down`` is (rank, in_features) for a Linear, (rank, in_channels, kh, kw) for a Conv2d; ``up`` is
    (out_features, rank) or (out_channels, rank, 1, 1). ``alpha`` None means alpha = rank (scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# ---------------------------------------------------------------------------------------------------------- reading

def read_lora_file(path_or_folder, weight_name: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The tensors, the safetensors header metadata and the resolved path of a LoRA file (or of ``weight_name``
    inside a folder, default ``pytorch_lora_weights.safetensors``). Pickled files are refused, never unpickled."""
    path = _resolve_lora_path(os.fspath(path_or_folder), weight_name)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"LoRA file {path} is a pickle; minidiff never unpickles: {_CONVERT_HINT}")
    require_regular_file(path, "LoRA file")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"LoRA file {path} is not a readable safetensors file{_pickle_hint(path)} ({error})") from None
    if not tensors:
        raise ValueError(f"LoRA file {path} holds no tensors")
    return tensors, metadata, path


_CONVERT_HINT = ("convert it to .safetensors where you trust it, e.g. safetensors.torch.save_file("
                 "torch.load(path, weights_only=True), 'lora.safetensors')")


def _pickle_hint(path: str) -> str:
    return f": it looks like a pickle (torch.save); {_CONVERT_HINT}" if looks_like_pickle(path) else ""


def _resolve_lora_path(path: str, weight_name: str | None) -> str:
    if not os.path.lexists(path):
        path = cached_snapshot(path) or path  # a hub id in the local Hugging Face cache, as from_pretrained reads
    if not os.path.isdir(path):
        if weight_name is not None:
            raise ValueError(f"weight_name={weight_name!r} names a file inside a folder, but {path} is not a folder; "
                             "pass the folder, or the file path alone")
        if not os.path.lexists(path):
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        return path
    if weight_name is not None:
        candidate = os.path.join(path, weight_name)
        if not os.path.lexists(candidate):
            raise FileNotFoundError(f"no {weight_name} in {path}; found {_listing(path)}")
        return candidate
    default = os.path.join(path, LORA_WEIGHT_NAME_SAFE)
    if os.path.lexists(default):
        return default
    present = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if len(present) == 1:  # diffusers too loads the only .safetensors file of a folder
        return os.path.join(path, present[0])
    raise FileNotFoundError(f"no {LORA_WEIGHT_NAME_SAFE} in {path}; found {_listing(path)}: "
                            "pass weight_name=... to choose the file")


def _listing(folder: str) -> str:
    names = sorted(name for name in os.listdir(folder) if name.endswith((".safetensors",) + PICKLE_SUFFIXES))
    return ", ".join(names) if names else "no .safetensors files"


# ---------------------------------------------------------------------------------------------------------- key rules

@dataclass(frozen=True)
class KeyRule:
    """One file layout: the regex a key of that layout matches, and how to read (component, module, role) off it."""

    name: str
    pattern: re.Pattern
    example: str


PEFT = KeyRule("diffusers/peft", re.compile(
    r"^(?:(?P<component>unet|text_encoder_2|text_encoder)\.)?(?P<module>.+)\.lora_(?P<role>A|B)\.weight$"),
    "unet.<module>.lora_A.weight / .lora_B.weight")
KOHYA = KeyRule("kohya", re.compile(
    r"^lora_(?P<component>unet|te1|te2|te)_(?P<module>[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$"),
    "lora_unet_<module_path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha")
PROCESSOR = KeyRule("attention processor", re.compile(
    r"^(?:(?P<component>unet|text_encoder_2|text_encoder)\.)?(?P<module>.+?)(?:\.processor)?"
    r"\.(?:(?P<projection>to_q|to_k|to_v|to_out)_lora|lora|lora_linear_layer)\.(?P<role>down|up)\.weight$"),
    "<block>.processor.to_q_lora.down.weight / .up.weight")
RULES = (KOHYA, PEFT, PROCESSOR)

ROLES = {"A": "down", "B": "up", "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
         "down": "down", "up": "up"}
KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
# an attention processor's projection -> the Linear it adapts (UNet Attention / CLIP self-attention)
CLIP_PROCESSOR_TARGETS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text_encoder": CLIP_PROCESSOR_TARGETS, "text_encoder_2": CLIP_PROCESSOR_TARGETS}
LDM_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class ParsedKey:
    component: str
    module: str  # as the file names it: a dotted path, or kohya's underscore name
    role: str  # "down", "up" or "alpha"


def _parse_key(rule: KeyRule, key: str) -> ParsedKey | None:
    match = rule.pattern.match(key)
    if match is None:
        return None
    groups = match.groupdict()
    component = groups["component"] or "unet"  # unprefixed keys are the UNet's, as in diffusers
    if rule is KOHYA:
        component = KOHYA_COMPONENTS[component]
    module = groups["module"]
    if groups.get("projection"):
        module = f"{module}.{PROCESSOR_TARGETS[component][groups['projection']]}"
    return ParsedKey(component, module, ROLES[groups["role"]])


def detect_format(keys: list[str], source: str) -> tuple[KeyRule, dict[str, ParsedKey]]:
    """The one layout every key follows, and each key parsed; a ValueError for unknown or mixed keys."""
    parsed_by_rule = {rule: {key: _parse_key(rule, key) for key in keys} for rule in RULES}
    matching = {rule: {k: p for k, p in parsed.items() if p is not None} for rule, parsed in parsed_by_rule.items()}
    unknown = [key for key in keys if not any(key in parsed for parsed in matching.values())]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) follow no LoRA layout, e.g. {unknown[:5]}; expected "
                         f"{_expected_patterns()} (DoRA/LoHa/LoKr and LoRA biases are not supported)")
    used = [rule for rule in RULES if matching[rule]]
    first = {rule: next(iter(matching[rule])) for rule in used}
    complete = [rule for rule in used if len(matching[rule]) == len(keys)]
    if not complete:
        examples = "; ".join(f"{rule.name}: {first[rule]!r}" for rule in used)
        raise ValueError(f"{source} mixes LoRA layouts ({examples}); one file must use one layout")
    return complete[0], matching[complete[0]]


def _expected_patterns() -> str:
    return "; ".join(f"{rule.name}: {rule.example}" for rule in RULES)


# ---------------------------------------------------------------------------------------------------------- parsing

def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, source: str,
               models: dict[str, torch.nn.Module]) -> dict[str, dict[str, LoRAWeights]]:
    """component -> module path inside ``models[component]`` -> LoRAWeights, for a file in any supported layout.

    Validated here: keys resolve to Linear/Conv2d modules, down and up pair up with one rank, alphas are positive
    numbers; ``source`` names the file in messages."""
    if not tensors:
        raise ValueError(f"{source} holds no tensors")
    rule, parsed = detect_format(list(tensors), source)
    parts = _group_parts(parsed, tensors, models, rule, source)
    adapter_config = _adapter_config(metadata, source) if rule is PEFT else {}
    unprefixed = rule is PEFT and not any(key.startswith(f"{c}.") for key in tensors for c in COMPONENTS)
    result: dict[str, dict[str, LoRAWeights]] = {}
    for (component, path), found in parts.items():
        down, up = _require_pair(found, component, path, source)
        _check_pair(down, up, f"{component}.{path}", source)
        if rule is KOHYA:
            alpha = _kohya_alpha(found.get("alpha"), f"{component}.{path}", source)
        elif rule is PEFT:
            config = adapter_config if unprefixed else _component_config(adapter_config, component)
            alpha = _peft_alpha(config, path, down.shape[0], source)
        else:
            alpha = None
        result.setdefault(component, {})[path] = LoRAWeights(down=down, up=up, alpha=alpha)
    return result


def _group_parts(parsed: dict[str, ParsedKey], tensors, models, rule: KeyRule, source: str) -> dict:
    """(component, module path) -> {"down": tensor, "up": tensor, "alpha": tensor}, names resolved by rule."""
    resolvers: dict[str, dict[str, str]] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unresolved = []
    for key, item in parsed.items():
        if item.component not in models:
            raise ValueError(f"{source} has {item.component} LoRA weights (e.g. {key!r}), but only "
                             f"{sorted(models)} can take them here")
        if item.component not in resolvers:
            resolvers[item.component] = _module_names(models[item.component], underscored=rule is KOHYA)
        path = resolvers[item.component].get(_name_in_model(item, rule, models[item.component]))
        if path is None:
            unresolved.append(key)
            continue
        found = parts.setdefault((item.component, path), {})
        if item.role in found:
            raise ValueError(f"{source}: two keys give the {item.role} weight of {item.component}.{path} "
                             f"(one is {key!r})")
        found[item.role] = tensors[key]
    if unresolved:
        raise ValueError(_unresolved_message(unresolved, rule, source))
    return parts


def _module_names(model: torch.nn.Module, underscored: bool) -> dict[str, str]:
    """Name as a file may spell it -> module path: the path itself, or (kohya) the path with "." -> "_" and, for an
    SDXL UNet, its SGM (LDM) path with "." -> "_" too."""
    names = [name for name, _ in model.named_modules() if name]
    spelled = {name.replace(".", "_") if underscored else name: name for name in names}
    if underscored and getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time":
        spelled.update({sgm.replace(".", "_"): name for name, sgm in _sgm_paths(model).items()})
    return spelled


def _sgm_paths(unet: torch.nn.Module) -> dict[str, str]:
    """Module path -> SGM path of each module holding a weight (or a LoRA layer around one), e.g.
    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``."""
    to_sgm = unet_module_to_ldm(unet)
    inside_lora = re.compile(r"\.(base_layer|adapters)(\.|$)")
    return {name: to_sgm(name) for name, module in unet.named_modules()
            if name and not inside_lora.search(name)
            and (isinstance(getattr(module, "weight", None), torch.nn.Parameter) or hasattr(module, "base_layer"))}


def _name_in_model(item: ParsedKey, rule: KeyRule, model: torch.nn.Module) -> str:
    """The file's module name without transformers' ``text_model.`` level (``text_model_`` for kohya) when the model
    has none (minidiff's CLIPTextModel; CLIPTextModelWithProjection keeps ``text_model``)."""
    if not item.component.startswith("text_encoder") or "text_model" in dict(model.named_children()):
        return item.module
    prefix = TEXT_MODEL_PREFIX.replace(".", "_") if rule is KOHYA else TEXT_MODEL_PREFIX
    return item.module.removeprefix(prefix)


def _unresolved_message(keys: list[str], rule: KeyRule, source: str) -> str:
    hint = f"expected {rule.example}, the module path being one of the model's named_modules()"
    if rule is KOHYA:
        hint += " with '.' replaced by '_' (e.g. lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q)"
        if any(block in key for key in keys for block in LDM_BLOCK_NAMES):
            hint += "; LDM/SGM block names (input_blocks/middle_block/output_blocks, used by SDXL kohya files) " \
                    "are read for SDXL UNets only: SD1/SD2 kohya files use the diffusers names"
    return f"{source}: {len(keys)} key(s) match no module of the model, e.g. {keys[:5]}; {hint}"


def _require_pair(found: dict, component: str, path: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    for role, other in (("down", "up"), ("up", "down")):
        if role not in found:
            present = f"a {other} weight" if other in found else "an alpha"
            raise ValueError(f"{source}: {component}.{path} has {present} but no {role} weight; a LoRA "
                             "target needs both (lora_A/lora_down/down and lora_B/lora_up/up)")
    return found["down"], found["up"]


def _check_pair(down: torch.Tensor, up: torch.Tensor, name: str, source: str) -> None:
    """down (r, ...) and up (out, r, ...) share the rank r. (Whether the target is a Linear/Conv2d and they fit its
    sizes is checked where the adapter is added, ``minidiff.adapters.lora.check_lora_fits``.)"""
    if down.ndim < 2 or up.ndim < 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"{source}: rank mismatch at {name}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                         "must be (r, ...) and (out, r, ...) with the same r")


# ---------------------------------------------------------------------------------------------------------- alpha

def _check_alpha(value, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: alpha of {where} must be a positive number, got {value!r}")
    return float(value)


def _kohya_alpha(alpha: torch.Tensor | None, name: str, source: str) -> float | None:
    """kohya's ``.alpha`` scalar; absent means alpha = rank (kohya's own default)."""
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise ValueError(f"{source}: alpha of {name} must be a scalar, got shape {tuple(alpha.shape)}")
    return _check_alpha(alpha.item(), name, source)


def _adapter_config(metadata: dict[str, str] | None, source: str) -> dict:
    """diffusers' ``lora_adapter_metadata`` header entry: a JSON object of ``<component>.<LoraConfig field>``."""
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: the {LORA_ADAPTER_METADATA_KEY} header entry is not valid JSON "
                         f"({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the {LORA_ADAPTER_METADATA_KEY} header entry must be a JSON object, "
                         f"got a {type(config).__name__}")
    return config


def _component_config(config: dict, component: str) -> dict:
    prefix = f"{component}."
    return {key.removeprefix(prefix): value for key, value in config.items() if key.startswith(prefix)}


def _peft_alpha(config: dict, path: str, rank: int, source: str) -> float | None:
    """alpha as peft's LoraConfig gives it to ``path``: the first ``alpha_pattern`` entry matching the end of the
    module path (peft's ``get_pattern_key`` rule), else ``lora_alpha``; no metadata means alpha = rank.
    ``use_rslora`` scales by alpha / sqrt(r) (Kalajdzievski 2023), i.e. alpha * sqrt(r) / r."""
    if config.get("use_dora"):
        raise ValueError(f"{source}: DoRA adapters (use_dora=true in {LORA_ADAPTER_METADATA_KEY}) are not supported")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{source}: alpha_pattern in {LORA_ADAPTER_METADATA_KEY} must be an object of module "
                         f"pattern -> alpha, got a {type(patterns).__name__}")
    key = next((pattern for pattern in patterns if _matches_end(pattern, path, source)), None)
    alpha = patterns[key] if key is not None else config.get("lora_alpha")
    if alpha is None:
        return None
    alpha = _check_alpha(alpha, path, source)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _matches_end(pattern: str, path: str, source: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({pattern})$", path) is not None
    except re.error as error:
        raise ValueError(f"{source}: alpha_pattern key {pattern!r} is not a valid regular expression ({error})") from None


# ---------------------------------------------------------------------------------------------------------- writing

def write_lora_file(save_directory, weight_name: str | None, layers: dict[str, dict[str, torch.Tensor]],
                    adapter_metadata: dict[str, dict | None]) -> str:
    """Write diffusers' LoRA file (as ``save_lora_weights`` does): every tensor under ``<component>.`` (the text
    encoder's under transformers' ``text_model.`` names), the adapter configs as JSON in the header. Returns the path.

    ``layers``: component -> peft-named tensors (``<module>.lora_A.weight``, ``<module>.lora_B.weight``);
    ``adapter_metadata``: component -> LoraConfig fields (``r``, ``lora_alpha``, ``alpha_pattern`` ...) or None."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory} is a file; pass a folder")
    unknown = sorted((set(layers) | set(adapter_metadata)) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown LoRA component(s) {unknown}; accepted: {list(COMPONENTS)}")
    tensors = {}
    for component, state in layers.items():
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{component} LoRA layer {key!r} must be a tensor, got {type(tensor).__name__}")
            tensors[file_key(component, key)] = tensor.detach().to("cpu").contiguous().clone()
    if not tensors:
        raise ValueError("no LoRA layers to save: pass unet_lora_layers and/or text_encoder_lora_layers "
                         "(SDXL: text_encoder_2_lora_layers)")
    header = {"format": "pt"}
    packed = {f"{component}.{field}": value for component, config in adapter_metadata.items() if config
              for field, value in config.items()}
    if packed:
        packed = {key: sorted(value) if isinstance(value, set) else value for key, value in packed.items()}
        try:
            header[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        except TypeError as error:
            raise TypeError(f"the LoRA adapter metadata must be JSON values (numbers, strings, lists, objects): "
                            f"{error}") from None
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, weight_name or LORA_WEIGHT_NAME_SAFE)
    payload = save(tensors, metadata=header)
    atomic_write(path, lambda handle: handle.write(payload))
    return path


def file_key(component: str, key: str) -> str:
    if component == "text_encoder" and not key.startswith(TEXT_MODEL_PREFIX):
        key = TEXT_MODEL_PREFIX + key
    return f"{component}.{key}"
