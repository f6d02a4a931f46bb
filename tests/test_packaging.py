"""The installed package: one dependency list with a lock that satisfies it, a wheel
whose console scripts and README "Apps" snippet work outside the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from PIL import Image

import export as export_cli
from tests.helpers import ROOT, TINY_RTOL, tiny_model, write_model_dir
from tests.tolerances import decided, model_probability_atol

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = {"train", "evaluate", "predict", "export", "tune-crf", "describe"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned with =="
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_satisfies_the_one_dependency_list():
    """requirements.txt (what make installs) pins every dependency of pyproject.toml
    and of its extras at a version that its range admits."""
    project = PYPROJECT["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra if not r.startswith("deeplab_tf")]
    pins = _pins()
    for requirement in requirements:
        name = _canonical(requirement.name)
        assert name in pins, f"requirements.txt does not pin {requirement}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_each_top_level_script_is_the_installed_one():
    scripts = PYPROJECT["project"]["scripts"]
    assert {name.removeprefix("deeplab-") for name in scripts} >= SCRIPTS
    for name, target in scripts.items():
        module = target.split(":")[0].rsplit(".", 1)[1]
        script = ROOT / f"{module}.py"
        if not script.exists():
            script = ROOT / "datasets" / f"{module}.py"
        # The checkout's script is a shim over the same main (no second copy of a CLI).
        assert f"from {target.split(':')[0]} import cli, main" in script.read_text(), name


def _apps_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Apps\n") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_wheel_runs_outside_the_repository(tmp_path):
    """Builds the wheel, installs it without dependencies into a temporary prefix and,
    from a directory outside the repository (which is not on sys.path), runs
    ``deeplab-describe deeplabv3`` and the README's Apps snippet on an exported
    ``.keras`` file."""
    source = tmp_path / "source"  # a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT / "deeplab_tf", source / "deeplab_tf", ignore=_ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("deeplab_tf-*.whl")
    prefix = tmp_path / "prefix"
    install = [*pip, "install", "--no-deps", "--no-compile", "--prefix", prefix, wheel]
    subprocess.run(install, check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix}))
    outside = tmp_path / "app"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONSAFEPATH", None)

    def run(*command: str | Path) -> str:
        done = subprocess.run(
            command, cwd=outside, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    # A small test image: the model is built and run once to report the logits' size.
    described = run(prefix / "bin" / "deeplab-describe", "deeplabv3", "--input-size", "65")
    assert "58,149,077" in described  # v3's parameters with 21 classes (README)
    assert "input 65x65 -> logits 5x5x21 at output stride 16" in described
    for name in sorted(SCRIPTS):
        assert (prefix / "bin" / f"deeplab-{name}").is_file()

    # An exported .keras file and an image, then the snippet as the README has it.
    model = tiny_model(3)
    model_dir = write_model_dir(model, tmp_path / "run", data_dir=None)
    args = ["--model-dir", str(model_dir), "--format", "keras", "--export-dir", str(tmp_path)]
    assert export_cli.main([*args, "--name", "exports", "--version", "1"]) == 0
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(outside / "photo.png")
    snippet = _apps_snippet()
    for readme_path, ours in (
        ("exports/quickstart/1", str(tmp_path / "exports" / "1")),
        ("data/shapes/raw/JPEGImages/val_00000.jpg", "photo.png"),
    ):
        assert readme_path in snippet
        snippet = snippet.replace(readme_path, ours)
    where = (
        "import deeplab_tf, json, sys; print(deeplab_tf.__file__); print(json.dumps(sys.path))\n"
    )
    printed = run(sys.executable, "-c", where + snippet).splitlines()
    assert printed[0].startswith(str(site)), printed[0]  # the wheel's copy ...
    assert str(ROOT) not in json.loads(printed[1])  # ... and no checkout on the path
    labels = np.asarray(Image.open(outside / "mask.png").convert("RGB"))
    # The same model in this process: its labels wherever float32 differences between
    # processes cannot flip them.
    logits = np.asarray(model(image[None].astype("float32")))[0]
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    atol = model_probability_atol(model, image[None], TINY_RTOL)
    colors = np.array(json.loads((tmp_path / "exports/1/export.json").read_text())["colors"])
    expected = colors[logits.argmax(-1)]
    sure = decided(probabilities, atol)
    assert sure.mean() > 0.5
    np.testing.assert_array_equal(labels[sure], expected[sure])


def _ignore(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]
