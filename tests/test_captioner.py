"""Unit tests of the captioner: checkpoint round trip, loss masking, training, decoding, scores."""

import random

import pytest
import torch
from conftest import RecordingLog

from ml.captioner.config import CaptionerConfig
from ml.captioner.generate import batch_seed, generate_captions
from ml.captioner.model import Captioner
from ml.captioner.train import (
    caption_loss,
    make_batch,
    micro_batch_loss,
    micro_batches,
    train_captioner,
)
from ml.config import TrainConfig
from ml.data.shapeworld import (
    SHAPES,
    Scene,
    ShapeWorldConfig,
    descriptive_caption,
    generate,
    sample_scene,
)
from ml.eval.captions import evaluate_dsc, evaluate_ssc
from ml.tokenizer import train_tokenizer

CAPTIONS = [
    "a red circle",
    "A large blue square on the left.",
    "Two shapes on a plain gray background: a small green star at the top and a white cross.",
    'A striped navy background with a yellow diamond. It reads "SALE".',
    "stock photo",
    "a small purple triangle in the bottom right corner",
]
TINY = CaptionerConfig(
    clip_dim=8, token_grid=3, token_dim=6, prefix_length=2, n_layer=2, n_embd=32, n_head=2
)


def tiny_captioner(seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(TINY, train_tokenizer(CAPTIONS * 4, vocab_size=300))


def features(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, TINY.feature_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def memorised() -> tuple[Captioner, torch.Tensor, list[float]]:
    """A tiny captioner trained to map each of six random feature vectors to its caption."""
    model = tiny_captioner()
    feats = features(len(CAPTIONS))
    cfg = TrainConfig(steps=120, batch_size=6, lr=1e-2, warmup_steps=10, log_every=20)
    log = RecordingLog()
    train_captioner(model, feats, CAPTIONS, cfg, log)
    return model, feats, [values["loss"] for *_, values in log.figures]


def test_tokenizer_round_trips_text_with_case_and_unseen_characters() -> None:
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300)
    for text in [*CAPTIONS, "IMG_0423.jpg ünïcode"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(specials) == 3 and None not in specials


def test_save_and_from_pretrained_give_identical_logits(tmp_path) -> None:
    model = tiny_captioner().eval()
    batch = make_batch(model, features(3), CAPTIONS[:3])
    model.save_pretrained(tmp_path)
    loaded = Captioner.from_pretrained(tmp_path)
    assert (tmp_path / "projector.safetensors").exists()
    assert (tmp_path / "model.safetensors").exists()
    assert loaded.config == model.config
    with torch.no_grad():
        before = model(batch.features, batch.input_ids, batch.attention_mask)
        after = loaded(batch.features, batch.input_ids, batch.attention_mask)
    assert torch.equal(before, after)


def test_labels_at_prefix_positions_do_not_change_the_loss() -> None:
    model = tiny_captioner().eval()
    batch = make_batch(model, features(3), CAPTIONS[:3])
    prefix = TINY.condition_length
    assert (batch.labels[:, :prefix] == -100).all()
    with torch.no_grad():
        loss = caption_loss(model, batch)
        batch.labels[:, :prefix] = 5  # a real token id at every prefix position
        assert torch.equal(caption_loss(model, batch), loss)
        batch.labels[0, prefix + 2] = 5  # ...while a caption label does count
        assert not torch.equal(caption_loss(model, batch), loss)


def test_length_sorted_micro_batches_give_the_batch_loss_and_gradient() -> None:
    """Less padding, same maths: the pieces' summed loss is the whole batch's token mean."""
    model = tiny_captioner().eval()
    feats = features(len(CAPTIONS))

    def gradients(loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    pieces = micro_batches(model, feats, CAPTIONS, parts=3)
    assert len(pieces) == 3
    whole = make_batch(model, feats, CAPTIONS)
    assert sum(p.input_ids.numel() for p in pieces) < whole.input_ids.numel()
    loss, ours = gradients(micro_batch_loss(model, pieces))
    want, theirs = gradients(caption_loss(model, whole))
    assert loss == pytest.approx(want, rel=1e-6)
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs, strict=True)]
    assert max(errors) < 2e-6


def test_training_drives_the_loss_down_and_memorises_captions(memorised) -> None:
    model, feats, losses = memorised
    assert losses[-1] < 0.2 * losses[0]
    assert generate_captions(model, feats, max_new_tokens=60) == CAPTIONS


def test_batched_greedy_decoding_matches_one_at_a_time(memorised) -> None:
    model, feats, _ = memorised
    # Blends of the memorised features give captions of many lengths, ending at different steps.
    mixed = torch.cat([feats, 0.5 * (feats + feats.roll(1, dims=0)), features(6, seed=1)])
    batched = generate_captions(model, mixed, max_new_tokens=30)
    one_by_one = [generate_captions(model, row[None], max_new_tokens=30)[0] for row in mixed]
    assert batched == one_by_one
    assert len({len(c) for c in batched}) > 3


def test_nucleus_sampling_is_seeded_and_leaves_the_global_rng_alone(memorised) -> None:
    model, feats, _ = memorised
    # Blends of two memorised features leave the next token uncertain: room to sample.
    mixed = 0.5 * (feats + feats.roll(1, dims=0))
    state = torch.random.get_rng_state()
    first = generate_captions(model, mixed, 30, top_p=1.0, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert generate_captions(model, mixed, 30, top_p=1.0, seed=1) == first
    others = [generate_captions(model, mixed, 30, top_p=1.0, seed=s) for s in range(2, 6)]
    assert any(other != first for other in others)
    # A nucleus too small to hold a second token is greedy decoding.
    assert generate_captions(model, mixed, 30, top_p=1e-6, seed=1) == generate_captions(
        model, mixed, 30
    )


def test_batch_seed_follows_the_pixels_and_the_seed() -> None:
    images = [s.image for s in generate(3, seed=0, cfg=ShapeWorldConfig(), split="t")]
    assert batch_seed(images, 0) == batch_seed([im.copy() for im in images], 0)
    assert len({batch_seed(images, 0), batch_seed(images, 1), batch_seed(images[:2], 0)}) == 3


def test_empty_captions_are_skipped() -> None:
    model = tiny_captioner()
    cfg = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ValueError, match="non-empty"):
        train_captioner(model, features(6), ["", " ", "", "a red circle", "", "stock photo"], cfg)


def scenes(n: int) -> list[Scene]:
    return [sample_scene(random.Random(i), ShapeWorldConfig()) for i in range(n)]


def test_evaluate_dsc_is_perfect_on_ground_truth_and_drops_on_a_wrong_colour() -> None:
    truth = scenes(20)
    captions = [descriptive_caption(s, random.Random(i)) for i, s in enumerate(truth)]
    assert evaluate_dsc(captions, truth) == {"recall": 1.0, "precision": 1.0}
    main = truth[0].objects[0]
    wrong = "purple" if main.color != "purple" else "orange"
    named = f"{main.color} {main.shape}"
    assert named in captions[0]
    captions[0] = captions[0].replace(named, f"{wrong} {main.shape}", 1)
    scores = evaluate_dsc(captions, truth)
    assert scores["recall"] < 1.0 and scores["precision"] < 1.0


def test_evaluate_ssc_counts_captions_naming_the_main_object() -> None:
    truth = scenes(4)
    right = [f"a {s.objects[0].color} {s.objects[0].shape}" for s in truth]
    assert evaluate_ssc(right, truth) == {"main_object_accuracy": 1.0}
    main = truth[0].objects[0]
    other = next(shape for shape in SHAPES if shape != main.shape)
    right[0] = f"a {main.color} {other}"
    assert evaluate_ssc(right, truth) == {"main_object_accuracy": 0.75}
