"""In-process materialization of the whole graph on a tiny toy profile: the caption stages, then
the text-to-image models that learn from their captions."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mlflow
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import web_source, write_web_shards
from diffusers import AutoencoderKL
from transformers import T5ForConditionalGeneration

from dalle3_dag import ablation, captioner, data, evaluation, text_to_image
from dalle3_dag.partitions import SHARDS
from ml.data.mixed import MixManifest
from ml.data.mixed_dataset import MixedDataset
from ml.data.recaption import read_sidecar
from ml.data.shapeworld import (
    EVAL_CATEGORIES,
    Scene,
    ShapeWorldConfig,
    generate,
    render,
    scene_of,
)
from ml.data.shards import ReadStats, read_shard
from ml.diffusion.pipeline import TextToImagePipeline
from ml.eval.ablation import summary
from ml.eval.captions import evaluate_dsc
from ml.stage import read_metrics
from ml.stages.clip_s_eval import SINGLE, STYLES

MODULES = [data, captioner, text_to_image, evaluation, ablation]
ASSETS = dg.load_assets_from_modules(MODULES)
CHECKS = dg.load_asset_checks_from_modules(MODULES)
UNPARTITIONED = ["raw_pairs", "clip_encoder", "captioner_base", "captioner_ssc", "captioner_dsc"]


def materialize(project, instance, select, partition_key=None, run_config=None):
    return dg.materialize(
        [*ASSETS, *CHECKS],
        selection=select,
        resources=project.resources,
        instance=instance,
        partition_key=partition_key,
        run_config=run_config or {},
    )


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


def dalle3(project, *args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("dalle3")
    return subprocess.run([str(cli), *args], env=project.env(), capture_output=True, text=True)


def dvc_show(project, what: str) -> str:
    """`dvc <what> show --json` in the project: its output, after it succeeded."""
    cmd = [sys.executable, "-m", "dvc", what, "show", "--json"]
    shown = subprocess.run(cmd, cwd=project.root, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def test_caption_cli_without_models_says_what_is_missing(project, tmp_path):
    image = tmp_path / "any.png"
    render(Scene("gray", "plain", ()), 32).save(image)
    proc = dalle3(project, "caption", str(image))
    assert proc.returncode != 0
    assert "not materialized yet: clip_encoder" in proc.stderr


def test_generate_cli_without_a_model_says_what_to_run(project, tmp_path):
    proc = dalle3(project, "generate", "a red circle", "--out", str(tmp_path / "grid.png"))
    assert proc.returncode != 0
    assert "no distilled model materialized" in proc.stderr and "make run" in proc.stderr
    assert not (tmp_path / "grid.png").exists()


def test_whole_graph_end_to_end(project, instance, tmp_path):
    result = materialize(project, instance, UNPARTITIONED)
    assert result.success

    # CLIP: saved so open_clip's local-dir loader takes it, and evaluated on held-out images
    import open_clip

    clip_dir = project.storage.asset_dir("clip_encoder")
    open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    (clip_event,) = result.asset_materializations_for_node("clip_encoder")
    assert clip_event.metadata["recall_at_5"].value > 0
    # what the run reports is what its checks read
    for name, value in read_metrics(clip_dir).items():
        assert clip_event.metadata[name].value == pytest.approx(value, abs=5e-5)

    # a floor raised above the CLIP's score rejects its new version: the old one stays live and
    # the rejected one is kept for a look
    clip_files = sorted(p.name for p in clip_dir.iterdir())
    before = (project.dvc.out_hash("clip_encoder"), (clip_dir / "open_clip_model.safetensors"))
    before = (before[0], before[1].read_bytes())
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["checks"]["clip_color_preference"] = 1.01
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    rejected = dg.materialize(
        [*ASSETS, *CHECKS], selection=["clip_encoder"], resources=project.resources,
        instance=instance, raise_on_error=False,
        run_config={"ops": {"clip_encoder": {"config": {"train": {"steps": 4}}}}},
    )
    assert not rejected.success
    error = str(rejected.failure_data_for_node("clip_encoder").error)
    assert "clip_encoder_binds_attributes" in error
    weights = (clip_dir / "open_clip_model.safetensors").read_bytes()
    assert (project.dvc.out_hash("clip_encoder"), weights) == before
    assert sorted(p.name for p in clip_dir.iterdir()) == clip_files
    (kept,) = project.storage.rejected_dir("clip_encoder").iterdir()
    assert str(kept) in error
    assert json.loads((kept / "effective_config.json").read_text())["train"]["steps"] == 4
    params["checks"]["clip_color_preference"] = 0.0
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))

    # captioners: each one a finished MLflow run and a registered model version
    mlflow.set_tracking_uri(project.mlflow.resolved_uri())
    client = mlflow.MlflowClient()
    for stage in ("base", "ssc", "dsc"):
        (event,) = result.asset_materializations_for_node(f"captioner_{stage}")
        run = mlflow.get_run(event.metadata["mlflow_run_id"].value)
        assert run.info.status == "FINISHED"
        assert "loss" in run.data.metrics
        assert run.data.tags["dvc.input.clip_encoder"] == project.dvc.out_hash("clip_encoder")
        assert client.get_model_version(f"captioner_{stage}", "1").run_id == run.info.run_id

    # the captioners caption image files from the command line
    image = tmp_path / "scene.png"
    next(iter(generate(1, seed=3, cfg=ShapeWorldConfig(), split="cli"))).image.save(image)
    lines = dalle3(project, "caption", str(image)).stdout.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[str(image), "ssc"], [str(image), "dsc"]]

    # one partition per training shard, each with one row per key
    shards = sorted(instance.get_dynamic_partitions(SHARDS.name))
    assert shards == ["00000", "00001"]
    for shard in shards:
        assert materialize(project, instance, ["recaptioned_dataset"], shard).success
        table = pq.read_table(project.storage.asset_dir("recaptioned_dataset") / f"{shard}.parquet")
        keys = table.column("__key__").to_pylist()
        assert len(keys) == len(set(keys)) == 32
        assert set(table.column_names) >= {"alt_text", "ssc", "dsc", "captioner_version"}

    # a rerun of a complete partition resumes from its sidecar instead of recaptioning
    rerun = materialize(project, instance, ["recaptioned_dataset"], "00000")
    (event,) = rerun.asset_materializations_for_node("recaptioned_dataset")
    assert event.metadata["reused_sidecars"].value == ["00000"]
    # ... unless it is to be decoded another way; what was written is scored against the scenes
    sampled = materialize(project, instance, ["recaptioned_dataset"], "00000",
                          {"ops": {"recaptioned_dataset": {"config": {"top_p": 0.9}}}})  # fmt: skip
    (event,) = sampled.asset_materializations_for_node("recaptioned_dataset")
    assert event.metadata["reused_sidecars"].value == []
    rows = read_sidecar(project.storage.asset_dir("recaptioned_dataset") / "00000.parquet")
    samples = [s for s in read_shard(str(project.storage.asset_dir("raw_pairs") / "train" /
               "00000.tar"), ReadStats()) if s.key in rows]  # fmt: skip
    scenes = [scene_of(s) for s in samples]
    want = evaluate_dsc([rows[s.key]["dsc"] for s in samples], scenes)["recall"]
    assert event.metadata["dsc_attribute_recall"].value == pytest.approx(want, abs=1e-4)

    blend_result = materialize(project, instance, ["mixed_training_set"])
    assert blend_result.success
    (check,) = blend_result.get_asset_check_evaluations()
    blend = check.metadata
    # a tiny, barely trained captioner writes some empty captions: they fall back and count
    sources = ("synthetic", "original", "fallback_original", "fallback_synthetic", "empty")
    assert sum(blend[name].value for name in sources) == blend["samples"].value == 64
    # p = 0.95: whichever caption ends up used, the draw picked the synthetic side far more often
    # (how many of the tiny captioner's captions are blank varies with its random start)
    picked_synthetic = blend["synthetic"].value + blend["fallback_original"].value
    assert picked_synthetic > blend["original"].value + blend["fallback_synthetic"].value
    manifest = MixManifest.load(project.storage.asset_dir("mixed_training_set") / "manifest.json")
    assert manifest.synthetic_ratio == 0.95 and len(manifest.shards) == 2
    seen = [row["key"] for row in MixedDataset(manifest)]
    assert len(seen) == len(set(seen)) == 64

    # the image autoencoder: diffusers' AutoencoderKL, scored on reconstructions; its check
    # blocks, so a floor above its score keeps a new version from going live
    vae = materialize(project, instance, ["image_autoencoder"])
    (event,) = vae.asset_materializations_for_node("image_autoencoder")
    vae_dir = project.storage.asset_dir("image_autoencoder")
    assert AutoencoderKL.from_pretrained(vae_dir).config.latent_channels == 4
    assert event.metadata["latent_shape"].value == [4, 8, 8]
    live = project.dvc.out_hash("image_autoencoder")
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["checks"]["autoencoder_psnr"] = read_metrics(vae_dir)["psnr"] + 1
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    rejected = dg.materialize(
        [*ASSETS, *CHECKS], selection=["image_autoencoder"], resources=project.resources,
        instance=instance, raise_on_error=False,
        run_config={"ops": {"image_autoencoder": {"config": {"train": {"steps": 2}}}}},
    )
    assert not rejected.success
    assert "image_autoencoder_reconstructs" in str(
        rejected.failure_data_for_node("image_autoencoder").error
    )
    assert project.dvc.out_hash("image_autoencoder") == live
    params["checks"]["autoencoder_psnr"] = 0.0
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))

    # text to image: the diffusion model learns from the blend on the autoencoder's latents,
    # the student from the teacher; both draw the world's 32 px
    t2i = materialize(project, instance, ["diffusion_model", "distilled_model"])
    assert t2i.success
    for key in ("diffusion_model", "distilled_model"):
        folder = project.storage.asset_dir(key)
        assert {"model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "vae"} <= {
            p.name for p in folder.iterdir()
        }
        (event,) = t2i.asset_materializations_for_node(key)
        names = ("color_accuracy", "position_accuracy", "two_object_accuracy", "color_low")
        for name in (*names, "short_color_accuracy"):
            assert event.metadata[name].value == pytest.approx(read_metrics(folder)[name], abs=5e-5)
        run = mlflow.get_run(event.metadata["mlflow_run_id"].value)
        assert run.info.status == "FINISHED" and "loss" in run.data.metrics
        assert event.metadata["dvc_hash"].value == project.dvc.out_hash(key)
    checkpoints = project.storage.asset_dir(".checkpoints") / "diffusion_model"
    (run_dir,) = checkpoints.iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # a rerun with the same config and data resumes from the finished run's last checkpoint;
    # with a floor above its two-object score its check fails (not blocking)
    teacher_metrics = read_metrics(project.storage.asset_dir("diffusion_model"))
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["checks"]["prompt_two_object"] = teacher_metrics["two_object_accuracy"] + 0.01
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = materialize(project, instance, ["diffusion_model"])
    (event,) = rerun.asset_materializations_for_node("diffusion_model")
    assert event.metadata["resumed_from_step"].value == 4
    (check,) = rerun.get_asset_check_evaluations()
    assert check.check_name == "diffusion_model_follows_prompts" and not check.passed
    params["checks"]["prompt_two_object"] = 0.0
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))

    # the prompt upsampler: a plain transformers folder, scored on the held-out prompts
    upsampled = materialize(project, instance, ["prompt_upsampler"])
    assert upsampled.success
    folder = project.storage.asset_dir("prompt_upsampler")
    assert T5ForConditionalGeneration.from_pretrained(folder).generation_config.max_new_tokens == 32
    (event,) = upsampled.asset_materializations_for_node("prompt_upsampler")
    kept = read_metrics(folder)["kept_overall_accuracy"]
    assert event.metadata["kept_overall_accuracy"].value == pytest.approx(kept, abs=5e-5)
    assert "| category | prompt | upsampled | added |" in event.metadata["examples"].value
    assert mlflow.MlflowClient().get_model_version("prompt_upsampler", "1").status == "READY"
    # its check blocks: a floor above its score keeps the new version from going live
    live = project.dvc.out_hash("prompt_upsampler")
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["checks"]["upsampler_kept"] = kept + 0.01
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    rejected = dg.materialize(
        [*ASSETS, *CHECKS], selection=["prompt_upsampler"], resources=project.resources,
        instance=instance, raise_on_error=False,
        run_config={"ops": {"prompt_upsampler": {"config": {"train": {"steps": 4}}}}},
    )
    assert not rejected.success
    assert "prompt_upsampler_keeps_prompts" in str(
        rejected.failure_data_for_node("prompt_upsampler").error
    )
    assert project.dvc.out_hash("prompt_upsampler") == live
    params["checks"]["upsampler_kept"] = 0.0
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))

    grid = tmp_path / "grid.png"
    # --upsample prints the rewrite, then draws it
    proc = dalle3(project, "generate", "a red circle", "--upsample", "-n", "2", "--out", str(grid))
    assert proc.returncode == 0, proc.stderr
    (line,) = [li for li in proc.stdout.splitlines() if li.startswith("upsampled (local): ")]
    assert f"image(s) for {line.removeprefix('upsampled (local): ')!r}" in proc.stdout
    unset = dalle3(project, "generate", "a red circle", "--upsample", "--upsampler", "openai",
                   "--out", str(grid))  # fmt: skip
    assert unset.returncode != 0 and "upsampler_chat.base_url" in unset.stderr
    proc = dalle3(project, "generate", "a red circle", "-n", "3", "--seed", "5", "--out", str(grid))
    assert proc.returncode == 0, proc.stderr
    assert "distilled_model" in proc.stdout and "2 steps" in proc.stdout
    # the instrument's verdict, image by image, on a prompt the world can judge
    assert re.search(r"^[0-3] of 3 image\(s\) follow 'a red circle'", proc.stdout, re.M)
    assert len(re.findall(r"^  [1-3]: (follows|does not): ", proc.stdout, re.M)) == 3
    first = grid.read_bytes()
    assert (
        dalle3(
            project, "generate", "a red circle", "-n", "3", "--seed", "5", "--out", str(grid)
        ).returncode
        == 0
    )
    assert grid.read_bytes() == first  # the same seed draws the same grid
    teacher = dalle3(
        project,
        "generate",
        "a red circle",
        "--model",
        "teacher",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "teacher.png"),
    )
    assert teacher.returncode == 0 and "diffusion_model" in teacher.stdout

    # evaluation: CLIP-S in both settings and variants, every category for both models
    evaluated = materialize(project, instance, ["clip_s_eval"])
    (event,) = evaluated.asset_materializations_for_node("clip_s_eval")
    folder = project.storage.asset_dir("clip_s_eval")
    metrics = read_metrics(folder)
    for model in ("teacher", "student"):
        for variant, setting in itertools.product(("paper", "hessel"), ("alt", "descriptive")):
            assert f"{model}_clip_s_{variant}_{setting}" in metrics
        for style, category in itertools.product(STYLES, (*EVAL_CATEGORIES, *SINGLE)):
            assert metrics[f"{model}_{style}_{category}_n"] == 2  # 2 prompts x 1 image
        assert (folder / f"{model}_samples.png").is_file()
    assert "| teacher | descriptive |" in event.metadata["prompt_following"].value
    # DVC lists the figures, from the metrics file dvc.lock records
    assert json.loads((project.root / "metrics" / "clip_s_eval.json").read_text()) == metrics
    assert "teacher_clip_s_paper_descriptive" in dvc_show(project, "metrics")
    # and plots every trainer's loss curve (the resumed rerun's too) and the categories' bars
    loss = (project.root / "plots" / "diffusion_model" / "loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss,lr" and [row.split(",")[0] for row in loss[1:]] == ["2", "4"]
    bars = (project.root / "plots" / "clip_s_eval" / "prompt_following.csv").read_text()
    assert bars.startswith("case,accuracy,low,high\nteacher descriptive single_object,")
    assert len(bars.splitlines()) == 1 + 2 * len(STYLES) * (len(EVAL_CATEGORIES) + len(SINGLE))
    plotted = dvc_show(project, "plots")
    for key in ("clip_encoder", "captioner_dsc", "diffusion_model"):
        assert f"plots/{key}/loss.csv" in plotted
    assert "plots/clip_s_eval/prompt_following.csv" in plotted
    checks = {c.check_name: c for c in evaluated.get_asset_check_evaluations()}
    assert set(checks) == {
        "clip_s_eval_prompt_following", "clip_s_eval_clip_s", "clip_s_eval_upsampling_keeps_up"
    }
    # a floor above the score fails its check (not blocking: the eval still goes live)
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["checks"]["eval_clip_s"] = metrics["teacher_clip_s_paper_descriptive"] + 1
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    again = materialize(project, instance, ["clip_s_eval"])
    checks = {c.check_name: c for c in again.get_asset_check_evaluations()}
    assert not checks["clip_s_eval_clip_s"].passed

    # the caption ablations: two variants train the same model on their blends, each kept and
    # scored at 2 of its 4 steps; the report pools what they measured
    parts = ("alt-seed0", "dsc95-seed0")
    for key in parts:
        assert materialize(project, instance, ["ablation_model"], key).success
    folder = project.storage.asset_dir("ablation_model")
    alt, dsc = (json.loads((folder / key / "run.json").read_text()) for key in parts)
    assert alt["model"] == dsc["model"] and alt["model"]["train"]["steps"] == 4
    changed = {k: v for k, v in alt["blend"].items() if v != dsc["blend"][k]}
    assert changed == {"caption_type": "alt", "synthetic_ratio": 0.0}
    assert sorted(p.name for p in (folder / "dsc95-seed0").iterdir()) == [
        "manifest.json", "run.json", "scores.json", "step-000002", "step-000004"
    ]  # fmt: skip
    kept = TextToImagePipeline.from_pretrained(folder / "dsc95-seed0" / "step-000002")
    assert kept.image_size == 32
    manifest = MixManifest.load(folder / "dsc95-seed0" / "manifest.json")
    assert manifest.synthetic_ratio == 0.95 and all(Path(s).is_file() for s in manifest.shards)
    reported = materialize(project, instance, ["ablation_report"])
    (event,) = reported.asset_materializations_for_node("ablation_report")
    report = project.storage.asset_dir("ablation_report")
    metrics = read_metrics(report)
    for key, variant in zip(parts, ("alt", "dsc95"), strict=True):
        scored = json.loads((folder / key / "scores.json").read_text())
        assert set(scored) == {"2", "4"}
        figures = summary(scored["4"])
        assert {"clip_s_alt", "clip_s_descriptive", "overall_accuracy"} <= set(figures)
        for name, value in figures.items():
            assert metrics[f"{variant}/{name}"] == pytest.approx(value)
    assert {"figure4", "figure5", "oracle", "ablation"} <= set(event.metadata)
    text = (report / "report.md").read_text()
    assert "| alt | 2 | 1 |" in text and "| dsc95 | 4 | 1 |" in text
    assert "(ii) higher synthetic blends score higher, 65% clearly behind: not run" in text
    for name in ("figure4.png", "figure5.png", "oracle.png"):
        assert (project.root / "plots" / "ablation_report" / name).is_file()
    assert "plots/ablation_report/figure4.png" in dvc_show(project, "plots")
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nText of our own.\n")
    for _ in range(2):  # the second time replaces the section it wrote
        proc = dalle3(project, "results", "--page", str(page))
        assert proc.returncode == 0, proc.stderr
    written = page.read_text()
    assert written.startswith("# Results\n\nText of our own.\n")
    assert written.count("| alt | 2 |") == 1
    assert "](figures/ablation-figure4.png)" in written
    assert (tmp_path / "figures" / "ablation-figure4.png").is_file()


def test_whole_graph_runs_from_a_webdataset_folder(project, instance, tmp_path):
    """img2dataset-style shards with no ShapeWorld ground truth, a third of them with
    human-written short and long captions, flow through every stage; what needs scene graphs
    to measure says so as a warning instead of passing."""
    source = tmp_path / "incoming"
    write_web_shards(source, 300, shard_size=50)
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["raw_pairs"] |= web_source(source)
    params["clip_encoder"]["hard_negatives"] = False
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))

    result = materialize(project, instance, UNPARTITIONED)
    (raw,) = result.asset_materializations_for_node("raw_pairs")
    assert min(raw.metadata["samples_per_split"].value.values()) >= 32
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    for name in ("clip_encoder_binds_attributes", "captioner_ssc_main_object"):
        assert not checks[name].passed and checks[name].severity == dg.AssetCheckSeverity.WARN
        assert "no scene graphs" in checks[name].metadata["not_measured"].value
    (ssc,) = result.asset_materializations_for_node("captioner_ssc")
    # without scene graphs only the caption length is measured (a barely trained captioner may
    # still write empty captions)
    assert "main_object_accuracy" not in ssc.metadata and "mean_words" in ssc.metadata

    for shard in sorted(instance.get_dynamic_partitions(SHARDS.name)):
        assert materialize(project, instance, ["recaptioned_dataset"], shard).success
    t2i_keys = ["mixed_training_set", "image_autoencoder", "diffusion_model", "distilled_model"]
    t2i = materialize(project, instance, t2i_keys)
    assert t2i.success
    (student,) = t2i.asset_materializations_for_node("distilled_model")
    assert student.metadata["dvc_hash"].value == project.dvc.out_hash("distilled_model")


def test_pretrained_clip_with_missing_checkpoint_names_the_path(project, instance, tmp_path):
    assert materialize(project, instance, ["raw_pairs"]).success
    missing = tmp_path / "ViT-B-32.safetensors"
    config = {"source": "pretrained", "model_name": "ViT-B-32", "checkpoint": str(missing)}
    result = dg.materialize(
        [*ASSETS],
        selection=["clip_encoder"],
        resources=project.resources,
        instance=instance,
        run_config={"ops": {"clip_encoder": {"config": config}}},
        raise_on_error=False,
    )
    assert not result.success
    assert str(missing) in str(result.failure_data_for_node("clip_encoder").error)
