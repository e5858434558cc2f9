import json
import os

import pytest
import torch
from safetensors.torch import save_file

from minidiff.configuration import Config, ConfigMixin, check_choice
from minidiff.loading.hub import resolve_folder
from minidiff.loading.safetensors_io import load_checkpoint_file, load_folder_weights, load_safetensors, with_variant


def test_variant_names():
    assert with_variant("diffusion_pytorch_model.safetensors", "fp16") == "diffusion_pytorch_model.fp16.safetensors"
    assert with_variant("model.safetensors", None) == "model.safetensors"


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"w\.safetensors is not a readable safetensors file"):
        load_safetensors(str(path))


def test_sharded_folder_loads_all_shards(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "m-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    state = load_folder_weights(str(tmp_path), "diffusion_pytorch_model.safetensors")
    assert sorted(state) == ["a", "b"]


def test_missing_weights_suggest_variant(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(FileNotFoundError, match="try variant="):
        load_folder_weights(str(tmp_path), "diffusion_pytorch_model.safetensors")
    assert "a" in load_folder_weights(str(tmp_path), "diffusion_pytorch_model.safetensors", variant="fp16")


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, str(path))
    with pytest.raises(ValueError, match=r"weights_only=True.*never runs pickled code"):
        load_checkpoint_file(str(path))


def test_plain_ckpt_loads_with_weights_only(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"x": torch.ones(3)}, "global_step": 5}, str(path))
    assert torch.equal(load_checkpoint_file(str(path))["x"], torch.ones(3))


def test_hub_id_not_cached_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not download.*huggingface-cli download someone/model"):
        resolve_folder("someone/model")


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--someone--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--model" / "refs").mkdir()
    (tmp_path / "models--someone--model" / "refs" / "main").write_text("abc123")
    assert resolve_folder("someone/model") == str(snapshot)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_folder(str(tmp_path / "nope" / "deeper" / "x"))


def test_check_choice_lists_accepted():
    with pytest.raises(ValueError, match=r"beta_schedule='cubic' is not supported; accepted values: 'linear', 'cosine'"):
        check_choice("beta_schedule", "cubic", ["linear", "cosine"])


def test_load_config_errors_name_the_file(tmp_path):
    class Thing(ConfigMixin):
        config_class = Config

    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        Thing.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        Thing.load_config(tmp_path)


def test_a_pipeline_folder_may_name_every_scheduler():
    """Every scheduler class minidiff has can be named by a folder's model_index.json (the allow-list)."""
    import minidiff.schedulers as schedulers
    from minidiff.loading.components import component_class
    from minidiff.schedulers.base import SCHEDULER_NAMES, SchedulerMixin

    have = {name for name in dir(schedulers) if isinstance(getattr(schedulers, name), type)
            and issubclass(getattr(schedulers, name), SchedulerMixin) and name.endswith("Scheduler")
            and name != "SchedulerMixin"}
    assert have == set(SCHEDULER_NAMES)
    assert all(component_class("scheduler", name) is getattr(schedulers, name) for name in have)
