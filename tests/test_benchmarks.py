"""Smoke test of the benchmark harness on tiny shapes: table and JSON structure, the error gate, kernel checks."""

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.cases import Case, attention_pair
from benchmarks.harness import Settings, run
from benchmarks.report import COLUMNS, markdown
from minidiff import ops

QUICK = Settings(quick=True, threads=1, warmup=0, repeats=1)


@pytest.fixture
def user_backends():
    """A kernel with a 1e-2 error and a kernel returning the wrong shape, registered for the test only."""

    def noisy(q, k, v, **kwargs):
        out = ops.math_attention(q, k, v, **kwargs)
        return out + 1e-2 * out.abs().max()

    def wrong_shape(q, k, v, **kwargs):
        return ops.math_attention(q, k, v, **kwargs)[..., :-1]

    ops.register_backend("attention", "test-noisy", noisy)
    ops.register_backend("attention", "test-wrong-shape", wrong_shape)
    yield
    ops.unregister_backend("attention", "test-noisy")
    ops.unregister_backend("attention", "test-wrong-shape")


def tiny_case(*backends: str) -> Case:
    return Case("op", "attention self", "tiny", lambda dtype: attention_pair(32, 32, 8, dtype), backends=backends,
                dtypes=("fp32",))


def test_rows_have_times_ratio_error_memory_and_throughput():
    rows, machine = run([tiny_case("math", "sdpa", "chunked")], ("fp32",), QUICK, log=lambda line: None)
    assert [row.backend for row in rows] == ["math", "sdpa", "chunked"]
    assert machine.matmul_gflops["fp32"] > 0 and machine.threads == 1
    for row in rows:
        assert row.status == "ok" and row.max_rel <= row.tolerance
        assert row.minidiff_ms > 0 and row.diffusers_ms > 0
        assert 0 < row.ratio_low <= row.ratio <= row.ratio_high  # the median of the rounds' own ratios
        assert row.gflop == pytest.approx(2 * 2 * 2 * 8 * 32 * 32 * 8 / 1e9)  # QK^T and PV matmuls
        assert row.peak_percent == pytest.approx(100 * row.minidiff_gflops / machine.matmul_gflops["fp32"])
        assert row.minidiff_peak_mb is not None and row.diffusers_peak_mb is not None
    table = markdown(rows, machine, QUICK).splitlines()
    assert table[2] == "| " + " | ".join(COLUMNS) + " |"
    assert len([line for line in table if line.startswith("| op |")]) == 3


def test_too_large_error_gets_no_ratio_and_wrong_shape_is_rejected(user_backends):
    rows, _ = run([tiny_case("test-noisy", "test-wrong-shape")], ("fp32",), QUICK, log=lambda line: None)
    noisy, wrong = rows
    assert noisy.status == "error too high" and noisy.max_rel > noisy.tolerance
    assert noisy.ratio is None and noisy.minidiff_ms is None and noisy.diffusers_ms is None
    assert wrong.ratio is None and wrong.max_rel is None
    assert "attention backend 'test-wrong-shape' returned (2, 8, 32, 7)" in wrong.status
    assert "expected shape (2, 8, 32, 8)" in wrong.status and "(2, 8, 32, 8)" in wrong.status.split("input shapes")[1]


def test_cli_quick_writes_table_json_and_png(tmp_path, capsys, user_backends):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--quick", "--level", "op", "--dtype", "fp32", "--only", "attention cross", "--threads", "1", "--repeats", "1",
            "--warmup", "0", "--backends", "sdpa,test-noisy", "--json", str(json_path), "--png", str(png_path)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| op | attention cross | q (2, 8, 256, 40) kv 77 | fp32 | sdpa |" in table
    assert "| error too high |" in table
    document = json.loads(json_path.read_text())
    assert set(document) == {"machine", "settings", "rows"} and document["settings"]["quick"] is True
    assert len(document["rows"]) == 8  # 4 UNet levels x 2 backends
    assert {row["status"] for row in document["rows"]} == {"ok", "error too high"}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_backend_and_level(capsys):
    with pytest.raises(SystemExit, match=r"unknown attention backend 'nope'; registered backends: \['chunked', 'math', 'sdpa'"):
        main(["--quick", "--backends", "nope"])
    with pytest.raises(SystemExit):
        main(["--quick", "--level", "ops"])
    assert "--level ops: unknown ['ops']; accepted: op,model,pipeline" in capsys.readouterr().err


def test_model_case_quick_through_the_seam():
    from benchmarks.cases import all_cases

    cases = [case for case in all_cases(True, ("model",)) if case.what.startswith("UNet2DModel")][:1]
    rows, _ = run(cases, ("fp32",), QUICK, log=lambda line: None)
    assert [(row.backend, row.status) for row in rows] == [("sdpa", "ok"), ("chunked", "ok")]
    assert all(row.max_rel <= 1e-5 for row in rows)


def test_sdxl_unet_row_quick_matches_diffusers():
    from benchmarks.cases import all_cases

    cases = [case for case in all_cases(True, ("model",), attention=("sdpa",)) if case.what.startswith("SDXL UNet")]
    rows, _ = run(cases, ("fp32", "bf16"), QUICK, log=lambda line: None)
    assert [(row.dtype, row.backend, row.status) for row in rows] == [("fp32", "sdpa", "ok"), ("bf16", "sdpa", "ok")]
    assert rows[0].max_rel <= 1e-5 and rows[1].max_rel <= 5e-2
    assert rows[0].ratio > 0 and rows[0].minidiff_peak_mb is not None


def test_full_size_twins_share_weight_storage():
    """The full-size rows hold one copy of the weights: minidiff's tensors are diffusers' own (its channels-last conv
    weights excepted), and the fill is seeded and scaled by fan-in."""
    import torch

    from benchmarks.cases import TINY_SDXL_UNET, meta_built_twins

    reference, ours = meta_built_twins("UNet2DConditionModel", TINY_SDXL_UNET, torch.float32)
    theirs = reference.state_dict()
    shared = [key for key, tensor in ours.state_dict().items() if tensor.data_ptr() == theirs[key].data_ptr()]
    assert set(theirs) - set(shared) == {key for key, tensor in theirs.items() if tensor.ndim == 4}
    again, _ = meta_built_twins("UNet2DConditionModel", TINY_SDXL_UNET, torch.float32)
    assert all(torch.equal(tensor, again.state_dict()[key]) for key, tensor in theirs.items())
    weight = theirs["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"]  # (64, 256): fan-in 256
    assert abs(weight.std().item() - 256**-0.5) < 0.1 * 256**-0.5


def test_turbo_row_quick_matches_diffusers():
    from benchmarks.cases import all_cases

    cases = [case for case in all_cases(True, ("pipeline",)) if case.what.startswith("SDXL-Turbo")]
    rows, machine = run(cases, ("fp32",), QUICK, log=lambda line: None)
    assert [(row.what, row.dtype, row.status) for row in rows] == [(cases[0].what, "fp32", "ok")]
    assert rows[0].max_rel <= 1e-5 and rows[0].gflop > 0 and rows[0].ratio > 0
    assert "SDXL-Turbo StableDiffusionXLPipeline 1 step" in cases[0].what and machine.cpu
