"""``minidiff generate --lora PATH[:SCALE]``: the image equals the API's (load_lora_weights + set_adapters), each
file is its own adapter, and bad paths, scales and files stop with one line before any model is loaded."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from minidiff import StableDiffusionPipeline, cli
from tests.test_cli import PROMPT, no_model, run_in_process  # noqa: F401  (no_model: fixture)
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import one_thread  # noqa: F401  (autouse fixture)

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def write_lora(path, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"unet.{TO_Q}.lora_A.weight": torch.randn(2, 16, generator=generator),
               f"unet.{TO_Q}.lora_B.weight": torch.randn(16, 2, generator=generator),
               f"text_encoder.{TE_Q}.lora_A.weight": torch.randn(2, 16, generator=generator),
               f"text_encoder.{TE_Q}.lora_B.weight": torch.randn(16, 2, generator=generator)}
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline(StableDiffusionPipeline).save_pretrained(str(folder))
    return str(folder)


def generate(capsys, model_folder, output, *lora_flags: str) -> tuple[int, str]:
    flags = [item for flag in lora_flags for item in ("--lora", flag)]
    return run_in_process(capsys, "generate", "--model", model_folder, "--prompt", PROMPT, "--steps", "2",
                          "--height", "32", "--width", "32", "--output", str(output), *flags)


def test_two_loras_with_scales_give_the_apis_image(capsys, model_folder, tmp_path):
    style, detail = write_lora(tmp_path / "style.v1.safetensors", 0), write_lora(tmp_path / "detail.safetensors", 1)
    code, err = generate(capsys, model_folder, tmp_path / "out.png", f"{style}:0.7", detail)
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(model_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(style, adapter_name="style_v1")
    pipe.load_lora_weights(detail, adapter_name="detail")
    pipe.set_adapters(["style_v1", "detail"], [0.7, 1.0])
    expected = pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    with PIL.Image.open(tmp_path / "out.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(expected.images[0]))
    code, _ = generate(capsys, model_folder, tmp_path / "plain.png")
    with PIL.Image.open(tmp_path / "plain.png") as plain, PIL.Image.open(tmp_path / "out.png") as adapted:
        assert code == 0 and not np.array_equal(np.asarray(plain), np.asarray(adapted))


def test_each_file_is_its_own_adapter_named_after_it(tmp_path):
    (tmp_path / "b").mkdir()
    first, second = write_lora(tmp_path / "x.safetensors", 0), write_lora(tmp_path / "b" / "x.safetensors", 1)
    loras = cli.check_loras([first, f"{second}:-0.5", f"{first}:2"])
    assert loras == [("x", first, 1.0), ("x_2", second, -0.5), ("x_3", first, 2.0)]


def test_a_path_containing_a_colon_is_taken_whole(tmp_path):
    path = write_lora(tmp_path / "a:b.safetensors", 0)
    assert cli.split_lora_flag(path) == (path, 1.0)
    assert cli.split_lora_flag(f"{path}:0.25") == (path, 0.25)


@pytest.mark.parametrize("flag, message", [
    ("{tmp}/missing.safetensors", "--lora {tmp}/missing.safetensors: LoRA file {tmp}/missing.safetensors does not exist"),
    ("{good}:abc", "'abc' after the last ':' is not a number; use PATH or PATH:SCALE"),
    ("{good}:nan", "the scale must be a finite number, got nan"),
    ("{tmp}/weights.pt", "is a pickle; minidiff never unpickles"),
    ("{tmp}/empty", "no pytorch_lora_weights.safetensors in {tmp}/empty"),
    ("{tmp}/text.safetensors", "is not a readable safetensors file"),
])
def test_bad_lora_flags_stop_before_loading(capsys, no_model, tmp_path, flag, message):
    good = write_lora(tmp_path / "good.safetensors", 0)
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.safetensors").write_text("not tensors")
    fill = dict(tmp=tmp_path, good=good)
    code, err = run_in_process(capsys, "generate", "--prompt", PROMPT, "--output", str(tmp_path / "o.png"),
                               "--lora", flag.format(**fill))
    assert code == 2 and err.startswith("minidiff: error: --lora") and message.format(**fill) in err, err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()


def test_a_lora_for_another_model_is_one_line_naming_the_file(capsys, model_folder, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"unet.mid_block.attentions.0.nothing.lora_A.weight": torch.ones(2, 16),
               "unet.mid_block.attentions.0.nothing.lora_B.weight": torch.ones(16, 2)}, str(path))
    code, err = generate(capsys, model_folder, tmp_path / "o.png", str(path))
    assert code == 2 and err.startswith(f"minidiff: error: {path}") and "match no module" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()


def test_help_describes_the_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora PATH[:SCALE] a LoRA .safetensors file" in text and "repeat the flag for several" in text
