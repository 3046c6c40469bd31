"""Measure a tiny world through the public paths and write its report (markdown, PNGs, WAVs).

Measured on held-out clips no world model saw (``data.synthetic.heldout_clips``), rendered directly:
the codec's reconstruction, the CLAP's retrieval and per-attribute accuracy, the CLAP score of the teacher's
generations with their own prompts and with shuffled ones, and FAD (tiny-CLAP and codec embedders) of the
teacher's generations, of the untrained student's and of noise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinymusician.data.synthetic import ATTRIBUTES, heldout_clips
from tinymusician.metrics.embedders import ClapEmbedder, EncodecEmbedder
from tinymusician.metrics.evaluation import PROJECT_ROOT, Evaluation, GeneratedSet, generate_audio
from tinymusician.models.musicgen import load_musicgen, load_tokenizer
from tinymusician.world.clap import retrieval_and_attributes
from tinymusician.world.codec import CodecRecipe, evaluate_codec, log_mel, reconstruct, untrained_codec

log = logging.getLogger(__name__)

CLAP_CLIPS = 256  # held-out clips of the retrieval / attribute test
SECONDS = 2.0


def derangement(n: int, seed: int = 3) -> np.ndarray:
    """A permutation with no fixed point: every clip gets another clip's prompt."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.where(perm == np.arange(n), (perm + 1) % n, perm)


def noise_clips(n: int, samples: int, seed: int = 0) -> list[torch.Tensor]:
    """White noise at the corpus's loudness range (peak 0.2-0.95)."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        x = rng.standard_normal(samples)
        clips.append(torch.from_numpy((x / np.abs(x).max() * rng.uniform(0.2, 0.95)).astype(np.float32)))
    return clips


def score_sets(
    clap: ClapEmbedder,
    codec: EncodecEmbedder,
    sets: dict[str, GeneratedSet],
    reference: list[torch.Tensor],
    sample_rate: int,
) -> dict[str, dict]:
    """FAD (tiny CLAP, world codec) and CLAP score of each set against the held-out reference."""
    evaluation = Evaluation([clap, codec], clap=clap)
    evaluation.add_reference(reference, sample_rate)
    evaluation.set_reference({"kind": "heldout", "n_clips": len(reference), "clip_seconds": SECONDS})
    results = {}
    for name, generated in sets.items():
        result = evaluation.score(generated)
        results[name] = {
            "fad_clap": result["fad"]["clap"]["fad"],
            "fad_encodec": result["fad"]["encodec"]["fad"],
            "clap": result["clap"]["score"],
            "clap_std": float(np.std(result["clap"]["per_clip"])),
            "n_clips": result["n_clips"],
        }
    evaluation.close()
    return results


def measure_world(
    world: str | Path, *, n_clips: int | None = None, clap_clips: int = CLAP_CLIPS, progress: bool = True
) -> dict[str, Any]:
    """Every number of the world report, measured now from the saved models (no training).

    ``n_clips`` held-out prompts / reference clips (default: the build's ``eval_clips``), ``clap_clips`` for the
    CLAP retrieval test. The tests call it with small samples.
    """
    world = Path(world)
    build = json.loads((world / "build.json").read_text()) if (world / "build.json").is_file() else {}
    n = n_clips or build.get("eval_clips") or 64
    teacher, tokenizer = load_musicgen(str(world / "teacher")), load_tokenizer(str(world / "teacher"))
    student = load_musicgen(str(world / "student"))
    sample_rate = int(teacher.config.audio_encoder.sampling_rate)
    clips = heldout_clips(n, seconds=SECONDS, sample_rate=sample_rate)
    prompts = [clip.caption for clip in clips]
    reference = [torch.from_numpy(clip.audio) for clip in clips]

    recipe = CodecRecipe(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in build.get("codec", {}).get("recipe", {}).items()
        }
    )
    codec_heldout = torch.stack(reference[: min(48, n)])
    codec = {
        "trained": evaluate_codec(teacher.audio_encoder, codec_heldout),
        "untrained": evaluate_codec(untrained_codec(recipe), codec_heldout),
    }
    codec["mel_ratio"] = codec["trained"]["mel_distance"] / codec["untrained"]["mel_distance"]

    generate = dict(seconds=SECONDS, guidance_scale=3.0, seed=0, batch_size=16, progress=progress)
    teacher_set = generate_audio(teacher, tokenizer, prompts, desc="teacher", **generate)
    student_set = generate_audio(student, tokenizer, prompts, desc="untrained student", **generate)
    shuffled = [prompts[j] for j in derangement(n)]
    reconstructions = list(reconstruct(teacher.audio_encoder, torch.stack(reference))[1])
    sets = {
        "teacher": teacher_set,
        "teacher_shuffled_prompts": GeneratedSet(teacher_set.audio, sample_rate, shuffled),
        "untrained_student": student_set,
        "noise": GeneratedSet(noise_clips(n, reference[0].shape[-1]), sample_rate, prompts),
        # the best any generator can reach through this codec: the held-out clips' own codes, decoded
        "codec_reconstructions": GeneratedSet(reconstructions, sample_rate, prompts),
        "heldout_clips": GeneratedSet(reference, sample_rate, prompts),
        "heldout_shuffled_prompts": GeneratedSet(reference, sample_rate, shuffled),
    }
    clap_embedder = ClapEmbedder(str(world / "clap"))  # loaded once: FAD, CLAP score and retrieval
    # teacher and student share one codec (tests/world check it), so the teacher's embeds for both
    codec_embedder = EncodecEmbedder(f"tiny world codec ({world})", codec=teacher.audio_encoder)
    scores = score_sets(clap_embedder, codec_embedder, sets, reference, sample_rate)
    clap = retrieval_and_attributes(
        clap_embedder, heldout_clips(clap_clips, seconds=SECONDS, sample_rate=sample_rate, seed=1)
    )

    orderings = {
        "clap(teacher, own prompts) > clap(teacher, shuffled)": scores["teacher"]["clap"]
        > scores["teacher_shuffled_prompts"]["clap"],
        **{
            f"fad_{e}: teacher < untrained student < noise": scores["teacher"][f"fad_{e}"]
            < scores["untrained_student"][f"fad_{e}"]
            < scores["noise"][f"fad_{e}"]
            for e in ("clap", "encodec")
        },
        "codec mel distance < untrained codec's": codec["mel_ratio"] < 1.0,
        "clap R@1 >= 10x chance": clap["R@1"] >= 10 * clap["chance_R@1"],
    }
    summary = {
        "N": n,
        "codec_mel_ratio": round(codec["mel_ratio"], 3),
        "codec_min_code_usage": codec["trained"]["min_code_usage"],
        "codec_tones_within_semitone": f"{codec['trained']['tones_within_semitone']}/7",
        "codec_snr_db": round(codec["trained"]["snr_db"], 2),
        "clap_R@1_x_chance": round(clap["R@1"] / clap["chance_R@1"], 1),
        **{f"clap_accuracy_{name}": round(clap[f"accuracy_{name}"], 3) for name in ATTRIBUTES},
        "teacher_val_ce": build.get("teacher", {}).get("val_ce"),
        **{
            f"{k}/{m}": round(v[m], 4) for k, v in scores.items() for m in ("fad_clap", "fad_encodec", "clap")
        },
        "orderings_hold": all(orderings.values()),
    }
    targets = {
        "codec mel distance <= 0.35x the untrained codec's": codec["mel_ratio"] <= 0.35,
        "codec: >= 50% of every codebook's codes used": codec["trained"]["min_code_usage"] >= 0.5,
        "codec: >= 5 of 7 probe tones within a semitone": codec["trained"]["tones_within_semitone"] >= 5,
        "CLAP: held-out text->audio R@1 >= 10x chance": clap["R@1"] >= 10 * clap["chance_R@1"],
    }
    return {
        "world": str(world),
        "targets": targets,
        "summary": summary,
        "orderings": orderings,
        "codec": codec,
        "clap": clap,
        "scores": scores,
        "build": build,
        "sets": {
            "teacher": teacher_set,
            "reference": reference,
            "reconstructions": reconstructions,
            "prompts": prompts,
            "codec": teacher.audio_encoder,
        },
        "definitions": {
            "reference": f"{n} held-out synthetic clips (indices from data.synthetic.HELDOUT_START, seed 0), {SECONDS} s, rendered directly",
            "prompts": "each held-out clip's own caption; 'shuffled' = a derangement of the same captions",
            "generation": f"sampling, top-k {teacher.generation_config.top_k} (the models' generation config), "
            "classifier-free guidance 3, seed 0",
            "fad_clap": "FAD over the tiny CLAP's 64-d audio embeddings (one per clip)",
            "fad_encodec": "FAD over the world codec's encoder latents (frames)",
            "clap": "mean cosine(text embedding of the prompt, audio embedding of its clip), tiny CLAP",
            "codec": "48 held-out clips; mel distance = mean |log-mel diff| (1024/256, 64 mels, floor 1e-5); pitch of 7 probe tones by YIN",
            "clap_retrieval": f"{clap_clips} held-out clips (seed 1), text->audio R@1 / R@5; zero-shot accuracy per attribute",
        },
    }


# --- the report -------------------------------------------------------------------------------------------
def write_wav(path: Path, audio: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    import soundfile

    soundfile.write(str(path), np.asarray(audio, dtype=np.float32), sample_rate, subtype="PCM_16")


def figures(measured: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    sets = measured["sets"]
    reference, decoded = sets["reference"][:3], sets["reconstructions"][:3]
    fig, axes = plt.subplots(2, 3, figsize=(12, 5), sharex=True, sharey=True)
    for column, (ref, rec) in enumerate(zip(reference, decoded, strict=True)):
        spectra = [log_mel(audio[None], 1024, 64)[0].numpy() for audio in (ref, rec)]
        low, high = min(x.min() for x in spectra), max(x.max() for x in spectra)  # one colour scale per pair
        for row, (spectrum, title) in enumerate(
            zip(spectra, ("held-out clip", "codec reconstruction"), strict=True)
        ):
            axes[row, column].imshow(
                spectrum, origin="lower", aspect="auto", cmap="magma", vmin=low, vmax=high
            )
            axes[row, column].set_title(f"{title} {column}", fontsize=9)
    fig.suptitle("log-mel (64 bands, hop 256): held-out clips vs the world codec's reconstructions")
    fig.tight_layout()
    fig.savefig(out / "codec_spectrograms.png", dpi=80)
    plt.close(fig)
    names.append("codec_spectrograms.png")

    clap = measured["clap"]
    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(16, 3.4))
    for axis, (name, values) in zip(axes, ATTRIBUTES.items(), strict=True):
        confusion = np.array(clap[f"confusion_{name}"])
        axis.imshow(confusion, cmap="Blues")
        axis.set_xticks(range(len(values)), values, rotation=45, fontsize=7)
        axis.set_yticks(range(len(values)), values, fontsize=7)
        axis.set_title(f"{name}: {clap[f'accuracy_{name}']:.2f}", fontsize=9)
        for (i, j), count in np.ndenumerate(confusion):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.suptitle(
        f"tiny CLAP zero-shot attribute confusion (true rows, predicted columns), N={clap['n_clips']}"
    )
    fig.tight_layout()
    fig.savefig(out / "clap_confusion.png", dpi=80)
    plt.close(fig)
    names.append("clap_confusion.png")

    build = measured["build"]
    if build.get("teacher", {}).get("curve"):
        curve = build["teacher"]["curve"]
        fig, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(
            [r["step"] for r in curve], [r["train_ce"] for r in curve], lw=0.6, alpha=0.6, label="train CE"
        )
        val = [r for r in curve if "val_ce" in r]
        axis.plot([r["step"] for r in val], [r["val_ce"] for r in val], "o-", label="val CE")
        axis.set_xlabel("step")
        axis.set_ylabel("cross-entropy (nats)")
        axis.set_title("tiny teacher training")
        axis.legend()
        fig.tight_layout()
        fig.savefig(out / "teacher_curve.png", dpi=80)
        plt.close(fig)
        names.append("teacher_curve.png")
    return names


def write_report(world: str | Path, measured: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = measured["sets"]
    sample_rate = int(sets["codec"].config.sampling_rate)
    decoded = sets["reconstructions"]
    wavs = []
    for i in range(3):
        for kind, audio in (
            ("heldout", sets["reference"][i]),
            ("codec", decoded[i]),
            ("teacher", sets["teacher"].audio[i]),
        ):
            name = f"{i}_{kind}.wav"
            write_wav(out / name, audio, sample_rate)
            wavs.append(name)
    images = figures(measured, out)
    plain = {k: v for k, v in measured.items() if k != "sets"}
    plain["prompts_of_wavs"] = sets["prompts"][:3]
    (out / "world_report.json").write_text(json.dumps(plain, indent=1, default=str))
    lines = markdown(plain, images, wavs)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def display_path(path: str) -> str:
    """Relative to the repository when inside it (the report is committed)."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return path


def markdown(m: dict, images: list[str], wavs: list[str]) -> list[str]:
    build, codec, clap, scores = m["build"], m["codec"], m["clap"], m["scores"]
    machine = build.get("machine", {})
    lines = [
        "# The tiny world",
        "",
        f"World `{display_path(m['world'])}`, budget `{build.get('budget', '?')}`, built in {build.get('build_seconds', 0) / 60:.1f} min "
        f"on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, one thread per stage; torch {machine.get('torch', '?')}).",
        "Regenerate: `python -m tinymusician.world build` (or `report` to re-measure).",
        "",
        "## Orderings",
        "",
        *[f"- {'holds' if ok else 'DOES NOT HOLD'}: {name}" for name, ok in m["orderings"].items()],
        "",
        "## The issue's targets for the parts",
        "",
        *[f"- {'met' if ok else 'NOT MET'}: {name}" for name, ok in m["targets"].items()],
        "",
        "## Codec",
        "",
        f"{codec['trained']['n_clips']} held-out clips. Mel distance {codec['trained']['mel_distance']:.3f} vs untrained "
        f"{codec['untrained']['mel_distance']:.3f} (ratio {codec['mel_ratio']:.2f}; issue target <= 0.35), SNR "
        f"{codec['trained']['snr_db']:.1f} dB, code usage per codebook {codec['trained']['code_usage']} of 256 "
        f"(min {codec['trained']['min_code_usage']:.0%}), tones within a semitone {codec['trained']['tones_within_semitone']}/7.",
        "",
        "| probe | f0 (Hz) | estimate (Hz) | semitones |",
        "|---|---|---|---|",
        *[
            f"| {t['instrument']} | {t['f0']} | {t['estimate']} | {t['semitones']} |"
            for t in codec["trained"]["tones"]
        ],
        "",
        "## CLAP",
        "",
        f"{clap['n_clips']} held-out 2 s clips: text->audio R@1 {clap['R@1']:.3f} ({clap['R@1'] / clap['chance_R@1']:.1f}x chance "
        f"{clap['chance_R@1']:.4f}; oracle {clap['oracle_R@1']:.3f}), R@5 {clap['R@5']:.3f}. Zero-shot accuracy: "
        + ", ".join(
            f"{name} {clap[f'accuracy_{name}']:.2f} (chance {1 / len(v):.2f})"
            for name, v in ATTRIBUTES.items()
        )
        + ".",
        "",
        "## Teacher, untrained student, noise",
        "",
        f"Teacher val CE {build.get('teacher', {}).get('val_ce', float('nan')):.3f} nats on its own corpus's val split "
        f"(ln 256 = 5.545).",
        "",
        "| set | N | FAD tiny CLAP | FAD codec | CLAP score (mean +- std) |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {s['n_clips']} | {s['fad_clap']:.4f} | {s['fad_encodec']:.4f} | {s['clap']:.3f} +- {s['clap_std']:.3f} |"
            for name, s in scores.items()
        ],
        "",
        "## Definitions",
        "",
        *[f"- {k}: {v}" for k, v in m["definitions"].items()],
        "",
        "## Figures and sounds",
        "",
        *[f"![{name}]({name})" for name in images],
        "",
        f"WAVs (prompts: {m['prompts_of_wavs']}): " + ", ".join(f"[{w}]({w})" for w in wavs),
    ]
    return lines
