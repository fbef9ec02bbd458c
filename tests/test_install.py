"""A regular install works like the checkout: the toy model ships inside the package (and in the wheel),
and downloads go to the user's cache, never into the package folder (site-packages once installed).
.ci/wheel_check.sh installs the wheel into a fresh venv and generates with it."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import minivar
from minivar.loading import hub

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(minivar.__file__).resolve().parent
TOY_FILES = ["infinity.pth", "infinity_config.json", "vae.pth", "vae_config.json",
             "t5/config.json", "t5/model.safetensors", "t5/spiece.model"]


def test_weights_home_is_the_user_cache_unless_minivar_home_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIVAR_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.weights_home() == tmp_path / "minivar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert hub.weights_home() == tmp_path / "me/.cache/minivar"
    assert not hub.weights_home().is_relative_to(PACKAGE) and not hub.weights_home().is_relative_to(REPO)
    monkeypatch.setenv("MINIVAR_HOME", str(tmp_path / "mine"))
    assert hub.weights_home() == tmp_path / "mine"


def test_the_toy_ships_inside_the_package_and_the_checkout_links_to_it():
    toy = hub.SHIPPED["toy"]
    assert toy == PACKAGE / "toy" / "weights"
    assert all((toy / f).is_file() for f in TOY_FILES)
    link = REPO / "weights" / "toy"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute() and link.resolve() == toy


def test_the_wheel_holds_every_file_of_the_toy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    shutil.copytree(PACKAGE, src / "minivar", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("minivar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    toy = hub.SHIPPED["toy"]
    shipped = {p.relative_to(PACKAGE.parent).as_posix() for p in toy.rglob("*") if p.is_file()}
    assert {f"minivar/toy/weights/{f}" for f in TOY_FILES} <= shipped
    assert shipped <= names, sorted(shipped - names)
