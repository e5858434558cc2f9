"""Steps to quality: how many model calls each sampler needs, measured against an exact model.

    python -m benchmarks.steps_to_quality            # full run: every sampler, the built-in model table (minutes)
    python -m benchmarks.steps_to_quality --quick    # small batch, no built-in model (seconds; the unit test)

The model is exact (benchmarks/gaussian_mixture.py: a Gaussian mixture's closed-form eps on Stable Diffusion's
schedule), so every error left is the sampler's. Each sampler runs the standard loop from the same start noise;
its final sample is compared with

- ``rms``: the probability-flow ODE's solution from the same start (Song et al. 2021, Eq. 13, in Karras et al.'s
  form dy/dsigma = eps(y, sigma) for y = x_t / sqrt(abar_t)), solved with RK4 on a rho = 7 grid in float64 from the
  sampler's first noise level to its last one (DDIM and PLMS stop at abar_0, sigma = 0.029, not 0), and
- ``sw``: the sliced Wasserstein-2 distance of the batch to exact samples of p at that last noise level: the
  distribution-level error, the fair one for stochastic samplers, which do not follow the ODE path.

The empirical order is -slope of log error against log model calls (least squares over the step counts).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch

import minidiff.schedulers as schedulers
from benchmarks.gaussian_mixture import GaussianMixture, MixtureDenoiser, sd_alphas_cumprod

HERE = os.path.dirname(os.path.abspath(__file__))
# Stable Diffusion 1.5's scheduler config (each class keeps its own default timestep_spacing, as in diffusers)
SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "prediction_type": "epsilon"}
SAMPLERS = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 3M", "DPM++ 2S",
            "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ 3M SDE", "UniPC", "DEIS",
            "DDIM", "PLMS", "LMS", "LMS Karras", "Euler Karras", "DDPM", "LCM", "TCD"]
# used only while minidiff.schedulers has no by_name: the classes that existed before it
FALLBACK = {"Euler": ("EulerDiscreteScheduler", {}), "Euler a": ("EulerAncestralDiscreteScheduler", {}),
            "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
            "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
            "DDIM": ("DDIMScheduler", {}), "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
            "LMS": ("LMSDiscreteScheduler", {}), "DDPM": ("DDPMScheduler", {})}
STOCHASTIC = {"Euler a", "DPM2 a", "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
              "DPM++ 3M SDE", "DDPM", "LCM", "TCD"}
STEPS = (4, 8, 16, 32)
BUILTIN_SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "DDIM"]
BUILTIN_STEPS = (4, 8, 16)


def make_scheduler(name: str, config: dict):
    """The sampler ``name`` via ``minidiff.schedulers.by_name`` (or the FALLBACK table before it exists); None if
    this minidiff has no such scheduler yet."""
    by_name = getattr(schedulers, "by_name", None)
    try:
        if by_name is not None:
            return by_name(name, config)
        class_name, options = FALLBACK[name]
        return getattr(schedulers, class_name).from_config({**config, **options})
    except (KeyError, AttributeError, ValueError):
        return None


def run_sampler(scheduler, model, noise: torch.Tensor, steps: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The standard loop; returns the start and the final sample as y = x / sqrt(abar) (the variance-exploding
    variable) and the first and last noise levels sigma the sampler walked between."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    x = noise * scheduler.init_noise_sigma
    sigma_start = first_sigma(scheduler, model)
    vp = float(scheduler.init_noise_sigma) == 1.0  # VP-scaled samples (DDIM, PLMS, DPM-Solver, UniPC, ...)
    y_start = x * math.sqrt(1 + sigma_start**2) if vp else x
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        extra = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
    sigma_end = last_sigma(scheduler)
    y = x * math.sqrt(1 + sigma_end**2) if vp else x
    return y_start, y, sigma_start, sigma_end


def first_sigma(scheduler, model: MixtureDenoiser) -> float:
    sigmas = getattr(scheduler, "sigmas", None)
    return float(sigmas[0]) if sigmas is not None else float(model.sigma(scheduler.timesteps[0]))


def last_sigma(scheduler) -> float:
    """The noise level of the final sample: the last sigma, or DDIM/PLMS's final abar (abar_0 when
    set_alpha_to_one is off); 0 for samplers whose last step returns the denoised sample."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        return float(sigmas[-1])
    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is None:
        return 0.0
    final = float(final)
    return math.sqrt((1 - final) / final)


def karras_grid(sigma_start: float, sigma_end: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n + 1 noise levels from sigma_start to sigma_end, dense at the low end (Karras et al. 2022, Eq. 5)."""
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    a, b = sigma_start ** (1 / rho), sigma_end ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def ode_reference(mixture: GaussianMixture, y: torch.Tensor, sigma_start: float, sigma_end: float,
                  n: int) -> torch.Tensor:
    """The probability-flow ODE dy/dsigma = eps(y, sigma) (Song et al. 2021, Eq. 13 in the variance-exploding
    variable; Karras et al. 2022, Eq. 4) from sigma_start to sigma_end with n classical RK4 steps, float64."""
    y = y.reshape(y.shape[0], -1).double()  # (B, D)
    grid = karras_grid(sigma_start, sigma_end, n)
    f = mixture.eps
    for s, s_next in zip(grid[:-1], grid[1:]):
        h = s_next - s
        k1 = f(y, s)
        k2 = f(y + h / 2 * k1, s + h / 2)
        k3 = f(y + h / 2 * k2, s + h / 2)
        k4 = f(y + h * k3, s_next)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance of two equal-size batches (B, D): the RMS over random unit directions of the
    1-D W2 distance between the sorted projections (Rabin et al. 2011)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=0)  # (D, P)
    pa, pb = (a.double() @ directions).sort(0).values, (b.double() @ directions).sort(0).values  # (B, P)
    return float(((pa - pb) ** 2).mean().sqrt())


def order(calls: list[int], errors: list[float]) -> float | None:
    """Empirical convergence order: -slope of the least-squares line through (log calls, log error)."""
    points = [(math.log(c), math.log(e)) for c, e in zip(calls, errors) if e > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(-np.polyfit(x, y, 1)[0])


class Measurement:
    """One setting: the mixture, its exact model, the start noise, exact samples, and cached ODE references."""

    def __init__(self, batch: int, ode_steps: int, seed: int = 0):
        self.mixture = GaussianMixture.seeded(dim=16, components=4, seed=seed)
        self.model = MixtureDenoiser(self.mixture, sd_alphas_cumprod())
        g = torch.Generator().manual_seed(seed + 1)
        self.noise = torch.randn(batch, 4, 2, 2, generator=g, dtype=torch.float64)  # latent-shaped, D = 16
        self.data = self.mixture.sample(batch, torch.Generator().manual_seed(seed + 2))
        self.data_noise = torch.randn(batch, self.mixture.dim, generator=torch.Generator().manual_seed(seed + 3),
                                      dtype=torch.float64)
        self.ode_steps, self._references = ode_steps, {}

    def reference(self, y_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        key = (round(sigma_start, 12), round(sigma_end, 12), round(float(y_start.flatten()[0]), 12))
        if key not in self._references:
            self._references[key] = ode_reference(self.mixture, y_start, sigma_start, sigma_end, self.ode_steps)
        return self._references[key]

    def exact_samples(self, sigma: float) -> torch.Tensor:
        """Exact samples of p_sigma: data + sigma * noise."""
        return self.data + sigma * self.data_noise

    def measure(self, name: str, scheduler, steps: int) -> dict:
        self.model.calls = 0
        y_start, y, sigma_start, sigma_end = run_sampler(scheduler, self.model, self.noise, steps, seed=steps)
        y = y.reshape(y.shape[0], -1).double()
        reference = self.reference(y_start, sigma_start, sigma_end)
        per_sample = ((y - reference) ** 2).mean(1).sqrt()  # (B,)
        modes = [self.mixture.component_log_probs(v, sigma_end).argmax(-1) for v in (y, reference)]  # (B,) each
        return {"steps": steps, "calls": self.model.calls, "sigma_start": sigma_start, "sigma_end": sigma_end,
                "rms": float(((y - reference) ** 2).mean().sqrt()), "median": float(per_sample.median()),
                "switched": float((modes[0] != modes[1]).double().mean()),
                "sw": sliced_wasserstein(y, self.exact_samples(sigma_end))}


def check_reference(setting: Measurement) -> dict:
    """The reference is converged: the same ODE at n and 2n RK4 steps, from sigma_max to 0, RMS apart."""
    y = setting.noise.reshape(setting.noise.shape[0], -1) * math.sqrt(1 + float(setting.model.train_sigmas[-1]) ** 2)
    sigma_max = float(setting.model.train_sigmas[-1])
    n = setting.ode_steps
    coarse = ode_reference(setting.mixture, y, sigma_max, 0.0, n)
    fine = ode_reference(setting.mixture, y, sigma_max, 0.0, 2 * n)
    exact = setting.exact_samples(0.0)
    return {"ode_steps": n, "rms_n_vs_2n": float(((coarse - fine) ** 2).mean().sqrt()),
            "sw_floor": sliced_wasserstein(exact, setting.mixture.sample(len(exact), torch.Generator().manual_seed(9))),
            "reference_sw": sliced_wasserstein(fine, exact),
            "reference_nll_per_dim": float(-setting.mixture.log_prob(fine).mean() / setting.mixture.dim),
            "exact_nll_per_dim": float(-setting.mixture.log_prob(exact).mean() / setting.mixture.dim)}


def mixture_table(setting: Measurement, names: list[str], steps: tuple[int, ...]) -> tuple[dict, list[str]]:
    """Every available sampler at every step count; the names that have no scheduler yet are returned apart."""
    results, missing = {}, []
    for name in names:
        scheduler = make_scheduler(name, SD_CONFIG)
        if scheduler is None:
            missing.append(name)
            continue
        try:
            runs = [setting.measure(name, scheduler, n) for n in steps]
        except Exception as error:  # a scheduler that fails on this loop gets a row saying so
            results[name] = {"failed": f"{type(error).__name__}: {error}"}
            continue
        calls = [r["calls"] for r in runs]
        results[name] = {"class": type(scheduler).__name__, "stochastic": name in STOCHASTIC, "runs": runs,
                         "order_rms": order(calls, [r["rms"] for r in runs]),
                         "order_median": order(calls, [r["median"] for r in runs]),
                         "order_sw": order(calls, [r["sw"] for r in runs])}
        print(f"{name}: calls {calls}, rms", " ".join(f"{r['rms']:.2e}" for r in runs), file=sys.stderr)
    return results, missing


def fewest_calls(results: dict, metric: str, threshold: float, stochastic: bool | None = None) -> tuple | None:
    """(calls, sampler, steps) of the cheapest measured run whose ``metric`` is <= threshold."""
    best = None
    for name, result in results.items():
        if "runs" not in result or (stochastic is not None and result["stochastic"] != stochastic):
            continue
        for run in result["runs"]:
            if run[metric] <= threshold and (best is None or run["calls"] < best[0]):
                best = (run["calls"], name, run["steps"])
    return best


def builtin_table(names: list[str], steps: tuple[int, ...], prompts: int) -> dict:
    """Held-out prompt match of the built-in model (scripts/builtin/evaluate.py's prompt_match: every attribute
    the prompt names read back from the pixels) per sampler and step count, guidance 5, one core."""
    from minidiff.builtin import load_builtin_pipeline
    from minidiff.training.shapes import held_out_prompts
    from scripts.builtin.evaluate import prompt_match

    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base_config, held_out = pipe.scheduler.config, held_out_prompts(prompts)
    table = {}
    for name in names:
        scheduler = make_scheduler(name, base_config)
        if scheduler is None:
            continue
        pipe.scheduler, row = scheduler, {}
        for n in steps:
            start = time.perf_counter()
            result = prompt_match(pipe, held_out, steps=n)
            row[n] = {"fraction": result["fraction"], "seconds": round(time.perf_counter() - start, 2)}
        table[name] = row
        print(f"built-in {name}: {[row[n]['fraction'] for n in steps]}", file=sys.stderr)
    return table


def format_markdown(report: dict) -> str:
    """The tables: calls / RMS-to-ODE / SW per step count, the orders, the thresholds, the built-in model's."""
    steps = report["steps"]
    lines = ["# Steps to quality", "",
             f"Exact Gaussian-mixture model (D = 16, 4 components), SD schedule, batch {report['batch']}; reference: "
             f"RK4 with {report['reference']['ode_steps']} steps (vs {2 * report['reference']['ode_steps']}: "
             f"{report['reference']['rms_n_vs_2n']:.1e} RMS apart). SW floor (two exact batches): "
             f"{report['reference']['sw_floor']:.3f}.", "",
             "| sampler | calls " + " / ".join(map(str, steps)) + " | RMS to ODE " + " / ".join(map(str, steps))
             + " | order | median " + " / ".join(map(str, steps)) + " | order | switched at " + str(steps[-1])
             + " | SW " + " / ".join(map(str, steps)) + " | final sigma |", "|---|---|---|---|---|---|---|---|---|"]
    for name, result in report["mixture"].items():
        if "runs" not in result:
            lines.append(f"| {name} | {result['failed']} |" + " |" * 7)
            continue
        runs = result["runs"]
        label = f"{name} (stochastic)" if result["stochastic"] else name
        order_rms, order_median = ("-" if result[key] is None else f"{result[key]:.2f}"
                                   for key in ("order_rms", "order_median"))
        calls = " / ".join(str(r["calls"]) for r in runs)
        rms = " / ".join(f"{r['rms']:.1e}" for r in runs)
        median = " / ".join(f"{r['median']:.1e}" for r in runs)
        sw = " / ".join(f"{r['sw']:.3f}" for r in runs)
        lines.append(f"| {label} | {calls} | {rms} | {order_rms} | {median} | {order_median} | "
                     f"{runs[-1]['switched']:.1%} | {sw} | {runs[-1]['sigma_end']:.3g} |")
    if report["missing"]:
        lines += ["", "Not available in this minidiff yet: " + ", ".join(report["missing"]) + "."]
    lines += ["", "Fewest model calls to reach an error (measured runs only):", ""]
    for metric, threshold, stochastic in report["thresholds"]:
        best = fewest_calls(report["mixture"], metric, threshold, stochastic)
        kind = {None: "any sampler", False: "deterministic", True: "stochastic"}[stochastic]
        answer = "none measured" if best is None else f"{best[1]}, {best[0]} calls ({best[2]} steps)"
        lines.append(f"- {metric} <= {threshold:.3g} ({kind}): {answer}")
    if report.get("builtin"):
        b_steps = report["builtin_steps"]
        lines += ["", f"## Built-in model: held-out prompt match ({report['builtin_prompts']} prompts, guidance 5)", "",
                  "| sampler | " + " | ".join(f"{n} steps" for n in b_steps) + " |", "|---|" + "---|" * len(b_steps)]
        for name, row in report["builtin"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[n]['fraction']:.1%}" for n in b_steps) + " |")
    return "\n".join(lines) + "\n"


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (174, 199, 232), (219, 219, 141),
           (158, 218, 229), (100, 100, 0), (0, 100, 100), (100, 0, 100), (200, 0, 0), (0, 0, 200)]


def write_png(path: str, report: dict) -> None:
    """Two log-log panels, one line per sampler against model calls: RMS to the ODE reference (deterministic
    samplers) and SW to exact samples (all; dashed: stochastic). PIL only (no matplotlib here)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = {name: r for name, r in report["mixture"].items() if "runs" in r}
    width, height, margin, legend = 460, 360, 60, 200
    image = Image.new("RGB", (2 * (width + margin) + legend, height + 2 * margin), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    calls = [run["calls"] for r in rows.values() for run in r["runs"]]
    for panel, (metric, title, only_deterministic) in enumerate(
            [("rms", "RMS to the ODE solution (deterministic)", True), ("sw", "SW distance to exact samples", False)]):
        values = [run[metric] for r in rows.values() for run in r["runs"]
                  if run[metric] > 0 and not (only_deterministic and r["stochastic"])]
        box = (margin + panel * (width + margin), margin, margin + panel * (width + margin) + width, margin + height)
        x_of = log_axis(min(calls), max(calls), box[0], box[2])
        y_of = log_axis(min(values), max(values), box[3], box[1])
        draw_axes(draw, font, box, title, x_of, y_of, (min(calls), max(calls)), (min(values), max(values)))
        for i, (name, r) in enumerate(rows.items()):
            if only_deterministic and r["stochastic"]:
                continue
            points = [(x_of(run["calls"]), y_of(run[metric])) for run in r["runs"] if run[metric] > 0]
            colour = PALETTE[i % len(PALETTE)]
            draw_polyline(draw, points, colour, dashed=r["stochastic"])
    for i, name in enumerate(rows):
        y = margin + 14 * i
        draw.line([2 * (width + margin) + 10, y + 6, 2 * (width + margin) + 30, y + 6], fill=PALETTE[i % len(PALETTE)],
                  width=2)
        draw.text((2 * (width + margin) + 36, y), name, fill="black", font=font)
    image.save(path)


def log_axis(low: float, high: float, pixel_low: float, pixel_high: float):
    """value -> pixel on a log scale mapping [low, high] (widened by 10%) to [pixel_low, pixel_high]."""
    a, b = math.log(low) - 0.1, math.log(high) + 0.1
    return lambda v: pixel_low + (math.log(v) - a) / (b - a) * (pixel_high - pixel_low)


def draw_axes(draw, font, box, title, x_of, y_of, x_range, y_range) -> None:
    """Frame, title and powers-of-two (x) / powers-of-ten (y) grid lines with labels."""
    draw.rectangle(box, outline="black")
    draw.text((box[0], box[1] - 16), title, fill="black", font=font)
    draw.text((box[0] + (box[2] - box[0]) // 2 - 30, box[3] + 20), "model calls", fill="black", font=font)
    for k in range(int(math.log2(x_range[0])), math.ceil(math.log2(x_range[1])) + 1):
        x = x_of(2**k)
        if box[0] <= x <= box[2]:
            draw.line([x, box[1], x, box[3]], fill=(220, 220, 220))
            draw.text((x - 6, box[3] + 4), str(2**k), fill="black", font=font)
    for k in range(math.floor(math.log10(y_range[0])), math.ceil(math.log10(y_range[1])) + 1):
        y = y_of(10.0**k)
        if box[1] <= y <= box[3]:
            draw.line([box[0], y, box[2], y], fill=(220, 220, 220))
            draw.text((box[0] - 40, y - 6), f"1e{k}", fill="black", font=font)


def draw_polyline(draw, points, colour, dashed: bool) -> None:
    """A line through the points with a dot at each; dashed: every other tenth of each segment left out."""
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        pieces = 10 if dashed else 1
        for j in range(0, pieces, 2 if dashed else 1):
            a, b = j / pieces, (j + 1) / pieces
            draw.line([x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)],
                      fill=colour, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 256, RK4 100 steps, no built-in model")
    parser.add_argument("--batch", type=int, default=None, help="samples per run (default 1024, quick 256)")
    parser.add_argument("--builtin-prompts", type=int, default=None, help="held-out prompts (default 16, quick 0)")
    parser.add_argument("--output", default=os.path.join(HERE, "steps_to_quality"),
                        help="path without extension for the .md, .json and .png (default benchmarks/steps_to_quality)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batch = args.batch or (256 if args.quick else 1024)
    setting = Measurement(batch, ode_steps=100 if args.quick else 200)
    mixture, missing = mixture_table(setting, SAMPLERS, STEPS)
    check = check_reference(setting)
    report = {"steps": list(STEPS), "batch": batch, "reference": check, "mixture": mixture,
              "missing": missing, "thresholds": [("rms", 1e-2, False), ("median", 1e-2, False), ("median", 1e-3, False),
                                ("sw", 1.1 * check["sw_floor"], None)]}
    prompts = args.builtin_prompts if args.builtin_prompts is not None else (0 if args.quick else 16)
    if prompts:
        report.update(builtin=builtin_table(BUILTIN_SAMPLERS, BUILTIN_STEPS, prompts),
                      builtin_steps=list(BUILTIN_STEPS), builtin_prompts=prompts)
    markdown = format_markdown(report)
    print(markdown)
    with open(args.output + ".md", "w") as f:
        f.write(markdown)
    with open(args.output + ".json", "w") as f:
        json.dump(report, f, indent=1)
    write_png(args.output + ".png", report)
    return report


if __name__ == "__main__":
    main()
