"""Static import closure used to derive DVC stage code dependencies."""

from pathlib import Path

import pytest

from dalle3_dag.imports import closure, module_file, project_imports

REPO = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny fake project with every import form the closure must follow (or skip)."""
    _write(
        tmp_path,
        {
            "ml/__init__.py": "",
            "ml/data/__init__.py": "",
            "ml/data/a.py": (
                "import os\n"
                "import torch\n"
                "from torch.utils.data import Dataset\n"
                "import ml.data.b\n"
                "from ml.data import c\n"
                "from . import d\n"
                "from .e import thing\n"
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from ml.data import typed_only\n"
                "else:\n"
                "    from ml.data import runtime_only\n"
                "def lazy():\n"
                "    from ml.heavy import model\n"
                "    return model\n"
            ),
            "ml/data/b.py": "from ml.data.a import lazy\n",  # cycle back to a
            "ml/data/c.py": "",
            "ml/data/d.py": "from ..util import helper\n",
            "ml/data/e.py": "thing = 1\n",
            "ml/data/typed_only.py": "",
            "ml/data/runtime_only.py": "",
            "ml/heavy/__init__.py": "",
            "ml/heavy/model.py": "",
            "ml/util.py": "helper = 1\n",
            "ml/unused.py": "",
            "dalle3_dag/__init__.py": "",
            "dalle3_dag/stage.py": (
                "import typing\nif typing.TYPE_CHECKING:\n    import ml.unused\n"
            ),
        },
    )
    return tmp_path


def test_module_file(project: Path) -> None:
    assert module_file("ml.data.a", project) == project / "ml/data/a.py"
    assert module_file("ml.data", project) == project / "ml/data/__init__.py"
    assert module_file("ml.missing", project) is None
    assert module_file("torch", project) is None


def test_project_imports_forms(project: Path) -> None:
    found = project_imports(project / "ml/data/a.py", project)
    assert found == {
        "ml",
        "ml.data",
        "ml.data.b",  # import a.b
        "ml.data.c",  # from-import of a submodule
        "ml.data.d",  # from . import x
        "ml.data.e",  # from .m import y
        "ml.data.runtime_only",  # else branch of TYPE_CHECKING runs
        "ml.heavy",  # lazy import inside a function, with its package
        "ml.heavy.model",
    }


def test_relative_import_from_parent_package(project: Path) -> None:
    assert project_imports(project / "ml/data/d.py", project) == {"ml", "ml.util"}


def test_type_checking_attribute_form_skipped(project: Path) -> None:
    assert project_imports(project / "dalle3_dag/stage.py", project) == set()


def test_closure_follows_transitively_and_terminates_on_cycles(project: Path) -> None:
    assert closure(["ml.data.a"], project) == [
        "ml/__init__.py",
        "ml/data/__init__.py",
        "ml/data/a.py",
        "ml/data/b.py",
        "ml/data/c.py",
        "ml/data/d.py",
        "ml/data/e.py",
        "ml/data/runtime_only.py",
        "ml/heavy/__init__.py",
        "ml/heavy/model.py",
        "ml/util.py",
    ]
    # Same result from the other end of the a <-> b cycle.
    assert closure(["ml.data.b"], project) == closure(["ml.data.a"], project)


def test_closure_packages_filter(project: Path) -> None:
    assert closure(["dalle3_dag.stage"], project) == [
        "dalle3_dag/__init__.py",
        "dalle3_dag/stage.py",
    ]
    # With "ml" not a project package, the fake module's ml imports are not followed.
    assert closure(["ml.data.d"], project, packages=("dalle3_dag",)) == [
        "ml/__init__.py",
        "ml/data/__init__.py",
        "ml/data/d.py",
    ]


def test_closure_unknown_module_raises(project: Path) -> None:
    with pytest.raises(ValueError, match="ml.nope"):
        closure(["ml.nope"], project)


def test_closure_on_real_repo() -> None:
    files = closure(["ml.data.mixed"], REPO)
    assert "ml/data/mixed.py" in files
    assert "ml/data/shards.py" in files  # mixed.py: from ml.data.shards import ...
    assert "ml/__init__.py" in files
    assert all(not f.startswith(("tests/", ".venv/")) for f in files)
