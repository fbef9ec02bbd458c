#!/usr/bin/env bash
# Wheel check: a regular (non-editable) install of the built wheel generates with the shipped toy model
# from outside the checkout, and keeps the weights home out of site-packages.
#
# Offline and quick: the wheel is built without isolation, and the throwaway venv sees this python's
# site-packages (torch, pip and the other dependencies are reused, nothing is downloaded). Its own
# site-packages come first on sys.path, so its minivar wins over an editable one installed here
# (whose finder setuptools appends to sys.meta_path, after the path-based one); the check asserts it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# Build from a copy of what the build reads, so no build/ or stale egg-info touches the checkout.
mkdir "$tmp/src" "$tmp/run"
cp -R pyproject.toml README.md minivar "$tmp/src/"
python -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src"
wheel=$(ls "$tmp"/dist/minivar-*.whl)
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"

python -m venv --system-site-packages --without-pip "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q --no-deps --force-reinstall "$wheel"

# -I: no PYTHONPATH, user site or current directory on sys.path, so only the venv's install is seen.
cd "$tmp/run"
export MINIVAR_HOME="$tmp/home" XDG_CACHE_HOME="$tmp/cache" HF_HUB_OFFLINE=1
"$py" -I -m minivar "a red circle" --model toy --out x.png
test -s x.png
"$py" -I -c '
import os, pathlib, sys
import minivar
from minivar.loading import hub
p = minivar.load("toy")
here, toy = pathlib.Path(minivar.__file__).resolve(), hub.SHIPPED["toy"]
assert "site-packages" in here.as_posix() and here.is_relative_to(pathlib.Path(sys.prefix).resolve()), here
assert toy.is_relative_to(here.parent) and (toy / "infinity.pth").is_file(), toy
assert hub.weights_home() == pathlib.Path(os.environ["MINIVAR_HOME"])
del os.environ["MINIVAR_HOME"]
assert hub.weights_home() == pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "minivar", hub.weights_home()
print(f"minivar from {here.parent}, toy from {toy}")
'
echo "wheel check passed"
