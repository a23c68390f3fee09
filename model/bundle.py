"""Model bundles: one verified directory per model version, and registries of them.

A bundle is a directory `<name>-<version>/` holding the ONNX graphs, the tokenizer and
`manifest.json`: name, version, K, dimensions, vocabulary size, special ids, every file's size and
sha256, training metrics, analytic FLOPs per token and the recipe that produced it. Loading
verifies every hash and refuses a changed byte, a missing file or a manifest that belongs to
another version, naming the problem (`BundleError`).

A registry is a directory, local or any pyarrow filesystem URI (s3://, gs://, hdfs://, file://),
of bundles plus a `latest` file naming the current one. Publishing copies the bundle, then
replaces `latest` (write-then-rename), so readers see either the old or the new version. Remote
bundles are copied into a local cache and verified there, because onnxruntime reads local files.

numpy-free and torch-free: the serving path loads bundles.
"""

import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from model.filesystems import split_uri

FORMAT = "calm-stream-bundle/2"  # 2: sampling fused into the step graphs
MANIFEST = "manifest.json"
LATEST = "latest"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class BundleError(ValueError):
    """A bundle or registry that cannot be used; the message names the file and the problem."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_dirname(name: str, version: str) -> str:
    if not _NAME.fullmatch(name):
        raise BundleError(f"bundle name {name!r}: letters, digits, '.', '_' and '-' only")
    if not _VERSION.fullmatch(version):
        raise BundleError(
            f"bundle version {version!r}: letters, digits, '.', '_', '+' and '-' only"
        )
    return f"{name}-{version}"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on local disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def id(self) -> str:
        return bundle_dirname(self.name, self.version)

    def graph(self, role: str) -> Path:
        """Path of the graph with this role (e.g. 'calm_backbone', 'calm_backbone.int8')."""
        graphs = self.manifest["graphs"]
        if role not in graphs:
            raise BundleError(f"bundle {self.id} has no {role!r} graph (has: {', '.join(graphs)})")
        return self.path / graphs[role]

    def has(self, role: str) -> bool:
        return role in self.manifest["graphs"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]


def write_bundle(
    root: str | Path,
    name: str,
    version: str,
    files: Mapping[str, Path],
    graphs: Mapping[str, str],
    fields: Mapping[str, Any],
) -> Bundle:
    """Create `root/<name>-<version>/` from `files` (bundle file name -> source path).

    `graphs` maps a role to one of the file names; `fields` are the rest of the manifest (k,
    dims, metrics, recipe, ...); the tokenizer must be among the files as 'tokenizer.json'.
    """
    target = Path(root) / bundle_dirname(name, version)
    if target.exists():
        raise BundleError(f"{target} already exists: a published version is never overwritten")
    missing = sorted(set(graphs.values()) - set(files)) + (
        [] if "tokenizer.json" in files else ["tokenizer.json"]
    )
    if missing:
        raise BundleError(f"bundle {target.name}: no source for {', '.join(missing)}")
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    try:
        for file_name, source in files.items():
            shutil.copyfile(source, staging / file_name)
        manifest = {
            "format": FORMAT,
            "name": name,
            "version": version,
            **fields,
            "graphs": dict(graphs),
            "tokenizer": "tokenizer.json",
            "files": {
                f: {"sha256": sha256_file(staging / f), "bytes": (staging / f).stat().st_size}
                for f in sorted(files)
            },
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(target)


def update_manifest(bundle: Bundle, fields: Mapping[str, Any]) -> Bundle:
    """Merge `fields` (e.g. metrics measured on the exported graphs) into an unpublished bundle's
    manifest; the files, their hashes and the bundle's identity cannot change this way."""
    fixed = sorted(set(fields) & {"format", "name", "version", "files", "graphs", "tokenizer"})
    if fixed:
        raise BundleError(f"bundle {bundle.id}: {', '.join(fixed)} cannot be updated")
    staging = bundle.path / f".{MANIFEST}.{uuid.uuid4().hex}"
    staging.write_text(json.dumps(bundle.manifest | dict(fields), indent=2) + "\n")
    staging.replace(bundle.path / MANIFEST)
    return load_bundle(bundle.path)


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a local bundle directory: manifest, identity, every file's size and hash."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {path}: no such directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path}: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"bundle {path}: {MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"bundle {path}: {MANIFEST} has format {found!r}, expected {FORMAT!r}")
    for key in ("name", "version", "files", "graphs", "tokenizer"):
        if key not in manifest:
            raise BundleError(f"bundle {path}: {MANIFEST} lacks {key!r}")
    expected = bundle_dirname(manifest["name"], manifest["version"])
    if path.name != expected:
        raise BundleError(
            f"bundle {path}: {MANIFEST} belongs to {expected}, not to {path.name} "
            "(a manifest from another version)"
        )
    files = manifest["files"]
    referenced = set(manifest["graphs"].values()) | {manifest["tokenizer"]}
    unlisted = sorted(referenced - set(files))
    if unlisted:
        raise BundleError(f"bundle {path}: {', '.join(unlisted)} not covered by manifest hashes")
    for file_name, entry in files.items():
        file_path = path / file_name
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise BundleError(f"bundle {path}: file name {file_name!r} escapes the bundle")
        if not file_path.is_file():
            raise BundleError(f"bundle {path}: file {file_name} is missing")
        size = file_path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"bundle {path}: file {file_name} has {size} bytes, manifest says {entry['bytes']}"
            )
        digest = sha256_file(file_path)
        if digest != entry["sha256"]:
            raise BundleError(
                f"bundle {path}: file {file_name} sha256 {digest} does not match the manifest's "
                f"{entry['sha256']} (a changed byte)"
            )
    return Bundle(path, manifest)


class Registry:
    """Bundles under one root (local path or pyarrow filesystem URI) with a `latest` pointer."""

    def __init__(self, uri: str | Path, cache_dir: str | Path | None = None):
        self.fs, self.root = split_uri(uri)
        local = isinstance(self.fs, pafs.LocalFileSystem)
        self.local_root: Path | None = Path(self.root) if local else None
        self.uri = str(uri)
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "calm-stream" / "bundles")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def versions(self) -> list[str]:
        """Bundle directory names (`<name>-<version>`) that have a manifest, sorted."""
        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as error:
            raise BundleError(f"registry {self.uri}: cannot list ({error})") from None
        names = []
        for entry in entries:
            if entry.type == pafs.FileType.Directory and not entry.base_name.startswith("."):
                info = self.fs.get_file_info(self._join(entry.base_name, MANIFEST))
                if info.type == pafs.FileType.File:
                    names.append(entry.base_name)
        return sorted(names)

    def latest(self) -> str:
        """The bundle directory name the `latest` pointer names."""
        try:
            with self.fs.open_input_stream(self._join(LATEST)) as f:
                name = f.read().decode().strip()
        except OSError:  # FileNotFoundError included
            raise BundleError(
                f"registry {self.uri}: no {LATEST} pointer (publish a bundle)"
            ) from None
        if not name or "/" in name:
            raise BundleError(
                f"registry {self.uri}: {LATEST} pointer {name!r} is not a bundle name"
            )
        return name

    def resolve(self, version: str = "latest") -> str:
        """'latest', a bundle directory name, or a bare version when one name owns it."""
        if version == LATEST:
            return self.latest()
        available = self.versions()
        if version in available:
            return version
        matches = [v for v in available if v.endswith(f"-{version}")]
        if len(matches) == 1:
            return matches[0]
        raise BundleError(
            f"registry {self.uri}: no bundle {version!r} (available: {', '.join(available) or 'none'})"
        )

    def open(self, version: str = "latest") -> Bundle:
        """The verified bundle; a remote one is copied into the local cache first."""
        dirname = self.resolve(version)
        if self.local_root is not None:
            return load_bundle(self.local_root / dirname)
        local = self.cache_dir / dirname
        if local.is_dir():
            try:
                return load_bundle(local)
            except BundleError:
                shutil.rmtree(local)  # a stale or partial copy: fetch again
        staging = local.with_name(f".{dirname}.{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        pafs.copy_files(
            self._join(dirname),
            staging.as_posix(),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        staging.rename(local)
        return load_bundle(local)

    def publish(self, bundle: Bundle, make_latest: bool = True) -> str:
        """Copy a verified local bundle into the registry and (by default) point `latest` at it."""
        bundle = load_bundle(bundle.path)  # re-verify: never publish a changed bundle
        target = self._join(bundle.id)
        if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
            raise BundleError(f"registry {self.uri}: {bundle.id} already exists")
        staging = self._join(f".{bundle.id}.{uuid.uuid4().hex}")
        self.fs.create_dir(staging, recursive=True)
        pafs.copy_files(
            bundle.path.as_posix(),
            staging,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )
        self.fs.move(staging, target)
        if make_latest:
            self.set_latest(bundle.id)
        return bundle.id

    def set_latest(self, dirname: str) -> None:
        if dirname not in self.versions():
            raise BundleError(f"registry {self.uri}: cannot point {LATEST} at missing {dirname}")
        staging = self._join(f".{LATEST}.{uuid.uuid4().hex}")
        with self.fs.open_output_stream(staging) as f:
            f.write(f"{dirname}\n".encode())
        self.fs.move(staging, self._join(LATEST))
