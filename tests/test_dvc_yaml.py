"""dvc.yaml is derived from the asset definitions: each stage lists the input assets and every
project file its code imports, so editing any of them makes the stage stale."""

from pathlib import Path

import yaml

from dalle3_dag.definitions import STAGES, defs
from dalle3_dag.factory import dvc_yaml as render

ORDER = [stage.name for stage in STAGES]


def dvc_yaml() -> str:
    return render(ORDER)

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_the_one_the_assets_define() -> None:
    assert {key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys}
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "run `dalle3 dvc-yaml`"


def test_code_dependencies_follow_imports_and_stop_at_other_stages() -> None:
    stages = yaml.safe_load(dvc_yaml())["stages"]
    diffusion = stages["diffusion_model"]["deps"]
    # imported by what the stage imports, not by the stage module itself
    assert {"ml/tokenizer.py", "ml/data/mixed.py", "ml/train.py", "ml/eval/oracle.py"} <= set(
        diffusion
    )
    assert {"ml/train.py", "ml/data/shapeworld.py"} <= set(stages["clip_encoder"]["deps"])
    # the group module defines both captioner and CLIP assets; neither lists the other's stage
    assert "ml/stages/captioner.py" not in stages["clip_encoder"]["deps"]
    assert "dalle3_dag/captioner.py" in stages["clip_encoder"]["deps"]
    assert stages["distilled_model"]["deps"][:2] == [
        "assets/diffusion_model",
        "assets/mixed_training_set",
    ]
    assert stages["clip_encoder"]["params"] == ["clip_encoder", "checks"]
