"""Model bundles and registries: verified loading, tampering refused with the problem named."""

import json
import shutil

import pyarrow.fs as pafs
import pytest
from support import export_untrained_bundle

from model.bundle import BundleError, Registry, load_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two versions of a tiny (untrained) CALM bundle; hashing does not care about training."""
    root = tmp_path_factory.mktemp("bundles")
    texts = ["a tiny corpus for a tiny tokenizer", "events and windows"]
    return [export_untrained_bundle(root, texts, "tiny", version) for version in ("1.0", "1.1")]


@pytest.fixture
def bundle_copy(exported, tmp_path):
    """A private copy of version 1.0 to tamper with."""
    target = tmp_path / exported[0].path.name
    shutil.copytree(exported[0].path, target)
    return target


def test_a_written_bundle_verifies(exported):
    bundle = load_bundle(exported[0].path)
    assert bundle.id == "tiny-1.0" and bundle.path.name == "tiny-1.0"
    files = bundle.manifest["files"]
    assert set(files) == {
        "calm_backbone.onnx",
        "calm_sampler.onnx",
        "calm_encoder.onnx",
        "tokenizer.json",
    }
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in files.values())
    assert bundle.graph("calm_sampler").is_file()
    with pytest.raises(BundleError, match="has no 'ar_backbone' graph"):
        bundle.graph("ar_backbone")


@pytest.mark.parametrize("name", ["calm_backbone.onnx", "tokenizer.json"])
def test_one_changed_byte_is_refused(bundle_copy, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"file {name} sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_refused(bundle_copy):
    (bundle_copy / "calm_sampler.onnx").unlink()
    with pytest.raises(BundleError, match="file calm_sampler.onnx is missing"):
        load_bundle(bundle_copy)


def test_a_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "calm_encoder.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="calm_encoder.onnx has .* bytes, manifest says"):
        load_bundle(bundle_copy)


def test_a_manifest_from_another_version_is_refused(exported, bundle_copy):
    shutil.copy(exported[1].path / "manifest.json", bundle_copy / "manifest.json")
    with pytest.raises(BundleError, match="belongs to tiny-1.1, not to tiny-1.0"):
        load_bundle(bundle_copy)


def test_a_missing_or_foreign_manifest_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest | {"format": "other/9"}))
    with pytest.raises(BundleError, match="format 'other/9'"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(bundle_copy)


def test_a_graph_outside_the_hashes_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["files"]["calm_backbone.onnx"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="calm_backbone.onnx not covered by manifest hashes"):
        load_bundle(bundle_copy)


def test_local_registry_publishes_and_points_latest(exported, tmp_path):
    registry = Registry(tmp_path / "registry")
    with pytest.raises(BundleError, match="no latest pointer"):
        registry.open()
    assert registry.publish(exported[0]) == "tiny-1.0"
    assert registry.open().version == "1.0"
    registry.publish(exported[1], make_latest=False)
    assert registry.versions() == ["tiny-1.0", "tiny-1.1"]
    assert registry.open().version == "1.0"
    assert registry.open("1.1").id == registry.open("tiny-1.1").id == "tiny-1.1"
    registry.set_latest("tiny-1.1")
    assert registry.open("latest").version == "1.1"
    assert Registry(f"file://{tmp_path / 'registry'}").open().version == "1.1"
    with pytest.raises(BundleError, match="already exists"):
        registry.publish(exported[1])
    with pytest.raises(BundleError, match="no bundle '2.0'"):
        registry.open("2.0")
    with pytest.raises(BundleError, match="missing tiny-9"):
        registry.set_latest("tiny-9")


def test_a_tampered_bundle_in_a_registry_is_refused(exported, tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.publish(exported[0])
    (tmp_path / "registry" / "tiny-1.0" / "calm_encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="calm_encoder.onnx"):
        registry.open()


def test_a_remote_registry_is_cached_and_verified_locally(exported, tmp_path):
    """A non-local pyarrow filesystem (Arrow's in-memory one) goes through the local cache."""
    registry = Registry("mock:///models", cache_dir=tmp_path / "cache")
    assert not isinstance(registry.fs, pafs.LocalFileSystem)
    registry.publish(exported[0])
    bundle = registry.open()
    assert bundle.path == tmp_path / "cache" / "tiny-1.0"
    (bundle.path / "calm_sampler.onnx").write_bytes(b"corrupted cache")
    assert load_bundle(registry.open().path).id == "tiny-1.0"  # fetched again, verified
