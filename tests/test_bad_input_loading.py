"""Bad input to loading (issue 11): weights of the wrong dtype or with NaN, shard indexes that leave the folder,
weight/config/tokenizer paths that are directories, FIFOs or devices, broken model_index.json and tokenizer files,
hub cache refs. Each case must end in a one-line error naming the file and the key, never a wrong model."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.loading.hub import resolve_folder
from minidiff.loading.safetensors_io import load_checkpoint_file, load_folder_weights
from minidiff.loading.single_file import load_single_file, to_ldm_state_dict
from minidiff.pipelines.base import component_class
from tests.tiny_components import tiny_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_vae() -> minidiff.AutoencoderKL:
    torch.manual_seed(0)
    return minidiff.AutoencoderKL(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=2, norm_num_groups=2)


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return minidiff.CLIPTokenizer()


@pytest.fixture
def vae_folder(tmp_path):
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input") / "pipe"
    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    pipe.save_pretrained(folder)
    return folder, to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)


@pytest.fixture
def pipe_copy(pipeline_folder, tmp_path):
    return shutil.copytree(pipeline_folder[0], tmp_path / "pipe")


def rewrite(path, edit) -> None:
    """Apply ``edit`` to the tensors of a safetensors file in place."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def first_key(path) -> str:
    return sorted(load_file(str(path)))[0]


# ---- 1. non-float and non-finite weights -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_weights_in_a_folder_are_refused(vae_folder, dtype):
    key = first_key(vae_folder / WEIGHTS)
    rewrite(vae_folder / WEIGHTS, lambda t: t.update({key: t[key].to(dtype)}))
    with pytest.raises(ValueError, match=rf"{WEIGHTS}.*non-floating tensor\(s\).*{key} \({dtype}\)"):
        minidiff.AutoencoderKL.from_pretrained(vae_folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_in_a_folder_are_refused(vae_folder, bad):
    keys = sorted(load_file(str(vae_folder / WEIGHTS)))[:2]

    def poison(tensors):
        for key in keys:
            tensors[key].view(-1)[:3] = bad

    rewrite(vae_folder / WEIGHTS, poison)
    with pytest.raises(ValueError, match=rf"NaN/Inf in 2 tensor\(s\): {keys[0]} \(3 values\), {keys[1]} \(3 values\)"):
        minidiff.AutoencoderKL.from_pretrained(vae_folder)


def test_fp16_weights_still_load_and_load_weights_checks_too(vae_folder):
    model = tiny_vae()
    half = {k: v.half() for k, v in model.state_dict().items()}
    assert model.load_weights(half) is model  # floating of another precision is fine
    with pytest.raises(ValueError, match=r"state dict hold NaN/Inf in 1 tensor"):
        model.load_weights({**half, "decoder.conv_out.bias": torch.full_like(half["decoder.conv_out.bias"], torch.nan)})


def test_integer_and_nan_weights_in_a_single_file_are_refused(pipeline_folder, tmp_path):
    folder, state = pipeline_folder
    key = "first_stage_model.decoder.conv_out.weight"
    path = tmp_path / "int.safetensors"
    save_file({k: v.contiguous() for k, v in {**state, key: state[key].to(torch.int32)}.items()}, str(path))
    with pytest.raises(ValueError, match=r"int\.safetensors \(vae\).*decoder\.conv_out\.weight \(torch\.int32\)"):
        load_single_file(path, config=folder, components=("vae",))
    nan = state[key].clone()
    nan[0] = torch.nan
    path = tmp_path / "nan.ckpt"
    torch.save({"state_dict": {**state, key: nan}}, str(path))
    with pytest.raises(ValueError, match=r"nan\.ckpt \(vae\) hold NaN/Inf in 1 tensor\(s\): decoder\.conv_out\.weight"):
        load_single_file(path, config=folder, components=("vae",))


@pytest.mark.parametrize("class_name", ["UNet2DConditionModel", "SchedulerMixin", "ddim", "ScoreSdeVeScheduler"])
def test_single_file_config_folder_scheduler_class_is_allow_listed(pipeline_folder, pipe_copy, tmp_path, class_name):
    path = pipe_copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": class_name}))
    checkpoint = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_folder[1].items()}, str(checkpoint))
    with pytest.raises(ValueError, match=rf"scheduler_config\.json names {class_name} for 'scheduler'"):
        load_single_file(checkpoint, config=pipe_copy)


# ---- 2. shard index --------------------------------------------------------------------------------------------
def write_shards(folder, index: dict, files: dict[str, dict]) -> None:
    folder.mkdir(exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(folder / name))
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))


def test_shard_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.ones(2)}, str(outside))
    model = tmp_path / "deep" / "model"
    model.mkdir(parents=True)
    for entry in ("../../outside.safetensors", str(outside)):
        write_shards(model, {"weight_map": {"a": entry}}, {})
        with pytest.raises(ValueError, match=r"index\.json: weight_map\['a'\] = .* points outside the model folder"):
            load_folder_weights(str(model), WEIGHTS)
    os.symlink(outside, model / "link.safetensors")
    write_shards(model, {"weight_map": {"a": "link.safetensors"}}, {})
    with pytest.raises(ValueError, match="points outside the model folder"):
        load_folder_weights(str(model), WEIGHTS)


def test_shards_in_a_hub_cache_may_link_to_its_blobs(tmp_path):
    repo = tmp_path / "models--someone--model"
    snapshot = repo / "snapshots" / "abc123" / "unet"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(repo / "blobs" / "0123abcd"))
    os.symlink("../../../blobs/0123abcd", snapshot / "shard-1.safetensors")
    write_shards(snapshot, {"weight_map": {"a": "shard-1.safetensors"}}, {})
    assert torch.equal(load_folder_weights(str(snapshot), WEIGHTS)["a"], torch.ones(2))


@pytest.mark.parametrize("index", [[], {"weight_map": ["a"]}, {"weight_map": {"a": 3}}, {"no": "map"}])
def test_malformed_shard_index_is_named(tmp_path, index):
    write_shards(tmp_path, index, {})
    with pytest.raises(ValueError, match=r"index\.json is not a valid shard index: it needs a 'weight_map' object"):
        load_folder_weights(str(tmp_path), WEIGHTS)
    (tmp_path / f"{WEIGHTS}.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON"):
        load_folder_weights(str(tmp_path), WEIGHTS)


def test_index_entry_missing_from_its_shard_is_named(tmp_path):
    write_shards(tmp_path, {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}},
                 {"s1.safetensors": {"a": torch.ones(1)}})
    with pytest.raises(ValueError, match=r"puts 1 tensor\(s\) in s1\.safetensors that it lacks: \['b'\]"):
        load_folder_weights(str(tmp_path), WEIGHTS)


# ---- 3. paths that are not regular files -------------------------------------------------------------------
def replace_with(path, kind: str) -> None:
    """Turn ``path`` into a directory, FIFO, /dev/zero link or empty file."""
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "character device":
        os.symlink("/dev/zero", path)
    else:
        path.write_bytes(b"")


KINDS = [("directory", "is a directory"), ("FIFO", r"is a FIFO \(named pipe\)"),
         ("character device", "is a character device"), ("empty", r"is empty \(0 bytes\)")]


@pytest.mark.parametrize("kind, message", KINDS)
def test_weights_that_are_not_a_regular_file(vae_folder, kind, message):
    replace_with(vae_folder / WEIGHTS, kind)
    with pytest.raises(ValueError, match=rf"weight file .*{WEIGHTS} {message}"):
        minidiff.AutoencoderKL.from_pretrained(vae_folder)


@pytest.mark.parametrize("kind, message", KINDS)
def test_config_that_is_not_a_regular_file(vae_folder, kind, message):
    replace_with(vae_folder / "config.json", kind)
    with pytest.raises(ValueError, match=rf"config .*config\.json {message}"):
        minidiff.AutoencoderKL.from_pretrained(vae_folder)


@pytest.mark.parametrize("kind, message", KINDS)
def test_scheduler_config_that_is_not_a_regular_file(tmp_path, kind, message):
    minidiff.DDIMScheduler().save_pretrained(tmp_path)
    replace_with(tmp_path / "scheduler_config.json", kind)
    with pytest.raises(ValueError, match=rf"config .*scheduler_config\.json {message}"):
        minidiff.DDIMScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("kind, message", KINDS[:3])
def test_single_file_that_is_not_a_regular_file(tmp_path, suffix, kind, message):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"x")
    replace_with(path, kind)
    with pytest.raises(ValueError, match=rf"checkpoint .*model{suffix} {message}"):
        load_single_file(path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint_file(str(path))


def test_truncated_weights_and_a_ckpt_named_safetensors(vae_folder, tmp_path):
    data = (vae_folder / WEIGHTS).read_bytes()
    (vae_folder / WEIGHTS).write_bytes(data[:100])
    with pytest.raises(ValueError, match=rf"{WEIGHTS} is not a readable safetensors file \(truncated or corrupt\?\)"):
        minidiff.AutoencoderKL.from_pretrained(vae_folder)
    path = tmp_path / "renamed.safetensors"
    for legacy in (False, True):
        torch.save({"state_dict": {"x": torch.ones(2)}}, str(path), _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError, match=r"renamed\.safetensors .*looks like a pickled .* rename it to \.ckpt"):
            load_checkpoint_file(str(path))


def test_ckpt_without_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "meta.ckpt"
    torch.save({"global_step": 5, "epoch": 1}, str(path))
    with pytest.raises(ValueError, match=r"meta\.ckpt holds a dict with no tensors"):
        load_checkpoint_file(str(path))


def test_loading_never_executes_pickled_code(tmp_path, pipeline_folder):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.ckpt", "evil.safetensors"):
        torch.save({"state_dict": {"x": Evil()}}, str(tmp_path / name))
        with pytest.raises(ValueError):
            load_single_file(tmp_path / name, config=pipeline_folder[0])
    assert not marker.exists()


# ---- 4. model_index.json -----------------------------------------------------------------------------------
def write_index(folder, edit) -> None:
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps(edit(index)))


@pytest.mark.parametrize("edit, message", [
    (lambda i: [i], r"must hold a JSON object of component -> \[library, class\], found a list"),
    (lambda i: {**i, "unet": "UNet2DConditionModel"}, r"the 'unet' entry is 'UNet2DConditionModel'; it must be"),
    (lambda i: {**i, "unet": ["diffusers"]}, r"the 'unet' entry is \['diffusers'\]"),
    (lambda i: {**i, "vae": ["diffusers", 5]}, r"the 'vae' entry is \['diffusers', 5\]"),
    (lambda i: {**i, "unet": ["diffusers", "modeling"]}, r"names modeling for 'unet', which is not a minidiff unet"),
    (lambda i: {**i, "vae": ["diffusers", "__builtins__"]}, r"names __builtins__ for 'vae'"),
    (lambda i: {**i, "scheduler": ["diffusers", "os"]}, r"names os for 'scheduler'"),
    (lambda i: {**i, "unet": ["diffusers", "AutoencoderKL"]},
     r"AutoencoderKL for 'unet'.*supported: \['UNet2DConditionModel', 'UNet2DModel'\]"),
    (lambda i: {**i, "tokenizer": ["transformers", "BatchEncoding"]}, r"supported: \['CLIPTokenizer'\]\. Fix"),
    (lambda i: {**i, "scheduler": ["diffusers", "SchedulerOutput"]}, r"supported: \['DDIMInverseScheduler', "),
    (lambda i: {k: v for k, v in i.items() if k != "vae"}, r"has no entry for the 'vae' component"),
])
def test_broken_model_index_is_one_clear_error(pipe_copy, edit, message):
    write_index(pipe_copy, edit)
    with pytest.raises(ValueError, match=rf"model_index\.json.*{message}"):
        minidiff.StableDiffusionPipeline.from_pretrained(pipe_copy)


def test_model_index_invalid_json_and_class_lookup_is_an_allow_list(pipe_copy):
    (pipe_copy / "model_index.json").write_text('{"unet": ["diffusers", ')
    with pytest.raises(ValueError, match=r"model_index\.json is not valid JSON"):
        minidiff.StableDiffusionPipeline.from_pretrained(pipe_copy)
    assert component_class("scheduler", "PNDMScheduler") is minidiff.PNDMScheduler
    for name in ("torch", "ModelMixin", "CLIPTextConfig", "__class__", "tokenizer"):
        with pytest.raises(ValueError, match="is not a minidiff"):
            component_class("text_encoder", name)


def test_missing_component_folder_and_folder_kind_mixups(pipe_copy):
    shutil.rmtree(pipe_copy / "vae")
    with pytest.raises(FileNotFoundError, match=r"model_index\.json lists 'vae' but .*vae is not a folder"):
        minidiff.StableDiffusionPipeline.from_pretrained(pipe_copy)
    with pytest.raises(FileNotFoundError, match=r"is a pipeline folder .* one of \['text_encoder', 'unet'\]"):
        minidiff.UNet2DConditionModel.from_pretrained(pipe_copy)
    with pytest.raises(FileNotFoundError, match=r"model_index\.json does not exist.*a single model folder"):
        minidiff.StableDiffusionPipeline.from_pretrained(pipe_copy / "unet")


# ---- 5. tokenizer files ------------------------------------------------------------------------------------
def edit_tokenizer_config(folder, **values) -> None:
    path = folder / "tokenizer" / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.mark.parametrize("name, content, message", [
    ("vocab.json", "{broken", r"vocab\.json is not valid JSON"),
    ("vocab.json", "[1, 2]", r"vocab\.json must hold a JSON object, found a list"),
    ("vocab.json", '{"a": "zero"}', r"vocab\.json: the vocabulary must map token strings to integer ids"),
    ("tokenizer_config.json", "{broken", r"tokenizer_config\.json is not valid JSON"),
    ("merges.txt", "#version: 0.2\na b c\n", r"merges\.txt line 2: 'a b c' is not a merge"),
    ("merges.txt", b"\xff\xfe\x00", r"merges\.txt is not UTF-8 text"),
    ("merges.txt", "#version: 0.2\nq zz\n", r"tokenizer in .*merge 0 \('q', 'zz'\)"),
])
def test_broken_tokenizer_files_name_the_path(pipe_copy, name, content, message):
    path = pipe_copy / "tokenizer" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        minidiff.CLIPTokenizer.from_pretrained(pipe_copy, subfolder="tokenizer")


@pytest.mark.parametrize("values, message", [
    ({"pad_token": 5}, r"pad_token is 5; a token is \{\"content\": string"),
    ({"eos_token": {"normalized": True}}, r"eos_token is \{'normalized': True\}"),
    ({"added_tokens_decoder": [1]}, r"tokenizer_config\.json: added_tokens_decoder must be an object"),
    ({"added_tokens_decoder": {"0": "x"}}, r"added token is 'x'"),
])
def test_broken_token_settings_are_named(pipe_copy, values, message):
    edit_tokenizer_config(pipe_copy, **values)
    with pytest.raises(ValueError, match=message):
        minidiff.CLIPTokenizer.from_pretrained(pipe_copy, subfolder="tokenizer")


@pytest.mark.parametrize("kind, message", KINDS[:3])
def test_tokenizer_files_that_are_not_regular_files(pipe_copy, kind, message):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        folder = shutil.copytree(pipe_copy / "tokenizer", pipe_copy / f"tok-{name}")
        replace_with(folder / name, kind)
        with pytest.raises(ValueError, match=rf"{name} {message}"):
            minidiff.CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("value, message", [
    (100_000_000, r"model_max_length=100000000: must be at most 1,000,000 tokens"),
    (0, r"model_max_length=0: must be an int >= 2"),
    (-5, r"model_max_length=-5"),
    ("77", r"model_max_length='77'"),
    (77.5, r"model_max_length=77\.5"),
])
def test_model_max_length_in_tokenizer_config_is_bounded(pipe_copy, value, message):
    edit_tokenizer_config(pipe_copy, model_max_length=value)
    with pytest.raises(ValueError, match=rf"tokenizer_config\.json: {message}.*CLIP tokenizers use 77"):
        minidiff.CLIPTokenizer.from_pretrained(pipe_copy, subfolder="tokenizer")


@pytest.mark.parametrize("value, expected", [(int(1e30), 77), (1e30, 77), (None, 77), (64.0, 64), (1_000_000, 10**6)])
def test_transformers_no_limit_sentinel_means_77(pipe_copy, value, expected):
    edit_tokenizer_config(pipe_copy, model_max_length=value)
    assert minidiff.CLIPTokenizer.from_pretrained(pipe_copy, subfolder="tokenizer").model_max_length == expected


def test_huge_max_length_fails_fast_instead_of_allocating(shipped_tokenizer):
    with pytest.raises(ValueError, match=r"max_length=100000000: must be at most 1,000,000 tokens"):
        shipped_tokenizer("a cat", padding="max_length", max_length=100_000_000)
    with pytest.raises(ValueError, match=r"model_max_length=100000000: must be at most"):
        minidiff.CLIPTokenizer(model_max_length=100_000_000)


def test_long_prompt_warns_in_one_short_line(shipped_tokenizer):
    prompt = " ".join(["cat"] * 500)
    with pytest.warns(UserWarning) as caught:
        ids = shipped_tokenizer(prompt, padding="max_length", truncation=True).input_ids
    assert len(ids) == 77 and len(caught) == 1
    message = str(caught[0].message)
    assert message == "prompt is 502 tokens long; this tokenizer takes 77, the last 425 were truncated"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped_tokenizer("cat " * 75, truncation=True)  # exactly full: no warning


# ---- 6. hub cache ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["../../../etc", "abc/../../x", "\x00\x01garbage", ""])
def test_garbage_hub_cache_ref_is_named(tmp_path, monkeypatch, ref):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--someone--model" / "snapshots" / "abc123").mkdir(parents=True)
    (tmp_path / "models--someone--model" / "refs").mkdir()
    (tmp_path / "models--someone--model" / "refs" / "main").write_text(ref)
    with pytest.raises(ValueError, match=r"cache ref .*refs/main holds .*not a commit hash"):
        resolve_folder("someone/model")


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, where chmod 000 cannot deny
    with pytest.raises(PermissionError, match=r"is a folder this user cannot read"):
        resolve_folder(tmp_path)
