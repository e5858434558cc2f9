"""LoRA parity: the three file layouts, built here from one set of peft numbers on seeded tiny SD1 and SD2 models.

peft draws the LoRA numbers (``add_adapter(LoraConfig(..., init_lora_weights=False))``) on diffusers' UNet and
transformers' CLIP; diffusers writes them in its own format (``save_lora_weights`` with the adapter metadata); the
kohya and attention-processor files are written below from the same numbers. minidiff (unfused and fused) is
compared with diffusers (``load_lora_weights`` + ``fuse_lora``) on a UNet forward, a text-encoder forward and a
2-step txt2img image, and minidiff's fused weights with the closed form ``W + scale * (alpha / r) * up @ down``.

diffusers 0.42 cannot be the reference for two of the files, so they are compared with the same numbers loaded by
diffusers from its own format: kohya files whose attention projections have different ``.alpha`` values (diffusers
builds an ``alpha_pattern`` from processor-style names that match no module, so those layers get the common alpha),
and the processor layout through ``unet.load_attn_procs`` (diffusers' load_attn_procs reads Custom Diffusion files
only; its load_lora_weights reads the layout when the keys carry the ``unet.`` prefix, and ignores it without).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import diffusers
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import minidiff
from minidiff.adapters.lora import lora_adapter_metadata, lora_state_dict
from parity.pipeline_fixtures import save_reference_pipeline
from parity.report import compare, compare_exact

UNET_LORA = dict(r=2, lora_alpha=4, alpha_pattern={"attn2.to_v": 1.0, "conv1": 3.0},
                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1",
                                 "conv_shortcut", "conv"])  # "conv": the 3x3 (stride 2) down/upsampler convs
TEXT_LORA = dict(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
SECOND_UNET_LORA = dict(r=3, lora_alpha=1.5, target_modules=["to_q", "to_v", "proj_out", "conv2"])
PROCESSOR_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
PROMPT = "a red circle on a blue background"
TOLERANCES = {"UNet": (1e-5, "rel"), "text encoder": (1e-5, "rel"), "txt2img": (1e-4, "abs")}
WEIGHT_TOL = 1e-6


@dataclass
class LoRACase:
    """One tiny model family (SD1: 1x1-conv proj_in/out, SD2: Linear ones) with its LoRA files."""

    name: str
    folder: object  # the saved base pipeline
    numbers: dict = field(default_factory=dict)  # component -> module path -> (down, up, alpha)
    second: dict = field(default_factory=dict)  # a second UNet adapter: module path -> (down, up, alpha)
    files: dict = field(default_factory=dict)  # layout -> file path
    base: dict = field(default_factory=dict)  # minidiff's outputs without LoRA
    base_weights: dict = field(default_factory=dict)
    pipelines: dict = field(default_factory=dict)  # library -> the base pipeline, loaded once and copied per test
    reference_runs: dict = field(default_factory=dict)  # (files, fuse) -> diffusers' outputs, computed once


# ---------------------------------------------------------------------------------------------------------- numbers

def add_peft_adapter(model, config: dict, seed: int) -> tuple[dict, dict]:
    """peft's random LoRA on ``model``: its state dict (``<module>.lora_A.weight`` ...) and module -> (down, up,
    alpha) with alpha read back from peft's own ``scaling`` (alpha / r) of each layer."""
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(**config, init_lora_weights=False), adapter_name="drawn")
    state = get_peft_model_state_dict(model, adapter_name="drawn")
    state = {key: value.detach().clone() for key, value in state.items()}
    numbers = {}
    for path, module in model.named_modules():
        if "drawn" in getattr(module, "scaling", {}):
            alpha = module.scaling["drawn"] * module.r["drawn"]
            numbers[path] = (state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"], alpha)
    return state, numbers


def adapter_metadata(config: dict) -> dict:
    """The LoraConfig fields diffusers' training scripts store as ``*_lora_adapter_metadata``."""
    return {key: config[key] for key in ("r", "lora_alpha", "alpha_pattern", "target_modules") if key in config}


def write_diffusers_file(folder, name: str, unet_state: dict, unet_config: dict, text_state=None, text_config=None):
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state, weight_name=name,
        unet_lora_adapter_metadata=adapter_metadata(unet_config),
        text_encoder_lora_adapter_metadata=adapter_metadata(text_config) if text_config else None)
    return folder / name


def write_kohya_file(path, numbers: dict) -> str:
    """kohya's names: the module path with "." -> "_" after ``lora_unet_`` / ``lora_te_text_model_``."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    tensors = {}
    for component, modules in numbers.items():
        for module_path, (down, up, alpha) in modules.items():
            name = prefixes[component] + module_path.replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(float(alpha))}
    save_file(tensors, path)
    return str(path)


def one_alpha(numbers: dict) -> dict:
    """The UNet and text-encoder numbers with ``lora_alpha`` for every module (a file diffusers reads right)."""
    return {component: {path: (down, up, UNET_LORA["lora_alpha"]) for path, (down, up, _) in numbers[component].items()}
            for component in ("unet", "text_encoder")}


def processor_numbers(numbers: dict) -> dict:
    """The attention projections of the UNet numbers, alpha = rank (the processor layout carries no alpha)."""
    return {path: (down, up, down.shape[0]) for path, (down, up, _) in numbers["unet"].items()
            if path.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or path.endswith("to_out.0")}


def write_processor_file(path, numbers: dict, prefix: str) -> str:
    tensors = {}
    for module_path, (down, up, _) in numbers.items():
        projection = next(p for p in PROCESSOR_PROJECTIONS if module_path.endswith("." + p))
        block = module_path.removesuffix("." + projection)
        key = f"{prefix}{block}.processor.{PROCESSOR_PROJECTIONS[projection]}_lora"
        tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
    save_file(tensors, path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------- running

SAMPLE = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
HIDDEN = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(6))
TOKEN_IDS = torch.tensor([[49406, 320, 736, 2866, 525, 320, 1746, 49407]])


def run(pipe, scale: float | None = None) -> dict[str, torch.Tensor]:
    """UNet forward, text-encoder forward and a 2-step image; ``scale`` goes in as cross_attention_kwargs."""
    kwargs = None if scale is None else {"scale": scale}
    with torch.no_grad():
        unet = pipe.unet(SAMPLE, 10, encoder_hidden_states=HIDDEN, cross_attention_kwargs=kwargs).sample
        text = pipe.text_encoder(TOKEN_IDS)[0]
    image = pipe(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), cross_attention_kwargs=kwargs).images
    return {"UNet": unet, "text encoder": text, "txt2img": image}


def compare_runs(case: str, ours: dict, theirs: dict) -> None:
    for part, (tol, metric) in TOLERANCES.items():
        compare("LoRA", f"{case}: {part}", ours[part], theirs[part], tol, metric)


def base_pipe(case: LoRACase, library):
    """A fresh pipeline of ``library`` (diffusers or minidiff) on the saved base components: copies of the UNet, text
    encoder and scheduler, the VAE and tokenizer shared (LoRA never touches them; copying a tokenizer is slow)."""
    if library not in case.pipelines:
        case.pipelines[library] = library.StableDiffusionPipeline.from_pretrained(case.folder)
    components = dict(case.pipelines[library].components)
    for name in ("unet", "text_encoder", "scheduler"):
        components[name] = copy.deepcopy(components[name])
    pipe = library.StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipe(case: LoRACase, *files, fuse: float | None = None):
    pipe = base_pipe(case, diffusers)
    for index, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=f"adapter_{index}")
    if fuse is not None:
        pipe.fuse_lora(lora_scale=fuse)
    return pipe


def reference_run(case: LoRACase, *files, fuse: float = 1.0) -> dict:
    """diffusers' outputs with ``files`` loaded and fused (each combination computed once per model family)."""
    key = (files, fuse)
    if key not in case.reference_runs:
        case.reference_runs[key] = run(diffusers_pipe(case, *files, fuse=fuse))
    return case.reference_runs[key]


def minidiff_pipe(case: LoRACase, *files):
    pipe = base_pipe(case, minidiff)
    for index, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=f"adapter_{index}")
    return pipe


def weight_of(model, path: str) -> torch.Tensor:
    module = model.get_submodule(path)
    return getattr(module, "base_layer", module).weight.detach()


def compare_closed_form(case: LoRACase, label: str, pipe, numbers: dict, scale: float = 1.0) -> None:
    """Fused weights against ``W + scale * (alpha / r) * up @ down`` in float64, every target at once."""
    ours, expected = [], []
    for component, modules in numbers.items():
        model = getattr(pipe, component)
        for path, (down, up, alpha) in modules.items():
            base = case.base_weights[component][path].double()
            delta = up.double().flatten(1) @ down.double().flatten(1)  # (out, r) @ (r, in*kh*kw)
            expected.append((base + scale * alpha / down.shape[0] * delta.reshape(base.shape)).flatten())
            ours.append(weight_of(model, path).flatten())
    compare("LoRA", f"{case.name} {label}: fused weights vs W + s(alpha/r) up@down", torch.cat(ours),
            torch.cat(expected), WEIGHT_TOL)


# ---------------------------------------------------------------------------------------------------------- fixture

@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """Tiny models run far faster single-threaded, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["SD1", "SD2"])
def case(request, tmp_path_factory) -> LoRACase:
    tmp = tmp_path_factory.mktemp(f"lora_{request.param}")
    drawn, folder = save_reference_pipeline(tmp, sd2=request.param == "SD2")
    case = LoRACase(request.param, folder)
    unet_state, case.numbers["unet"] = add_peft_adapter(drawn.unet, UNET_LORA, seed=10)
    text_state, case.numbers["text_encoder"] = add_peft_adapter(drawn.text_encoder, TEXT_LORA, seed=11)
    second_state, case.second = add_peft_adapter(base_pipe(case, diffusers).unet, SECOND_UNET_LORA, seed=12)
    case.files = {
        "diffusers": write_diffusers_file(tmp / "lora", "diffusers.safetensors", unet_state, UNET_LORA, text_state,
                                          TEXT_LORA),
        "second": write_diffusers_file(tmp / "lora", "second.safetensors", second_state, SECOND_UNET_LORA),
        "kohya": write_kohya_file(tmp / "lora" / "kohya.safetensors", case.numbers),
        "kohya, one alpha": write_kohya_file(tmp / "lora" / "kohya_one_alpha.safetensors", one_alpha(case.numbers)),
        "processor": write_processor_file(tmp / "lora" / "processor.safetensors",
                                          processor_numbers(case.numbers), prefix=""),
        "processor with unet. prefix": write_processor_file(tmp / "lora" / "processor_unet.safetensors",
                                                            processor_numbers(case.numbers), prefix="unet."),
    }
    base = minidiff_pipe(case)
    case.base = run(base)
    targets = {"unet": [*case.numbers["unet"], *case.second], "text_encoder": list(case.numbers["text_encoder"])}
    case.base_weights = {component: {path: weight_of(getattr(base, component), path).clone() for path in paths}
                         for component, paths in targets.items()}
    return case


# ---------------------------------------------------------------------------------------------------------- cases

def test_diffusers_file_unfused_and_fused_vs_diffusers_fused(case):
    theirs = reference_run(case, case.files["diffusers"])
    mine = minidiff_pipe(case, case.files["diffusers"])
    unfused = run(mine)
    compare_runs(f"{case.name} diffusers file, unfused vs diffusers fused", unfused, theirs)
    mine.fuse_lora()
    fused = run(mine)
    compare_runs(f"{case.name} diffusers file, fused vs diffusers fused", fused, theirs)
    compare_runs(f"{case.name} diffusers file, minidiff unfused vs fused", unfused, fused)
    compare_closed_form(case, "diffusers file", mine, case.numbers)


def test_kohya_file_vs_diffusers_on_the_same_numbers(case):
    theirs = reference_run(case, case.files["diffusers"])
    mine = minidiff_pipe(case, case.files["kohya"])
    compare_runs(f"{case.name} kohya file (per-module alphas), unfused vs diffusers fused", run(mine), theirs)
    mine.fuse_lora()
    compare_runs(f"{case.name} kohya file, fused vs diffusers fused", run(mine), theirs)
    compare_closed_form(case, "kohya file", mine, case.numbers)


def test_kohya_file_read_by_diffusers_itself(case):
    """With one alpha for all modules diffusers' own kohya reader applies the file as written: a check of the name
    rule against diffusers' conversion (lora_conversion_utils), on attention, proj, conv and text-encoder layers."""
    theirs = reference_run(case, case.files["kohya, one alpha"])
    mine = minidiff_pipe(case, case.files["kohya, one alpha"])
    compare_runs(f"{case.name} kohya file (one alpha), unfused vs diffusers' kohya reader fused", run(mine), theirs)
    mine.fuse_lora()
    compare_closed_form(case, "kohya file (one alpha)", mine, one_alpha(case.numbers))


def test_attention_processor_file_through_load_attn_procs(case):
    folder, name = case.files["processor"].rsplit("/", 1)
    theirs = reference_run(case, case.files["processor with unet. prefix"])
    mine = minidiff_pipe(case)
    mine.unet.load_attn_procs(folder, weight_name=name)  # the 2023 tutorial line
    compare_runs(f"{case.name} processor file via unet.load_attn_procs vs diffusers fused", run(mine), theirs)
    mine.fuse_lora()
    compare_closed_form(case, "processor file", mine, {"unet": processor_numbers(case.numbers)})
    prefixed = minidiff_pipe(case, case.files["processor with unet. prefix"])
    compare_runs(f"{case.name} processor file (unet. prefix) via load_lora_weights vs diffusers fused",
                 run(prefixed), theirs)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_scales_per_call_and_fused(case, scale):
    mine = minidiff_pipe(case, case.files["diffusers"])
    theirs = diffusers_pipe(case, case.files["diffusers"])
    per_call = run(mine, scale)
    compare_runs(f"{case.name} cross_attention_kwargs scale={scale} vs diffusers", per_call, run(theirs, scale))
    if scale == 0.0:  # (the text encoder's own forward takes no scale: encode_prompt applies it, in txt2img)
        for part in ("UNet", "txt2img"):
            compare_exact("LoRA", f"{case.name} scale=0 equals the base model: {part}", per_call[part], case.base[part])
    mine.fuse_lora(lora_scale=scale)
    theirs.fuse_lora(lora_scale=scale)
    compare_runs(f"{case.name} fuse_lora(lora_scale={scale}) vs diffusers", run(mine), run(theirs))
    compare_closed_form(case, f"fuse_lora(lora_scale={scale})", mine, case.numbers, scale)


def test_two_adapters_with_weights(case):
    files = (case.files["diffusers"], case.files["second"])
    mine, theirs = minidiff_pipe(case, *files), diffusers_pipe(case, *files)
    for pipe in (mine, theirs):
        pipe.set_adapters(["adapter_0", "adapter_1"], [0.7, -0.4])
    compare_runs(f"{case.name} two adapters, set_adapters weights 0.7/-0.4 vs diffusers", run(mine), run(theirs))
    for pipe in (mine, theirs):
        pipe.fuse_lora()
    compare_runs(f"{case.name} two adapters fused vs diffusers fused", run(mine), run(theirs))


def test_unload_gives_bit_identical_base_outputs(case):
    mine = minidiff_pipe(case, case.files["diffusers"], case.files["kohya"])
    assert not torch.equal(run(mine)["UNet"], case.base["UNet"])
    mine.unload_lora_weights()
    after = run(mine)
    for part in TOLERANCES:
        compare_exact("LoRA", f"{case.name} unload_lora_weights gives the base outputs: {part}", after[part],
                      case.base[part])


def test_fuse_unfuse_restores_weights(case):
    mine = minidiff_pipe(case, case.files["diffusers"], case.files["second"])
    mine.set_adapters(["adapter_0", "adapter_1"], [1.0, 0.5])
    mine.fuse_lora(lora_scale=0.8)
    mine.unfuse_lora()
    ours = torch.cat([weight_of(getattr(mine, component), path).flatten()
                      for component, modules in case.base_weights.items() for path in modules])
    base = torch.cat([weight.flatten() for modules in case.base_weights.values() for weight in modules.values()])
    compare("LoRA", f"{case.name} fuse_lora then unfuse_lora restores the weights (abs)", ours, base, WEIGHT_TOL, "abs")


def test_minidiff_save_lora_weights_loads_in_diffusers(case, tmp_path):
    """The training workflow: the adapter's tensors and LoraConfig fields (lora_state_dict, lora_adapter_metadata)
    written by save_lora_weights, then read by diffusers."""
    mine = minidiff_pipe(case, case.files["kohya"])
    minidiff.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=lora_state_dict(mine.unet, "adapter_0"),
        text_encoder_lora_layers=lora_state_dict(mine.text_encoder, "adapter_0"),
        unet_lora_adapter_metadata=lora_adapter_metadata(mine.unet, "adapter_0"),
        text_encoder_lora_adapter_metadata=lora_adapter_metadata(mine.text_encoder, "adapter_0"))
    theirs = reference_run(case, tmp_path / "pytorch_lora_weights.safetensors")
    compare_runs(f"{case.name} minidiff save_lora_weights loaded by diffusers (fused) vs minidiff", run(mine), theirs)
