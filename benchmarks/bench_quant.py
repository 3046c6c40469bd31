"""Size, fidelity and generation speed of every quantization plan, measured side by side in one run.

Model: by default a random-weight model with MusicGen-Small's architecture, built from configs (T5-base text
encoder, EnCodec 32 kHz, decoder 1024 / 24 layers / 16 heads / 4096), no download; ``--tiny`` uses the
embedded tiny student instead (seconds), ``--model DIR`` any save_pretrained directory.

Per plan (fp32, paper, int8, adaptive):
- MB per component as stored in the bundle (EnCodec's encoder is never in a bundle), the reduction against
  the whole fp32 model, and against the same parts in fp32 (what quantization alone saved);
- teacher-forced top-1 agreement and KL(fp32 || plan) on fixed random codes and prompts (random weights give
  flat, near-tied distributions: agreement here is a pessimistic bound, not the trained model's);
- generation real-time factor (seconds of compute per second of audio; greedy, CFG 3, the same prompt, the
  same number of decoding steps), plans timed in turn, round-robin, best of ``--rounds``.
The adaptive plan's budget defaults to the paper plan's own fidelity on separate calibration batches (the
smallest plan at least as faithful as the paper's); ``--min-top1-agree`` sets a fixed budget instead.
Targets: int8 >= 60% smaller and >= 1.8x faster than fp32; adaptive no larger than paper, more faithful.
The script prints PASS/FAIL lines and always exits 0.

    python benchmarks/bench_quant.py [--steps 50] [--rounds 2] [--min-top1-agree 0.95] [--tiny | --model DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import transformers
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MusicgenForConditionalGeneration,
)

from tinymusician.models.musicgen import musicgen_small_config
from tinymusician.quant import (
    ReferenceLogits,
    SearchConfig,
    component_sizes,
    quantize_model,
    resolve_plan,
    search_plan,
)
from tinymusician.zoo.tiny import configure_generation


def small_architecture() -> MusicgenForConditionalGeneration:
    """MusicGen-Small's architecture with random weights (587M parameters, about 2.4 GB in fp32)."""
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(musicgen_small_config())
    with torch.no_grad():  # a random EnCodec has all-zero codebooks; give the codes something to decode
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    configure_generation(model)
    return model.eval()


def load_model(args: argparse.Namespace) -> MusicgenForConditionalGeneration:
    from tinymusician.models.musicgen import load_musicgen

    if args.model:
        return load_musicgen(args.model).eval()
    if args.tiny:
        from tinymusician.zoo.tiny import shipped_pair

        return load_musicgen(str(shipped_pair().student)).eval()
    return small_architecture()


def random_batches(model, count: int, frames: int, seed: int, captions: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_encoder.vocab_size
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (captions, 12), generator=generator)
        ids[:, -1] = 1  # </s>
        codes = torch.randint(
            0,
            model.config.decoder.vocab_size,
            (captions, model.config.decoder.num_codebooks, frames),
            generator=generator,
        )
        batches.append({"codes": codes, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


class StepClock(LogitsProcessor):
    """Records when each decoding step's logits arrive (a no-op on the scores)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def time_generation(model, prompt: dict, steps: int) -> tuple[float, float, float]:
    """(seconds of compute, seconds of audio, median seconds per decoding step) of one greedy CFG-3 run."""
    clock = StepClock()
    start = time.perf_counter()
    audio = model.generate(
        **prompt,
        guidance_scale=3.0,
        max_new_tokens=steps,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    seconds = time.perf_counter() - start
    if not torch.isfinite(audio.float()).all():
        raise RuntimeError("generated audio is not finite")
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)] or [seconds]
    return seconds, audio.shape[-1] / model.config.audio_encoder.sampling_rate, statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny student (seconds)")
    parser.add_argument("--model", default=None, help="a save_pretrained MusicGen directory instead")
    parser.add_argument("--steps", type=int, default=50, help="decoding steps per timed generation")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin timing rounds (best kept)")
    parser.add_argument("--frames", type=int, default=50, help="frames per teacher-forced batch")
    parser.add_argument(
        "--min-top1-agree",
        type=float,
        default=None,
        help="the adaptive plan's budget (default: the paper plan's own top-1 agreement and KL on the "
        "calibration batches, i.e. the smallest plan at least as faithful as the paper's)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core). On a machine shared with other jobs use 1: "
        "OpenMP threads that wait for a descheduled peer stall every parallel region (seconds per step)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    start = time.perf_counter()
    reference_model = load_model(args)
    fp32_sizes = component_sizes(reference_model)
    print(
        f"model: {'tiny student' if args.tiny else args.model or 'random MusicGen-Small architecture'}, "
        f"fp32 {fp32_sizes['total']:.1f} MB (T5 {fp32_sizes['text_encoder']:.1f}, decoder {fp32_sizes['decoder']:.1f}, "
        f"EnCodec decoder {fp32_sizes['codec']:.1f} + encoder {fp32_sizes['codec_encoder']:.1f}); "
        f"{torch.get_num_threads()} threads; built in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    evaluation = ReferenceLogits(reference_model, random_batches(reference_model, 2, args.frames, seed=1))
    calibration = random_batches(reference_model, 1, args.frames, seed=2)

    plans = {name: resolve_plan(name) for name in ("fp32", "paper", "int8")}
    if args.min_top1_agree is None:
        paper = ReferenceLogits(reference_model, calibration).compare(
            quantize_model(reference_model, plans["paper"])
        )
        budget = SearchConfig(min_top1_agree=paper.top1_agree, max_kl=paper.kl)
        print(f"adaptive budget = the paper plan's fidelity on the calibration batches: {budget.budget()}")
    else:
        budget = SearchConfig(min_top1_agree=args.min_top1_agree)
    start = time.perf_counter()
    search = search_plan(reference_model, calibration, budget)
    print(search.table())
    print(
        f"adaptive search: {search.evaluations} evaluations in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    plans["adaptive"] = search.plan

    rows: dict[str, dict] = {}
    models = {}
    for name, plan in plans.items():
        model = quantize_model(reference_model, plan)
        sizes = component_sizes(model)
        fidelity = evaluation.compare(model)
        deployed_fp32 = fp32_sizes["total"] - fp32_sizes["codec_encoder"]
        rows[name] = {
            "sizes": sizes,
            "reduction": 1 - sizes["total"] / fp32_sizes["total"],
            "reduction_deployed": 1 - sizes["total"] / deployed_fp32,
            "top1": fidelity.top1_agree,
            "kl": fidelity.kl,
            "plan": plan.describe(),
        }
        models[name] = model
    del reference_model
    gc.collect()

    prompt_ids = random_batches(models["fp32"], 1, 1, seed=3, captions=1)[0]
    prompt = {"input_ids": prompt_ids["input_ids"], "attention_mask": prompt_ids["attention_mask"]}
    for model in models.values():  # warm-up: first-call allocations and kernel selection
        time_generation(model, prompt, 4)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    audio_seconds = 0.0
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds, audio_seconds, step = time_generation(model, prompt, args.steps)
            timings[name].append((seconds, step))
    for name in models:
        best = min(timings[name])
        rows[name]["rtf"], rows[name]["step_ms"] = best[0] / audio_seconds, 1000 * best[1]

    fp32 = rows["fp32"]
    print(
        f"\n{args.steps} greedy steps with CFG 3 = {audio_seconds:.2f} s of audio; RTF = compute s / audio s "
        f"(best of {args.rounds}); sizes in MB (1e6 bytes), bundle content (no EnCodec encoder)"
    )
    header = (
        f"{'plan':<9}{'T5':>8}{'decoder':>9}{'EnCodec':>9}{'total':>9}{'smaller':>9}{'(same parts)':>13}"
        f"{'top-1':>8}{'KL':>10}{'RTF':>7}{'speed-up':>9}{'step ms':>9}"
    )
    print(header)
    print(
        f"{'fp32 all':<9}{fp32_sizes['text_encoder']:>8.1f}{fp32_sizes['decoder']:>9.1f}"
        f"{fp32_sizes['codec'] + fp32_sizes['codec_encoder']:>9.1f}{fp32_sizes['total']:>9.1f}"
        "   (the whole fp32 model, EnCodec encoder included)"
    )
    for name, row in rows.items():
        s = row["sizes"]
        print(
            f"{name:<9}{s['text_encoder']:>8.1f}{s['decoder']:>9.1f}{s['codec']:>9.1f}{s['total']:>9.1f}"
            f"{100 * row['reduction']:>8.1f}%{100 * row['reduction_deployed']:>12.1f}%"
            f"{row['top1']:>8.4f}{row['kl']:>10.2e}{row['rtf']:>7.2f}{fp32['rtf'] / row['rtf']:>8.2f}x"
            f"{row['step_ms']:>9.0f}"
        )
    print(f"adaptive plan: {rows['adaptive']['plan']}")

    int8, paper, adaptive = rows["int8"], rows["paper"], rows["adaptive"]
    checks = [
        ("int8 >= 60% smaller than fp32 (whole model)", int8["reduction"] >= 0.60),
        ("int8 >= 1.8x faster than fp32", fp32["rtf"] / int8["rtf"] >= 1.8),
        ("adaptive no larger than paper", adaptive["sizes"]["total"] <= paper["sizes"]["total"] + 1e-9),
        (
            "adaptive more faithful than paper (top-1 higher, or equal with lower KL)",
            adaptive["top1"] > paper["top1"]
            or (adaptive["top1"] == paper["top1"] and adaptive["kl"] < paper["kl"]),
        ),
    ]
    if args.tiny or args.model:
        print("(the targets are set for the MusicGen-Small architecture, the default model)")
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")


if __name__ == "__main__":
    main()
