"""The text-to-image model: sampling in pixel and latent space, the diffusers save/load layout
(`vae/` included), the stage's training steps on an autoencoder's latents, and exact
resumption after a SIGKILL."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordingLog, tiny_vae
from diffusers import AutoencoderKL
from PIL import Image

from ml.config import TrainConfig, load_config, to_dict
from ml.data.mixed import MixManifest
from ml.data.mixed_dataset import MixedDataset
from ml.data.recaption import recaption_shard
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import write_shards
from ml.diffusion import caches
from ml.diffusion.caches import Posteriors
from ml.diffusion.config import DiffusionConfig, DistillConfig
from ml.diffusion.distill import (
    NoiseSchedule,
    build_student,
    consistency_function,
    distill,
)
from ml.diffusion.pipeline import (
    TextToImagePipeline,
    build_pipeline,
    encode_prompts,
    predict_noise,
)
from ml.diffusion.training import caption_corpus
from ml.stage import Inputs, run_stage
from ml.stages import diffusion_model

REPO = Path(__file__).resolve().parents[1]
TINY = DiffusionConfig(
    image_size=16,
    vocab_size=300,
    text_dim=32,
    text_layers=1,
    text_heads=2,
    text_ff_dim=64,
    max_text_length=64,
    block_out_channels=(8, 16),
    cross_attention_levels=1,
    attention_head_dim=4,
    norm_num_groups=4,
    num_train_timesteps=100,
    sample_every=0,
    train=TrainConfig(
        steps=6, batch_size=4, warmup_steps=2, ema_decay=0.995, log_every=1, checkpoint_every=2
    ),
)
PROMPTS = ["a red circle in the top left corner", "a large blue square on the right"]
pytestmark = pytest.mark.usefixtures("one_thread")  # every test here: see conftest
# What the toy BPE tokenizer learns its vocabulary from when a test builds a model directly.
CORPUS = [s.meta["descriptive_caption"] for s in generate(50, 0, ShapeWorldConfig(), "corpus")]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 ShapeWorld samples in 2 shards, their ground-truth descriptive captions as "dsc"."""
    root = tmp_path_factory.mktemp("data")
    samples = list(generate(20, seed=0, cfg=ShapeWorldConfig(image_size=16), split="train"))
    names = write_shards(samples, root / "shards", shard_size=10)
    captions = iter(s.meta["descriptive_caption"] for s in samples)
    shards, sidecars = [], []
    for name in names:
        shards.append(str(root / "shards" / name))
        sidecars.append(str(root / "sidecars" / name.replace(".tar", ".parquet")))
        # The captioner sees the shard's images in order, so it can replay the truth.
        truth = {"dsc": lambda images: [next(captions) for _ in images]}
        recaption_shard(shards[-1], Path(sidecars[-1]), truth, "truth", batch_size=10)
    path = root / "manifest.json"
    MixManifest(shards, sidecars, "dsc", synthetic_ratio=0.95, seed=0).save(path)
    return path


def pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def same_images(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


def weights(pipe: TextToImagePipeline) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    return {f"{m}.{k}": v for m, module in modules.items() for k, v in module.state_dict().items()}


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


# --- pipeline ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "space"), [("ddim", "pixel"), ("dpm", "pixel"), ("ddim", "latent")]
)
def test_sampling_is_deterministic_per_seed_and_survives_save_load(
    sampler: str, space: str, tmp_path: Path
) -> None:
    vae_dir = tiny_vae(tmp_path / "vae") if space == "latent" else None
    pipe = build_pipeline(TINY, CORPUS, vae_dir)
    pipe.set_progress_bar_config(disable=True)
    side = 8 if space == "latent" else 16  # the U-Net's: the autoencoder halves 16 px once
    assert pipe.unet.config.sample_size == side and pipe.image_size == 16
    images = pipe(PROMPTS, num_inference_steps=4, seed=1, sampler=sampler)
    assert [im.size for im in images] == [(16, 16)] * 2 and images[0].mode == "RGB"
    assert same_images(images, pipe(PROMPTS, num_inference_steps=4, seed=1, sampler=sampler))
    other = pipe(PROMPTS, num_inference_steps=4, seed=2, sampler=sampler)
    assert not any(np.array_equal(x, y) for x, y in zip(pixels(images), pixels(other), strict=True))

    pipe.save_pretrained(tmp_path / "pipe")
    saved = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert saved["_class_name"] == "TextToImagePipeline"
    folders = {p.name for p in (tmp_path / "pipe").iterdir()}
    assert {"unet", "text_encoder", "tokenizer", "scheduler"} <= folders
    assert ("vae" in folders) == (space == "latent")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.vae is None) == (space == "pixel")
    assert loaded.tokenizer.model_max_length == TINY.max_text_length
    assert same_images(images, loaded(PROMPTS, num_inference_steps=4, seed=1, sampler=sampler))
    # the learned vocabulary survives, eos included: the empty (guidance) prompt is one token
    eos = loaded.tokenizer.eos_token_id
    assert loaded.tokenizer([""]).input_ids == [[eos]]
    assert loaded.tokenizer(PROMPTS).input_ids == pipe.tokenizer(PROMPTS).input_ids


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_toy_tokenizers_end_every_prompt_with_eos(tokenizer: str) -> None:
    pipe = build_pipeline(replace(TINY, tokenizer=tokenizer), CORPUS)
    ids = pipe.tokenizer(["", PROMPTS[0]]).input_ids
    assert ids[0] == [pipe.tokenizer.eos_token_id] and ids[1][-1] == pipe.tokenizer.eos_token_id
    if tokenizer == "bpe":  # learned word pieces: a caption is far shorter than in bytes
        assert len(ids[1]) < len(PROMPTS[0])
        assert len(pipe.tokenizer) == TINY.vocab_size
    with pytest.raises(ValueError, match="corpus"):
        build_pipeline(TINY)


def test_missing_pretrained_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-t5"):
        build_pipeline(replace(TINY, text_encoder_path=str(tmp_path / "no-t5")), CORPUS)
    with pytest.raises(FileNotFoundError, match="image_autoencoder.*no-vae"):
        build_pipeline(TINY, CORPUS, tmp_path / "no-vae")


def test_config_round_trips_and_validates(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(to_dict(TINY)))
    assert load_config(DiffusionConfig, tmp_path / "config.json") == TINY
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ValueError, match=r"train: unknown field\(s\) \['stepz'\]"):
        load_config(DiffusionConfig, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="norm_num_groups"):
        replace(TINY, block_out_channels=(6, 16))
    with pytest.raises(ValueError, match="mixed_precision"):
        replace(TINY.train, mixed_precision="fp8")
    with pytest.raises(ValueError, match="cross_attention_levels"):
        replace(TINY, cross_attention_levels=3)


@pytest.mark.parametrize("levels", [1, 2])
def test_cross_attention_sits_in_the_lowest_resolution_levels(levels: int) -> None:
    unet = build_pipeline(replace(TINY, cross_attention_levels=levels), CORPUS).unet
    attends = [block.startswith("CrossAttn") for block in unet.config.down_block_types]
    assert attends == [False] * (2 - levels) + [True] * levels
    assert unet.config.up_block_types[:levels] == ("CrossAttnUpBlock2D",) * levels


# --- training ---------------------------------------------------------------------------------


def test_training_steps_change_the_weights(manifest: Path, tmp_path: Path) -> None:
    cfg = replace(TINY, sample_every=2, train=replace(TINY.train, steps=2))
    cfg.eval = replace(cfg.eval, prompts=9, sampling_steps=2)
    log = RecordingLog()
    vae_dir = tiny_vae(tmp_path / "vae")
    inputs = Inputs(
        {"mixed_training_set": manifest.parent, "image_autoencoder": vae_dir},
        work=tmp_path / "work",
    )
    result = run_stage(diffusion_model.STAGE, cfg, inputs, tmp_path / "out", log)
    assert result.metadata["steps"] == 2 and result.speed["train_images_per_s"] > 0
    assert result.speed["checkpoint_share"] > 0  # two checkpoints written, and timed
    # the 20 images' posteriors, encoded once into the run's folder (ml.diffusion.caches)
    assert len(Posteriors.load(inputs.checkpoints(cfg) / caches.POSTERIORS)) == 20
    assert result.metadata["latent_shape"] == [4, 8, 8] and result.metadata["image_size"] == 16
    asked = {"color_accuracy", "color_low", "color_high", "two_object_accuracy"}
    assert asked | {"two_object_low", "short_color_accuracy"} <= result.metrics.keys()
    assert result.metrics["color_low"] <= result.metrics["color_accuracy"]
    trained = TextToImagePipeline.from_pretrained(tmp_path / "out")
    assert (trained.unet.config.in_channels, trained.unet.config.sample_size) == (4, 8)
    # the autoencoder travels with the model, frozen: its weights are the asset's
    vae = AutoencoderKL.from_pretrained(vae_dir)
    theirs = trained.vae.state_dict()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in vae.state_dict().items())
    corpus = caption_corpus(MixedDataset(MixManifest.load(manifest)))
    before, after = weights(build_pipeline(cfg, corpus, vae_dir)), weights(trained)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_"))

    assert [(step, total) for step, total, _ in log.figures] == [(1, 2), (2, 2)]
    assert all(
        np.isfinite(v["loss"]) and v["lr"] > 0 and v["samples_per_s"] > 0 for *_, v in log.figures
    )
    assert log.images == [("samples", 2)]
    images = trained(PROMPTS, num_inference_steps=2, seed=0)
    assert [im.size for im in images] == [(16, 16)] * 2


# --- consistency distillation -----------------------------------------------------------------


def test_consistency_function_is_the_identity_at_t0() -> None:
    """The boundary condition f(x, 0) = x, whatever the U-Net predicts."""
    teacher = build_pipeline(TINY, CORPUS)
    student = build_student(teacher.unet, DistillConfig(guidance_embedding_dim=8))
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)  # a non-trivial student
    schedule = NoiseSchedule.of(teacher.scheduler, torch.device("cpu"))
    text = encode_prompts(teacher.tokenizer, teacher.text_encoder, PROMPTS)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    guidance = torch.tensor([1.0, 4.0])
    with torch.no_grad():
        at_zero = consistency_function(
            student, schedule, x, torch.tensor([0, 0]), text, guidance, 10
        )
        later = consistency_function(
            student, schedule, x, torch.tensor([50, 50]), text, guidance, 10
        )
    assert torch.equal(at_zero, x)
    assert not torch.allclose(later, x)


def test_student_starts_as_the_teacher() -> None:
    """The guidance projection starts at zero: the student's U-Net output equals the
    teacher's, for any guidance scale, until distillation moves it."""
    teacher = build_pipeline(TINY, CORPUS)
    student = build_student(teacher.unet, DistillConfig(guidance_embedding_dim=8))
    states, mask = encode_prompts(teacher.tokenizer, teacher.text_encoder, PROMPTS)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 90])
    with torch.no_grad():
        want = predict_noise(teacher.unet, x, t, states, mask)
        got = predict_noise(student, x, t, states, mask, torch.tensor([1.0, 7.0]))
    assert torch.allclose(want, got, atol=1e-6)
    with pytest.raises(ValueError, match="guidance"):
        predict_noise(student, x, t, states, mask)


def test_distilled_model_samples_in_two_steps_from_the_same_layout(
    manifest: Path, tmp_path: Path
) -> None:
    teacher = build_pipeline(TINY, CORPUS)
    log = RecordingLog()
    cfg = DistillConfig(
        guidance_embedding_dim=8, train=TrainConfig(steps=3, batch_size=4, log_every=1)
    )
    student, result = distill(teacher, cfg, MixedDataset(MixManifest.load(manifest)), log)
    assert result.steps == 3 and [step for step, *_ in log.figures] == [1, 2, 3]
    assert all(np.isfinite(v["loss"]) and v["loss"] >= 0 for *_, v in log.figures)
    student.save_pretrained(tmp_path / "student")

    student = TextToImagePipeline.from_pretrained(tmp_path / "student")
    student.set_progress_bar_config(disable=True)
    assert student.is_distilled and not teacher.is_distilled
    assert type(student.scheduler).__name__ == "LCMScheduler"
    images = student(PROMPTS, num_inference_steps=2, guidance_scale=3.0, seed=0)
    assert [im.size for im in images] == [(16, 16)] * 2
    assert same_images(images, student(PROMPTS, num_inference_steps=2, guidance_scale=3.0, seed=0))
    assert not same_images(images, student(PROMPTS, num_inference_steps=2, seed=1))
    with pytest.raises(ValueError, match="lcm"):
        student(PROMPTS, num_inference_steps=2, sampler="ddim")
