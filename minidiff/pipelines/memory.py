"""A cheap estimate of a sampling call's peak activation memory, checked before any work is done.

``minidiff generate --height 4096 --width 4096`` would otherwise grow until the OOM killer ends the process. The
estimate is arithmetic on the configs (nothing is allocated), in bytes, with ``s`` the element size of the dtype:

    latent size            h x w = H/f x W/f               (f = the VAE's scale factor, 8 for SD)
    UNet batch             B' = B * copies                 (copies: 2 with classifier-free guidance, 3 with
                                                             InstructPix2Pix's, 1 without)
    UNet activations       UNET_LIVE * B' * c0 * h * w * s  (c0 = block_out_channels[0]: the skip connections and
                                                             block temporaries at the first, largest level)
    UNet attention scores  2 * B' * heads * N^2 * s         (only with the ``math`` backend, which materializes
                                                             the (B' * heads, N, N) scores and their softmax;
                                                             N = pixels at the first attention level)
    VAE decode             VAE_LIVE * Bv * c0v * Ht * Wt * s (c0v = the VAE's block_out_channels[0]; Ht x Wt the
                                                             full image, or one tile with VAE tiling; Bv = 1 with
                                                             VAE slicing, else B)
    VAE attention scores   2 * Bv * n^2 * 4                  (``math`` backend only; n = latent pixels of the image
                                                             or tile, one head, float32 softmax)

    peak = max(UNet activations + UNet scores, VAE decode + VAE scores)

The ``sdpa`` and ``chunked`` backends (``pipe.enable_attention_slicing()``) never hold the whole score matrix, so
their attention term is left out. UNET_LIVE and VAE_LIVE were calibrated against the growth of peak resident memory
on CPU in fp32 with the ``sdpa`` backend: the SD 1.5 VAE decoding one 128x128 / 256x256 image grew by 70 / 252 MiB
(8 units of 128 x H x W x 4 bytes); a UNet with block_out_channels (32, 64, 64, 64), 8 heads, at 32x32 / 64x64
latents and B' = 2 by 26 / 60 MiB (a fixed 14 MiB plus 45 units of B' x 32 x h x w x 4 bytes). For SD 1.5 at
512x512 in fp32 that gives about 0.5 GiB for a CFG UNet step and 1 GiB for the decode; at 4096x4096, 30 and 64 GiB.
It is an estimate to stop hopeless runs, not a bound: a run is refused only when the estimate exceeds the memory
available now (``available_memory``: MemAvailable and the cgroup limit on Linux CPUs, ``torch.cuda.mem_get_info`` on
CUDA; unknown elsewhere, and then nothing is checked). The weights are already loaded and are not counted.
"""

from __future__ import annotations

import torch

from minidiff import ops

UNET_LIVE = 48  # (B', c0, h, w)-sized tensors alive at the UNet's peak
VAE_LIVE = 8  # (Bv, c0v, H, W)-sized tensors alive at the VAE decoder's peak
GiB = 2**30


def _read_int(path: str, key: str | None = None) -> int | None:
    """An integer from a file (or from the line starting with ``key``); None if absent or unreadable."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if key is None:
                    return int(line.split()[0])
                if line.startswith(key):
                    return int(line.split()[1]) * 1024  # /proc/meminfo counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now, or None when unknown (tests monkeypatch this)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = [_read_int("/proc/meminfo", "MemAvailable:")]
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free.append(limit - used)
    known = [f for f in free if f is not None]
    return min(known) if known else None


def _materializes_scores(model: torch.nn.Module) -> bool:
    """Whether the model's attention runs on the ``math`` backend (the one that holds all N x N scores)."""
    first = next((m for m in model.modules() if hasattr(m, "chunk_size") and hasattr(m, "backend")), None)
    return first is not None and ops.current_backend("attention", first.backend) == "math"


def _heads(config, level: int) -> int:
    heads = getattr(config, "num_attention_heads", None) or config.attention_head_dim
    return heads[level] if isinstance(heads, (list, tuple)) else heads


def unet_bytes(unet, batch: int, h: int, w: int) -> int:
    """UNet activations (and ``math`` attention scores) for a (batch, C, h, w) input."""
    config, size = unet.config, unet.dtype.itemsize
    total = UNET_LIVE * batch * config.block_out_channels[0] * h * w * size
    levels = [i for i, name in enumerate(config.down_block_types) if "Attn" in name]
    if levels and _materializes_scores(unet):
        pixels = (h >> levels[0]) * (w >> levels[0])
        total += 2 * batch * _heads(config, levels[0]) * pixels**2 * size
    return total


def vae_decode_bytes(vae, batch: int, height: int, width: int) -> int:
    """VAE decoder activations (and ``math`` mid-block attention scores) for (batch, 3, height, width) images."""
    config, size = vae.config, vae.dtype.itemsize
    if getattr(vae, "use_tiling", False):
        height, width = min(height, vae.tile_sample_min_size), min(width, vae.tile_sample_min_size)
    batch = 1 if getattr(vae, "use_slicing", False) else batch
    factor = 2 ** (len(config.block_out_channels) - 1)
    total = VAE_LIVE * batch * config.block_out_channels[0] * height * width * size
    if _materializes_scores(vae):
        total += 2 * batch * ((height // factor) * (width // factor)) ** 2 * 4
    return total


def estimate_peak_bytes(unet, vae, batch: int, height: int, width: int, copies: int) -> int:
    """The module docstring's formula: the larger of the UNet step (on ``copies`` x ``batch`` inputs) and the VAE
    decode."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_batch = batch * copies
    return max(unet_bytes(unet, unet_batch, height // factor, width // factor),
               vae_decode_bytes(vae, batch, height, width))


def check_activation_memory(unet, vae, batch: int, height: int, width: int, copies: int, device) -> None:
    """ValueError with the estimate, the available memory and the options, if the call would not fit."""
    free = available_memory(torch.device(device))
    if free is None:
        return
    need = estimate_peak_bytes(unet, vae, batch, height, width, copies)
    if need > free:
        raise ValueError(
            f"{batch} image(s) of {height}x{width} need about {need / GiB:.1f} GiB of activation memory, but "
            f"{free / GiB:.1f} GiB is available on {device}; use a smaller height/width or fewer images, attention "
            "slicing (pipe.enable_attention_slicing(), CLI --attention chunked) and VAE tiling "
            "(pipe.enable_vae_tiling(), CLI --vae-tiling)"
        )
