"""The import rewrite behind ``python -m parity.diffusers_suite``: names minidiff exports come from minidiff, the
rest stays where it was, multi-line and indented imports included."""

from parity.diffusers_suite.rewrite import rewrite_source

EXPORTED = {"DDIMScheduler", "UNet2DModel", "CLIPTextModel"}


def test_swapped_names_move_to_minidiff_and_the_rest_stays():
    source = ("import torch\n"
              "from diffusers import (\n    DDIMScheduler,\n    VQModel,\n    UNet2DModel as U,\n)\n"
              "from transformers import CLIPTextConfig, CLIPTextModel\n"
              "from diffusers.utils import load_image\n"
              "from .test_schedulers import SchedulerCommonTest\n"
              "def f():\n    from diffusers import DDIMScheduler\n    return DDIMScheduler\n")
    rewritten, swapped = rewrite_source(source, EXPORTED)
    assert swapped == 4
    assert rewritten == ("import torch\n"
                         "from diffusers import VQModel\nfrom minidiff import DDIMScheduler, UNet2DModel as U\n"
                         "from transformers import CLIPTextConfig\nfrom minidiff import CLIPTextModel\n"
                         "from diffusers.utils import load_image\n"
                         "from .test_schedulers import SchedulerCommonTest\n"
                         "def f():\n    from minidiff import DDIMScheduler\n    return DDIMScheduler\n")
    compile(rewritten, "rewritten", "exec")


def test_a_file_without_swapped_names_is_unchanged():
    source = "from diffusers import VQModel\nfrom diffusers.models import UNet2DModel\n"
    assert rewrite_source(source, EXPORTED) == (source, 0)


def test_offline_hub_refusals_of_both_libraries_count_as_needing_the_hub():
    from minidiff.loading.hub import resolve_folder
    from parity.diffusers_suite.plugin import NEEDS_HUB

    try:
        resolve_folder("someone/not-cached-here")
    except FileNotFoundError as error:
        assert NEEDS_HUB.search(str(error))
    else:
        raise AssertionError("an uncached hub id resolved")
    assert NEEDS_HUB.search("OSError: We couldn't connect to 'https://huggingface.co' to load the files")
    assert not NEEDS_HUB.search("AssertionError: Processor down_blocks.0 should be AttnProcessor")
