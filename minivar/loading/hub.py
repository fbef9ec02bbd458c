"""Model registry: which files make up each preset, where they live on disk, and how to fetch them.

    ~/.cache/minivar/                      the weights home: $MINIVAR_HOME, else $XDG_CACHE_HOME/minivar
      infinity-2b/infinity_2b_reg.pth          Infinity-2B (a .safetensors twin from `minivar convert` wins)
      infinity-2b/infinity_vae_d32reg.pth      its VAE
      infinity-8b/infinity_8b_weights/         Infinity-8B: model.safetensors.index.json + 4 shards
      infinity-8b/infinity_vae_d56_f8_14_patchify.pth
      flan-t5-xl/                              the text encoder both presets share: config.json,
                                               spiece.model, the shard index and the shards that hold
                                               encoder tensors (the decoder is never downloaded)

    minivar/toy/weights/                   the toy, a model directory (layout below) inside the package,
                                           so every install has it; nothing to download

The weights home is outside the package, the same for editable and regular installs, so downloads
never land in site-packages (an old checkout's weights/ folder still works as MINIVAR_HOME=weights).

A *model directory* (`minivar.load("path/to/dir")`, `minivar --model path/to/dir`) holds

      infinity.safetensors | infinity.pth | infinity/ (shards + index)   and infinity_config.json
      vae.safetensors | vae.pth                                          and vae_config.json
      t5/                                       a Hugging Face T5 directory (config, spiece.model, weights)

Missing preset files are downloaded with `huggingface_hub` (its progress bars, a pinned revision if
given, `HF_HUB_OFFLINE` and `HF_ENDPOINT` honoured). Files already on disk are used without asking
the hub anything.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..model.config import PRESETS, InfinityConfig
from .weights import CheckpointError, shard_files

TOY_HINT = 'or run offline with the toy model: minivar "a red fox" --model toy'


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str | None               # Hugging Face repo of the transformer and VAE; None: local files only
    transformer: str               # file (or shard index) inside `repo` and inside <weights home>/<name>/
    vae: str
    vae_config: str                # VAE preset name, or a JSON file next to the weights
    text_encoder_repo: str | None
    config: InfinityConfig | str   # preset config, or a JSON file next to the weights
    text_encoder: str = "flan-t5-xl"         # folder under the weights home (shared between presets)
    revision: str | None = None              # pinned commit or tag of `repo`; None follows main
    text_encoder_revision: str | None = None


SPECS: dict[str, ModelSpec] = {
    "infinity-2b": ModelSpec("infinity-2b", "FoundationVision/Infinity", "infinity_2b_reg.pth",
                             "infinity_vae_d32reg.pth", "d32", "google/flan-t5-xl", PRESETS["infinity-2b"]),
    "infinity-8b": ModelSpec("infinity-8b", "FoundationVision/Infinity",
                             "infinity_8b_weights/model.safetensors.index.json",
                             "infinity_vae_d56_f8_14_patchify.pth", "d56", "google/flan-t5-xl", PRESETS["infinity-8b"]),
}

# Model directories that ship inside the package (package data), found by name whatever $MINIVAR_HOME says.
# "toy" is trained by `python -m minivar.toy.train --out minivar/toy/weights` (see its README.md).
SHIPPED = {"toy": Path(__file__).resolve().parents[1] / "toy" / "weights"}

# What the text encoder needs from its repo, besides the shards that hold encoder tensors.
T5_FILES = ("config.json", "spiece.model")
T5_INDEX = "model.safetensors.index.json"

# The layout of a model directory: the first name present is used (.pth files yield to a converted twin).
LAYOUT = {
    "transformer": ("infinity.pth", "infinity"),
    "config": ("infinity_config.json",),
    "vae": ("vae.pth",),
    "vae_config": ("vae_config.json",),
    "text_encoder": ("t5",),
}


def weights_home() -> Path:
    """Where presets are downloaded: $MINIVAR_HOME, else the user cache ($XDG_CACHE_HOME/minivar, default
    ~/.cache/minivar); never inside the package, which a regular install puts in site-packages."""
    if os.environ.get("MINIVAR_HOME"):
        return Path(os.environ["MINIVAR_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "minivar"


def prefer_converted(path: Path) -> Path:
    """`x.pth` -> `x.safetensors` when `minivar convert` made one that is not older than the .pth."""
    path = Path(path)
    twin = path.with_suffix(".safetensors")
    if path.suffix != ".pth" or not twin.is_file():
        return path
    if path.exists() and twin.stat().st_mtime < path.stat().st_mtime:
        warnings.warn(f"{twin} is older than {path.name}; loading the .pth (re-run `minivar convert`)")
        return path
    return twin


@dataclass
class Files:
    name: str
    transformer: Path
    vae: Path
    vae_config: object
    text_encoder: Path
    config: object


# --------------------------------------------------------------------------------------------------
# Resolving a name to files
# --------------------------------------------------------------------------------------------------
def resolve_files(name: str | os.PathLike | None, *, transformer=None, vae=None, text_encoder=None, config=None,
                  vae_config=None, revision: str | None = None) -> Files:
    """Explicit paths win; a preset fills in the rest (downloading what is missing); a directory
    fills it in from its layout."""
    explicit = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, config=config, vae_config=vae_config)
    if name is None:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(f"minivar.load() needs a model name ({sorted(SPECS)}), a model directory, or all of: {missing}")
        return Files("custom", prefer_converted(transformer), prefer_converted(vae), vae_config, Path(text_encoder), config)
    if str(name) in SPECS:
        spec = SPECS[str(name)]
        ensure_local(spec, skip={k for k, v in explicit.items() if v is not None}, revision=revision)
        return preset_files(spec, explicit)
    return directory_files(find_directory(name), explicit)


def find_directory(name: str | os.PathLike) -> Path:
    """A model directory: shipped (toy), given as a path, or by its name under the weights home."""
    places = list(dict.fromkeys([Path(name).expanduser(), weights_home() / str(name)]))  # one, for an absolute path
    for path in (SHIPPED.get(str(name)), *places):
        if path is not None and path.is_dir():
            return path
    hint = ("; build the toy model with `python -m minivar.toy.train --out minivar/toy/weights`"
            if str(name) == "toy" else "")
    raise ValueError(f"unknown model {str(name)!r}: it is not a preset ({', '.join(sorted(SPECS))}) and there is "
                     f"no model directory {' or '.join(map(str, places))}{hint}")


def preset_files(spec: ModelSpec, explicit: dict) -> Files:
    home = weights_home() / spec.name

    def pick(part: str, default):
        return explicit[part] if explicit[part] is not None else default

    def beside(value):  # a JSON file name is relative to the preset's folder; anything else passes through
        return home / value if isinstance(value, str) and value.endswith(".json") else value

    return Files(spec.name, prefer_converted(pick("transformer", home / spec.transformer)),
                 prefer_converted(pick("vae", home / spec.vae)), pick("vae_config", beside(spec.vae_config)),
                 Path(pick("text_encoder", weights_home() / spec.text_encoder)), pick("config", beside(spec.config)))


def directory_files(root: Path, explicit: dict) -> Files:
    found, missing = {}, []
    for part, names in LAYOUT.items():
        candidates = [prefer_converted(root / n) for n in names]
        hit = explicit[part] if explicit[part] is not None else next((p for p in candidates if p.exists()), None)
        if hit is None:
            missing.append(" or ".join(c.name for c in candidates))
        found[part] = hit
    if missing:
        raise CheckpointError(f"model directory {root} lacks {'; '.join(missing)} (a model directory holds "
                              "infinity.pth|.safetensors, infinity_config.json, vae.pth|.safetensors, "
                              "vae_config.json and a t5/ folder)")
    return Files(root.name, Path(found["transformer"]), Path(found["vae"]), found["vae_config"],
                 Path(found["text_encoder"]), found["config"])


# --------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Remote:
    """One file of a hub repo and the folder it lands in (hf_hub_download's `local_dir`)."""
    repo: str
    filename: str
    folder: Path
    revision: str | None

    @property
    def path(self) -> Path:
        return self.folder / self.filename

    def present(self) -> bool:
        return prefer_converted(self.path).exists()


def shards_of(index: Path, keep=lambda key: True) -> list[str]:
    """The shard files a local `*.index.json` names that hold wanted keys, relative to its folder."""
    return [p.relative_to(index.parent).as_posix() for p in shard_files(index, keep)]


def remote_files(spec: ModelSpec, skip: set[str] = frozenset(), revision: str | None = None) -> list[Remote]:
    """Every hub file the preset needs, minus the parts in `skip`. Shards are listed once their index is on disk."""
    from ..model.t5 import is_encoder_key

    out = []
    if spec.repo is not None:
        wanted = {"transformer": spec.transformer, "vae": spec.vae, "config": spec.config, "vae_config": spec.vae_config}
        home, rev = weights_home() / spec.name, revision or spec.revision
        for part, value in wanted.items():
            is_file = part in ("transformer", "vae") or (isinstance(value, str) and value.endswith(".json"))
            if part not in skip and is_file:
                out += with_shards(Remote(spec.repo, value, home, rev))
    if spec.text_encoder_repo is not None and "text_encoder" not in skip:
        folder, rev = weights_home() / spec.text_encoder, spec.text_encoder_revision
        out += [Remote(spec.text_encoder_repo, f, folder, rev) for f in T5_FILES]
        out += with_shards(Remote(spec.text_encoder_repo, T5_INDEX, folder, rev), is_encoder_key)
    return out


def with_shards(remote: Remote, keep=lambda key: True) -> list[Remote]:
    """A file, plus the shards it names if it is a shard index already on disk."""
    if not remote.filename.endswith(".index.json") or not remote.path.is_file():
        return [remote]
    sub = Path(remote.filename).parent
    return [remote] + [Remote(remote.repo, (sub / s).as_posix(), remote.folder, remote.revision)
                       for s in shards_of(remote.path, keep)]


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def ensure_local(spec: ModelSpec, skip: set[str] = frozenset(), revision: str | None = None) -> None:
    """Download whatever the preset still lacks; two rounds, because shards are known from their index."""
    for _ in range(2):
        missing = [r for r in remote_files(spec, skip, revision) if not r.present()]
        if not missing:
            return
        if spec.repo is None and spec.text_encoder_repo is None:
            raise missing_error(spec, missing, "it is a local-only model")
        if hub_offline():
            raise missing_error(spec, missing, "HF_HUB_OFFLINE is set")
        fetch(spec, missing)


def fetch(spec: ModelSpec, files: list[Remote]) -> None:
    """hf_hub_download each file into its folder. The first request is a quick probe, so that an
    unreachable hub fails at once instead of after the library's retries. HF_ENDPOINT is read now
    (huggingface_hub itself reads it once, at import)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        first = files[0]
        get_hf_file_metadata(hf_hub_url(first.repo, first.filename, revision=first.revision, endpoint=endpoint),
                             timeout=10)
        for r in files:
            r.folder.mkdir(parents=True, exist_ok=True)
            hf_hub_download(r.repo, r.filename, revision=r.revision, local_dir=r.folder, endpoint=endpoint)
    except Exception as e:
        raise missing_error(spec, files, download_failure(e)) from None


def download_failure(e: Exception) -> str:
    """Why a download failed, in a few words; local trouble (a full disk, permissions) is re-raised as is."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if isinstance(e, OSError) and not isinstance(e, (HfHubHTTPError, EntryNotFoundError, ConnectionError, TimeoutError)):
        raise e
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if isinstance(e, HfHubHTTPError):  # the hub answered: unknown repo or revision, gated, server error
        return f"the Hugging Face Hub refused: {first}"
    return f"the Hugging Face Hub is unreachable: {type(e).__name__}: {first}"  # network, DNS, proxy, timeout


def missing_error(spec: ModelSpec, files: list[Remote], reason: str) -> CheckpointError:
    """One line: which files, from where, into which folder, and the offline alternative."""
    groups: dict[tuple[str, Path, str | None], list[str]] = {}
    for r in files:
        groups.setdefault((r.repo, r.folder, r.revision), []).append(r.filename)
    where = "; ".join(f"{', '.join(names)} from https://huggingface.co/{repo}"
                      f"{f' (revision {rev})' if rev else ''} into {folder}/"
                      + (" plus the shards the index names" if any(n.endswith('.index.json') for n in names) else "")
                      for (repo, folder, rev), names in groups.items())
    hint = "" if spec.name == "toy" else f", {TOY_HINT}"
    return CheckpointError(f"{spec.name} needs files that are not on disk and cannot be downloaded ({reason}). "
                           f"Put {where} (set MINIVAR_HOME to use another folder){hint}")


def download(name: str, revision: str | None = None) -> Files:
    """Fetch every file of a preset (`minivar download NAME`) and return where they are."""
    if name not in SPECS:
        raise ValueError(f"unknown preset {name!r}: downloadable presets are "
                         f"{sorted(k for k, s in SPECS.items() if s.repo)}")
    ensure_local(SPECS[name], revision=revision)
    return preset_files(SPECS[name], dict.fromkeys(LAYOUT))
