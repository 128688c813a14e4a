"""The blended training set: the caption sampler, the manifest, and splitting epochs over
ranks and DataLoader workers so that every sample is seen exactly once."""

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ml.data.mixed import (
    SOURCES,
    MixManifest,
    choose_caption,
    mix_stats,
)
from ml.data.mixed_dataset import MixedDataset
from ml.data.recaption import recaption_shard
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import write_shards

N = 24  # samples in the test dataset


def synthetic_caption(images: list[Image.Image]) -> list[str]:
    """Every third caption is blank, to exercise the fallback."""
    return ["" if im.getpixel((0, 0))[0] % 3 == 0 else "a synthetic caption" for im in images]


def build(root: Path, shard_size: int) -> MixManifest:
    """N ShapeWorld samples in shards of `shard_size`, each with a recaption sidecar."""
    samples = generate(N, seed=0, cfg=ShapeWorldConfig(image_size=8), split="train")
    names = write_shards(samples, root / "shards", shard_size=shard_size)
    shards = [str(root / "shards" / name) for name in names]
    sidecars = [str(root / "side" / name.replace(".tar", ".parquet")) for name in names]
    for shard, sidecar in zip(shards, sidecars, strict=True):
        recaption_shard(shard, Path(sidecar), {"dsc": synthetic_caption}, "v1", batch_size=8)
    return MixManifest(shards, sidecars, caption_type="dsc", synthetic_ratio=0.5, seed=3)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> MixManifest:
    return build(tmp_path_factory.mktemp("many"), shard_size=3)  # 8 shards


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory: pytest.TempPathFactory) -> MixManifest:
    return build(tmp_path_factory.mktemp("few"), shard_size=10)  # 3 shards


def keys_only(image: Image.Image) -> int:
    """A transform that keeps batches cheap to send between processes."""
    return image.width


# --- choose_caption ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.95, 0.65])
def test_synthetic_ratio_is_p_and_reproducible(p: float) -> None:
    picks = [choose_caption(f"k{i}", 0, 7, p, "syn", "orig")[1] for i in range(10_000)]
    assert abs(picks.count("synthetic") / len(picks) - p) < 0.01
    assert picks == [choose_caption(f"k{i}", 0, 7, p, "syn", "orig")[1] for i in range(10_000)]


def test_picks_change_with_epoch_and_seed_but_reproduce() -> None:
    def picks(epoch: int, seed: int) -> list[str]:
        return [choose_caption(f"k{i}", epoch, seed, 0.5, "s", "o")[0] for i in range(200)]

    assert picks(0, 1) == picks(0, 1)
    assert picks(1, 1) == picks(1, 1)
    assert picks(0, 1) != picks(1, 1)
    assert picks(0, 1) != picks(0, 2)


def test_empty_captions_fall_back_to_the_other() -> None:
    assert choose_caption("k", 0, 0, 1.0, "syn", "orig") == ("syn", "synthetic")
    assert choose_caption("k", 0, 0, 0.0, "syn", "orig") == ("orig", "original")
    assert choose_caption("k", 0, 0, 1.0, "  ", "orig") == ("orig", "fallback_original")
    assert choose_caption("k", 0, 0, 1.0, None, "orig") == ("orig", "fallback_original")
    assert choose_caption("k", 0, 0, 0.0, "syn", "") == ("syn", "fallback_synthetic")
    assert choose_caption("k", 0, 0, 0.0, "syn", None) == ("syn", "fallback_synthetic")
    assert choose_caption("k", 0, 0, 1.0, "", None) == ("", "empty")
    assert choose_caption("k", 0, 0, 0.0, None, " ") == ("", "empty")


# --- MixManifest ------------------------------------------------------------------------------


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    manifest = MixManifest(
        ["/d/0.tar", "s3://b/1.tar"], ["/s/0.parquet", "/s/1.parquet"], "ssc", 1, 5
    )
    path = tmp_path / "manifest.json"
    manifest.save(path)
    loaded = MixManifest.load(path)
    assert loaded == manifest and loaded.synthetic_ratio == 1.0
    assert json.loads(path.read_text())["caption_type"] == "ssc"


def test_manifest_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "mix" / "manifest.json"
    path.parent.mkdir()
    MixManifest(["../raw/0.tar", "s3://b/1.tar"], ["0.parquet", "1.parquet"], "dsc", 0.9, 0).save(
        path
    )
    loaded = MixManifest.load(path)
    assert loaded.shards == [str(path.parent / "../raw/0.tar"), "s3://b/1.tar"]
    assert loaded.sidecars == [str(path.parent / "0.parquet"), str(path.parent / "1.parquet")]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"shards": []}, "shards"),
        ({"shards": "a.tar"}, "shards"),
        ({"sidecars": ["a.parquet", "b.parquet"]}, "sidecars"),
        ({"sidecars": [""]}, "sidecars"),
        ({"caption_type": "long"}, "caption_type"),
        ({"synthetic_ratio": 1.5}, "synthetic_ratio"),
        ({"synthetic_ratio": "0.9"}, "synthetic_ratio"),
        ({"caption_type": "alt", "synthetic_ratio": 0.95}, "synthetic_ratio"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_manifest_validation_names_the_field(changes: dict, field: str) -> None:
    good = {
        "shards": ["a.tar"],
        "sidecars": ["a.parquet"],
        "caption_type": "dsc",
        "synthetic_ratio": 0.95,
        "seed": 0,
    }
    with pytest.raises(ValueError, match=field):
        MixManifest(**{**good, **changes})


def test_manifest_load_names_missing_and_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"shards": ["a.tar"], "sidecars": ["a.parquet"], "seed": 0}))
    with pytest.raises(ValueError, match="missing field 'caption_type'"):
        MixManifest.load(path)
    good = {"caption_type": "alt", "synthetic_ratio": 0, "shards": ["a"], "sidecars": ["b"]}
    path.write_text(json.dumps({**good, "seed": 0, "ratio": 0.5}))
    with pytest.raises(ValueError, match="unknown field 'ratio'"):
        MixManifest.load(path)


# --- MixedDataset ---------------------------------------------------------------------------


def epoch_items(manifest: MixManifest, epoch: int, world_size: int, workers: int) -> list[dict]:
    """Everything every rank's DataLoader yields in one epoch."""
    items = []
    for rank in range(world_size):
        dataset = MixedDataset(manifest, transform=keys_only, rank=rank, world_size=world_size)
        dataset.set_epoch(epoch)
        items += DataLoader(dataset, batch_size=None, num_workers=workers)
    return items


@pytest.mark.parametrize("regime", ["many_shards", "few_shards"])
def test_each_sample_is_seen_once_per_epoch_over_ranks_and_workers(
    regime: str, request: pytest.FixtureRequest
) -> None:
    manifest: MixManifest = request.getfixturevalue(regime)
    every_key = {f"train{i:08d}" for i in range(N)}
    for world_size, workers in [(1, 2), (2, 2)]:
        keys = [item["key"] for item in epoch_items(manifest, 0, world_size, workers)]
        assert len(keys) == len(set(keys)) == N and set(keys) == every_key


def test_fewer_shards_than_slots_still_keeps_every_slot_busy(
    few_shards: MixManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 shards over 2 ranks x 2 workers: samples, not shards, are dealt out to the 4 slots."""
    per_slot = []
    for rank in range(2):
        for worker in range(2):
            info = SimpleNamespace(num_workers=2, id=worker)
            monkeypatch.setattr("ml.data.mixed_dataset.get_worker_info", lambda info=info: info)
            dataset = MixedDataset(few_shards, transform=keys_only, rank=rank, world_size=2)
            per_slot.append([item["key"] for item in dataset])
    sizes = [len(keys) for keys in per_slot]
    assert sum(sizes) == len({key for keys in per_slot for key in keys}) == N
    assert max(sizes) - min(sizes) <= len(few_shards.shards)
    assert min(sizes) > 0


def test_dataset_captions_match_the_sampler_and_mix_stats(many_shards: MixManifest) -> None:
    items = epoch_items(many_shards, 1, world_size=2, workers=2)
    single = list(MixedDataset(many_shards, transform=keys_only))  # epoch 0, one process
    assert {i["key"] for i in single} == {i["key"] for i in items}

    counts = Counter(item["caption_source"] for item in items)
    stats = mix_stats(many_shards, epoch=1)
    assert stats["samples"] == N and {s: stats[s] for s in SOURCES} == {
        s: counts[s] for s in SOURCES
    }
    assert counts["fallback_original"] > 0  # some synthetic captions are blank
    for item in items:
        synthetic = item["caption_source"] in ("synthetic", "fallback_synthetic")
        assert (item["caption"] == "a synthetic caption") == synthetic


def test_epochs_give_different_reproducible_picks_and_shard_orders(
    many_shards: MixManifest,
) -> None:
    def run(epoch: int) -> list[tuple[str, str]]:
        dataset = MixedDataset(many_shards, transform=keys_only)
        dataset.set_epoch(epoch)
        return [(item["key"], item["caption_source"]) for item in dataset]

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert [key for key, _ in run(0)] != [key for key, _ in run(1)]  # shard order reshuffled
    assert sorted(run(0)) != sorted(run(1))  # captions picked differently


def test_counts_of_one_process_and_the_alt_baseline(few_shards: MixManifest) -> None:
    dataset = MixedDataset(few_shards, transform=keys_only)
    assert sum(1 for _ in dataset) == N
    assert dataset.caption_counts == Counter(
        {s: n for s, n in mix_stats(few_shards, 0).items() if s in SOURCES and n}
    )
    baseline = MixManifest(few_shards.shards, few_shards.sidecars, "alt", 0.0, few_shards.seed)
    assert {item["caption_source"] for item in MixedDataset(baseline)} <= {"original", "empty"}
    assert mix_stats(baseline, 0)["synthetic_frac"] == 0.0


def test_rank_arguments_are_checked(few_shards: MixManifest) -> None:
    with pytest.raises(ValueError, match="rank"):
        MixedDataset(few_shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both"):
        MixedDataset(few_shards, rank=0)
