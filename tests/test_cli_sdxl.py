"""`minidiff generate|img2img|inpaint --model PATH` on SDXL: a folder (model_index.json / text_encoder_2) or an SGM
single file runs the command's SDXL pipeline and gives the API's image; --lora works there; edit and
--prompt-weighting on SDXL stop with one line."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import minidiff
from minidiff import cli
from minidiff.loading import builtin_configs
from minidiff.loading.single_file import is_sdxl_model, save_single_file
from tests.tiny_components import tiny_pipeline, tiny_sdxl_components

PROMPT = "a red circle"
FLAGS = ["--prompt", PROMPT, "--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL pipeline, saved as a diffusers folder and as an SGM single file."""
    folder = tmp_path_factory.mktemp("sdxl-cli")
    pipe = minidiff.StableDiffusionXLPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    save_single_file(folder / "sdxl.safetensors", unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                     text_encoder_2=pipe.text_encoder_2)
    return pipe, folder


def api_image(pipe, **kwargs) -> np.ndarray:
    """What the command computes with FLAGS (guidance 7.5, the seed's CPU generator), as uint8 pixels."""
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                 **kwargs).images[0]
    return np.asarray(image)


def run_cli(*args) -> int:
    return cli.main([*args, *FLAGS])


def test_sdxl_folder_and_file_are_detected(sdxl, tmp_path):
    _, folder = sdxl
    assert is_sdxl_model(folder / "pipe") and is_sdxl_model(folder / "sdxl.safetensors")
    tiny_pipeline(minidiff.StableDiffusionPipeline).save_pretrained(tmp_path / "sd")
    assert not is_sdxl_model(tmp_path / "sd") and not is_sdxl_model(tmp_path / "notes.txt")


def test_a_cached_hub_id_of_an_sdxl_model_runs_the_sdxl_pipeline(sdxl, tmp_path, monkeypatch, capsys):
    pipe, folder = sdxl
    repo = tmp_path / "hub" / "models--org--tiny-sdxl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "abc123").symlink_to(folder / "pipe")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert is_sdxl_model("org/tiny-sdxl") and not is_sdxl_model("org/not-cached")
    out = tmp_path / "hub.png"
    assert run_cli("generate", "--model", "org/tiny-sdxl", "--height", "32", "--width", "32",
                   "--output", str(out)) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(PIL.Image.open(out)), api_image(pipe, height=32, width=32))


def test_generate_and_img2img_on_an_sdxl_folder_give_the_apis_images(sdxl, tmp_path, capsys):
    pipe, folder = sdxl
    out = tmp_path / "g.png"
    assert run_cli("generate", "--model", str(folder / "pipe"), "--height", "32", "--width", "32",
                   "--output", str(out)) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(PIL.Image.open(out)), api_image(pipe, height=32, width=32))
    image = tmp_path / "in.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    out = tmp_path / "i.png"
    assert run_cli("img2img", "--model", str(folder / "pipe"), "--image", str(image), "--strength", "0.5",
                   "--output", str(out)) == 0, capsys.readouterr().err
    img2img = minidiff.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    expected = api_image(img2img, image=PIL.Image.open(image), strength=0.5)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), expected)


def test_inpaint_on_an_sdxl_folder_gives_the_apis_image(sdxl, tmp_path, capsys):
    pipe, folder = sdxl
    image, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "p.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    pixels = np.zeros((32, 32), np.uint8)
    pixels[:, :16] = 255
    PIL.Image.fromarray(pixels).save(mask)
    assert run_cli("inpaint", "--model", str(folder / "pipe"), "--image", str(image), "--mask", str(mask),
                   "--height", "32", "--width", "32", "--output", str(out)) == 0, capsys.readouterr().err
    inpaint = minidiff.StableDiffusionXLInpaintPipeline(**pipe.components)
    expected = api_image(inpaint, image=PIL.Image.open(image), mask_image=PIL.Image.open(mask), height=32, width=32)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), expected)


def test_generate_on_an_sdxl_single_file_uses_the_builtin_sdxl_config(sdxl, tmp_path, monkeypatch, capsys):
    """The command has no config folder: the built-in SDXL configs are used (made tiny here, as the file is)."""
    pipe, folder = sdxl
    tiny = {name: getattr(pipe, name).config.to_dict() for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    tiny = {name: {k: v for k, v in config.items() if not k.startswith("_")} for name, config in tiny.items()}
    monkeypatch.setitem(builtin_configs.VARIANTS, "sdxl", dict(builtin_configs.VARIANTS["sdxl"], **tiny))
    out = tmp_path / "f.png"
    assert run_cli("generate", "--model", str(folder / "sdxl.safetensors"), "--height", "32", "--width", "32",
                   "--output", str(out)) == 0, capsys.readouterr().err
    loaded = minidiff.StableDiffusionXLPipeline.from_single_file(folder / "sdxl.safetensors")
    assert np.array_equal(np.asarray(PIL.Image.open(out)), api_image(loaded, height=32, width=32))


def test_lora_flag_on_sdxl_gives_the_apis_image(sdxl, tmp_path, capsys):
    pipe, folder = sdxl
    g = torch.Generator().manual_seed(0)
    to_k = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k")
    fc2 = pipe.text_encoder_2.text_model.encoder.layers[3].mlp.fc2
    tensors = {}
    for name, module in (("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", to_k),
                         ("lora_te2_text_model_encoder_layers_3_mlp_fc2", fc2)):
        tensors |= {f"{name}.lora_down.weight": torch.randn(2, module.in_features, generator=g),
                    f"{name}.lora_up.weight": torch.randn(module.out_features, 2, generator=g)}
    lora = tmp_path / "style.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "l.png"
    assert run_cli("generate", "--model", str(folder / "pipe"), "--lora", f"{lora}:0.7", "--height", "32",
                   "--width", "32", "--output", str(out)) == 0, capsys.readouterr().err
    with_lora = minidiff.StableDiffusionXLPipeline.from_pretrained(folder / "pipe")
    with_lora.set_progress_bar_config(disable=True)
    with_lora.load_lora_weights(lora, adapter_name="style")
    with_lora.set_adapters(["style"], [0.7])
    expected = api_image(with_lora, height=32, width=32)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), expected)
    assert not np.array_equal(expected, api_image(pipe, height=32, width=32))


@pytest.mark.parametrize("args, message", [
    (["edit", "--source-prompt", "a circle", "--image", "IMAGE"], "is an SDXL model; edit (DDIM inversion) runs SD"),
    (["generate", "--prompt-weighting", "compel"], "--prompt-weighting is not supported for SDXL models"),
    (["generate", "--control-image", "IMAGE"], "is an SDXL model; --control-image runs SD 1.x/2.x ControlNets only"),
])
def test_what_sdxl_cannot_do_stops_with_one_line(sdxl, tmp_path, capsys, monkeypatch, args, message):
    _, folder = sdxl
    image = tmp_path / "in.png"
    PIL.Image.new("RGB", (32, 32)).save(image)
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    args = [str(image) if arg == "IMAGE" else arg for arg in args]
    assert cli.main([*args, "--model", str(folder / "pipe"), "--prompt", PROMPT,
                     "--output", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minidiff: error:") and message in err[0]
