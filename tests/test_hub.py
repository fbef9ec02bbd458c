"""The model registry against a local fake Hugging Face Hub, model directories, and safetensors conversion.

The fake hub is a real HTTP server speaking the hub's file protocol (HEAD/GET /{repo}/resolve/{rev}/{file}
with the commit and etag headers), so `huggingface_hub.hf_hub_download` runs unmodified against it. It
serves the tiny-a fixture files under the real presets' repo and file names and records every request.
"""
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minivar
from minivar.loading import hub
from minivar.loading.checkpoint import flatten_block_keys, load_infinity
from minivar.loading.convert import convert
from minivar.loading.hub import ModelSpec, prefer_converted, resolve_files
from minivar.loading.checkpoint import load_t5, load_vae
from minivar.loading.weights import CheckpointError, read_pth, read_state_dict

T5_NEEDED = {"config.json", "spiece.model", "model.safetensors.index.json", "model-00001-of-00004.safetensors",
             "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"}


class FakeHub:
    """Serves root/{org}/{name}/{file} at {url}/{org}/{name}/resolve/{revision}/{file}."""

    def __init__(self, root: Path, revisions=("main", "v1.0")):
        self.root, self.revisions, self.requests = root, set(revisions), []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self, repo: str | None = None) -> set[str]:
        return {f for m, r, _, f in self.requests if m == "GET" and (repo is None or r == repo)}

    def _handler(self):
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.reply(send_body=False)

            def do_GET(self):
                self.reply(send_body=True)

            def reply(self, send_body: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                hub_.requests.append((self.command, repo, rev, name))
                path = hub_.root / repo / name
                if rev not in hub_.revisions or not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RevisionNotFound" if rev not in hub_.revisions else "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", hashlib.sha1(rev.encode()).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


def split_into_shards(sd: dict[str, torch.Tensor], folder: Path, n: int) -> None:
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i::n]}
        save_file(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tiny_dir: Path) -> Path:
    """The fixture files laid out as the real hub repos, plus files a download must not touch."""
    root = tmp_path_factory.mktemp("hub")
    inf = root / "FoundationVision/Infinity"
    (inf / "infinity_8b_weights").mkdir(parents=True)
    for name, src in [("infinity_2b_reg.pth", "infinity.pth"), ("infinity_vae_d32reg.pth", "vae.pth"),
                      ("infinity_vae_d56_f8_14_patchify.pth", "vae.pth"), ("README.md", "MANIFEST.md")]:
        (inf / name).symlink_to(tiny_dir / src)
    split_into_shards(read_pth(tiny_dir / "infinity.pth"), inf / "infinity_8b_weights", 3)
    t5 = root / "google/flan-t5-xl"
    shutil.copytree(tiny_dir / "t5-sharded", t5)
    # a decoder-only shard in the index, and a .bin copy of the weights: neither may be downloaded
    save_file({"decoder.final_layer_norm.weight": torch.ones(4)}, t5 / "model-decoder.safetensors")
    index = json.loads((t5 / "model.safetensors.index.json").read_text())
    index["weight_map"]["decoder.final_layer_norm.weight"] = "model-decoder.safetensors"
    (t5 / "model.safetensors.index.json").write_text(json.dumps(index))
    (t5 / "pytorch_model.bin").write_bytes(b"not needed")
    tiny = root / "fake/tiny"
    tiny.mkdir(parents=True)
    for name in ("infinity.pth", "infinity_config.json", "vae.pth", "vae_config.json"):
        (tiny / name).symlink_to(tiny_dir / name)
    return root


@pytest.fixture
def fake_hub(hub_root: Path, tmp_path: Path, monkeypatch) -> FakeHub:
    server = FakeHub(hub_root)
    monkeypatch.setenv("MINIVAR_HOME", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.server.shutdown()


# --------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------
def test_preset_download_fetches_exactly_what_the_model_needs(fake_hub, tmp_path, tiny_dir):
    files = resolve_files("infinity-2b")
    home = tmp_path / "weights"
    assert files.transformer == home / "infinity-2b/infinity_2b_reg.pth"
    assert files.vae == home / "infinity-2b/infinity_vae_d32reg.pth"
    assert files.text_encoder == home / "flan-t5-xl"
    assert files.transformer.read_bytes() == (tiny_dir / "infinity.pth").read_bytes()
    assert fake_hub.gets("FoundationVision/Infinity") == {"infinity_2b_reg.pth", "infinity_vae_d32reg.pth"}
    assert fake_hub.gets("google/flan-t5-xl") == T5_NEEDED  # no decoder shard, no .bin, no tokenizer extras
    assert {rev for _, _, rev, _ in fake_hub.requests} == {"main"}
    # the encoder-only download is a complete text encoder
    got, ref = load_t5(files.text_encoder).state_dict(), load_t5(tiny_dir / "t5").state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # a second resolve finds everything on disk and asks the hub nothing
    n = len(fake_hub.requests)
    assert resolve_files("infinity-2b") == files
    assert len(fake_hub.requests) == n


def test_8b_downloads_the_shard_index_then_every_shard_it_names(fake_hub, tmp_path, tiny_dir):
    files = resolve_files("infinity-8b", text_encoder=tiny_dir / "t5")  # an explicit path is never downloaded
    folder = tmp_path / "weights/infinity-8b/infinity_8b_weights"
    assert files.transformer == folder / "model.safetensors.index.json"
    assert fake_hub.gets("FoundationVision/Infinity") == {
        "infinity_8b_weights/model.safetensors.index.json", "infinity_vae_d56_f8_14_patchify.pth",
        *(f"infinity_8b_weights/model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3))}
    assert fake_hub.gets("google/flan-t5-xl") == set()
    got, ref = read_state_dict(files.transformer), read_pth(tiny_dir / "infinity.pth")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_pinned_revision_is_requested_and_an_unknown_one_is_a_clear_error(fake_hub, tmp_path, tiny_dir):
    resolve_files("infinity-2b", revision="v1.0", text_encoder=tiny_dir / "t5")
    assert {rev for _, _, rev, _ in fake_hub.requests} == {"v1.0"}
    shutil.rmtree(tmp_path / "weights")
    with pytest.raises(CheckpointError) as e:
        resolve_files("infinity-2b", revision="no-such-tag", text_encoder=tiny_dir / "t5")
    msg = str(e.value)
    assert "refused" in msg and "revision no-such-tag" in msg and "infinity_2b_reg.pth" in msg and "\n" not in msg


def test_offline_error_names_the_files_the_folder_and_the_toy_model(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        minivar.load("infinity-2b")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    for name in ("infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "spiece.model", "model.safetensors.index.json"):
        assert name in msg
    assert str(tmp_path / "weights/infinity-2b") in msg and "MINIVAR_HOME" in msg and "--model toy" in msg
    assert fake_hub.requests == []  # offline means not even asking


def test_unreachable_hub_fails_at_once_with_the_same_clear_error(fake_hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(CheckpointError) as e:
        resolve_files("infinity-8b")
    msg = str(e.value)
    assert "unreachable" in msg and "infinity_8b_weights/model.safetensors.index.json" in msg and "--model toy" in msg


def test_a_spec_with_json_configs_downloads_and_generates_like_the_local_files(fake_hub, monkeypatch, tiny_dir):
    spec = ModelSpec("tiny-hub", "fake/tiny", "infinity.pth", "vae.pth", "vae_config.json", "google/flan-t5-xl",
                     "infinity_config.json")
    monkeypatch.setitem(hub.SPECS, "tiny-hub", spec)
    got = minivar.sample("a red apple", res=256, prune=False, seed=3, model="tiny-hub", progress=False)
    assert fake_hub.gets("fake/tiny") == {"infinity.pth", "infinity_config.json", "vae.pth", "vae_config.json"}
    ref = minivar.load(tiny_dir).generate("a red apple", res=256, seed=3).image
    assert np.array_equal(np.asarray(got), np.asarray(ref))


def test_download_command_fetches_a_pinned_preset(fake_hub, tmp_path, capsys):
    from minivar.cli import main

    assert main(["download", "infinity-2b", "--revision", "v1.0"]) == 0
    out = capsys.readouterr().out
    assert f"transformer: {tmp_path / 'weights/infinity-2b/infinity_2b_reg.pth'}" in out
    assert f"text_encoder: {tmp_path / 'weights/flan-t5-xl'}" in out
    assert {rev for _, repo, rev, _ in fake_hub.requests if repo == "FoundationVision/Infinity"} == {"v1.0"}
    assert fake_hub.gets("google/flan-t5-xl") == T5_NEEDED


def test_download_rejects_names_that_are_not_presets():
    with pytest.raises(ValueError, match="downloadable presets are"):
        hub.download("no-such-model")


# --------------------------------------------------------------------------------------------------
# Model directories and names
# --------------------------------------------------------------------------------------------------
def test_a_model_directory_resolves_by_its_layout(tiny_dir):
    files = resolve_files(tiny_dir)
    assert (files.transformer, files.vae, files.text_encoder) == (
        tiny_dir / "infinity.pth", tiny_dir / "vae.pth", tiny_dir / "t5")
    assert files.config == tiny_dir / "infinity_config.json" and files.vae_config == tiny_dir / "vae_config.json"


def test_a_directory_under_the_weights_home_resolves_by_name(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("MINIVAR_HOME", str(tmp_path))
    (tmp_path / "mine").symlink_to(tiny_dir)
    assert resolve_files("mine").transformer == tmp_path / "mine/infinity.pth"


def test_incomplete_directory_and_unknown_name_are_one_line_errors(tmp_path, tiny_dir):
    (tmp_path / "infinity.pth").symlink_to(tiny_dir / "infinity.pth")
    with pytest.raises(CheckpointError, match="lacks infinity_config.json; vae.pth; vae_config.json; t5 "):
        resolve_files(tmp_path)
    with pytest.raises(ValueError, match="unknown model 'infinity-3b': it is not a preset"):
        resolve_files("infinity-3b")
    missing = tmp_path / "gone"  # an absolute path is looked for in one place, and named once
    with pytest.raises(ValueError, match=f"no model directory {re.escape(str(missing))}$"):
        resolve_files(missing)


# --------------------------------------------------------------------------------------------------
# Conversion to safetensors
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    for name in ("infinity.pth", "infinity_config.json", "vae.pth", "vae_config.json", "t5"):
        (tmp_path / name).symlink_to(tiny_dir / name)
    return tmp_path


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_convert_round_trip_fp32_is_exact(model_dir):
    cfg = minivar.InfinityConfig.from_upstream(model_dir / "infinity_config.json")
    st = convert(model_dir / "infinity.pth", dtype="fp32")
    assert st == model_dir / "infinity.safetensors" and not list(model_dir.glob(".*partial"))
    assert_same_state(load_infinity(model_dir / "infinity.pth", cfg), load_infinity(st, cfg))
    vst = convert(model_dir / "vae.pth")
    cfg_vae = model_dir / "vae_config.json"
    assert_same_state(load_vae(model_dir / "vae.pth", cfg_vae), load_vae(vst, cfg_vae))
    # the streaming writer produces files the reference safetensors reader accepts, tensor for tensor
    ref = flatten_block_keys(read_pth(model_dir / "infinity.pth"))
    got = flatten_block_keys(load_file(st))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_convert_to_bf16_halves_the_file_and_loads_like_a_bf16_load(model_dir):
    cfg = minivar.InfinityConfig.from_upstream(model_dir / "infinity_config.json")
    st = convert(model_dir / "infinity.pth", model_dir / "half.safetensors", dtype="bf16")
    assert st.stat().st_size < 0.55 * (model_dir / "infinity.pth").stat().st_size
    assert {t.dtype for t in load_file(st).values()} == {torch.bfloat16}
    a = load_infinity(model_dir / "infinity.pth", cfg, dtype=torch.bfloat16)
    assert_same_state(a, load_infinity(st, cfg, dtype=torch.bfloat16))


def test_loading_prefers_a_converted_file_unless_it_is_stale(model_dir):
    convert(model_dir / "infinity.pth")
    convert(model_dir / "vae.pth")
    files = resolve_files(model_dir)
    assert files.transformer.name == "infinity.safetensors" and files.vae.name == "vae.safetensors"
    pipe_st = minivar.load(model_dir)
    pipe_pth = minivar.load(transformer=model_dir / "infinity.pth", vae=model_dir / "vae.pth",
                            text_encoder=model_dir / "t5", config=model_dir / "infinity_config.json",
                            vae_config=model_dir / "vae_config.json")
    assert_same_state(pipe_st.transformer, pipe_pth.transformer)
    assert_same_state(pipe_st.vae, pipe_pth.vae)
    st = model_dir / "infinity.safetensors"
    older = (model_dir / "infinity.pth").stat().st_mtime - 100
    os.utime(st, (older, older))  # as if the .pth changed after converting
    with pytest.warns(UserWarning, match="older than"):
        assert prefer_converted(model_dir / "infinity.pth") == model_dir / "infinity.pth"


def test_convert_rejects_what_it_cannot_convert(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="not a .pth"):
        convert(tiny_dir / "t5/model.safetensors")
    with pytest.raises(ValueError, match="unknown dtype"):
        convert(tiny_dir / "infinity.pth", tmp_path / "x.safetensors", dtype="fp8")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        convert(tmp_path / "meta.pth")
