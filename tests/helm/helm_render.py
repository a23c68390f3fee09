"""Render the Helm chart and check what it renders, without a cluster.

- `render` runs the real `helm template` (built by deploy/tools/install-go-tools.sh) and returns
  the objects; `lint` runs `helm lint --strict`.
- `validate_object` checks one object strictly: Kubernetes kinds with `kubernetes_validate`
  (strict schemas), KubeRay and Prometheus Operator kinds with their CRD's `openAPIV3Schema`
  turned into JSON Schema that rejects every field the API server would prune. A kind without a
  schema is an error, never a pass.
- `container_env` resolves a container's environment the way the kubelet does (envFrom, then env
  in order, `$(VAR)` expansion), with a marker value for each Secret reference.
- `parse_command_line` parses argv with the real `calm-stream` CLI (click's parser, no callbacks).
- `settings_values_schema` derives the `settings` part of values.schema.json from the settings
  model; the committed schema must equal it (`python tests/helm/helm_render.py write-settings-schema`
  rewrites it).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import typer
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "calm-stream"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.33.0"
TOOLS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "calm-stream"
INSTALLER = "deploy/tools/install-go-tools.sh"
# KubeRay's CRDs, test data beside this module (installing them is the operator's job, not the chart's).
KUBERAY_CRDS = Path(__file__).resolve().parent / "crds" / "kuberay-v1.7.0"
SERVICEMONITOR_CRD = (
    TOOLS_CACHE
    / "crds"
    / "prometheus-operator-v0.85.0"
    / "monitoring.coreos.com_servicemonitors.yaml"
)

# Settings the chart does not take as values: secrets come from Secrets, TLS file paths from the
# mounted Secret, and the driver's Ray address from the pod it runs in.
CHART_MANAGED_SETTINGS = {
    ("kafka", "sasl_password"),
    ("kafka", "ssl_password"),
    ("kafka", "ssl_cafile"),
    ("kafka", "ssl_certfile"),
    ("kafka", "ssl_keyfile"),
    ("ray", "address"),
}
POD_IP = "10.1.2.3"
# The CRDs are 60k lines of YAML: libyaml reads them in a second, pure Python in ten.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def find_tool(name: str) -> Path | None:
    """The tool from the installer's cache, else from PATH."""
    cached = TOOLS_CACHE / "go-bin" / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    found = shutil.which(name)
    return Path(found) if found else None


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    tool = find_tool(name)
    if tool is None:
        raise FileNotFoundError(f"{name} is not built: run {INSTALLER}")
    return subprocess.run(
        [str(tool), *args], capture_output=True, text=True, timeout=120, check=False
    )


def helm_args(
    values: Path | None, sets: Mapping[str, str], set_json: Mapping[str, Any]
) -> list[str]:
    args = [str(CHART)]
    if values is not None:
        args += ["--values", str(values)]
    for key, value in sets.items():
        args += ["--set-string", f"{key}={value}"]
    for key, value in set_json.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def lint(values: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_tool(
        "helm", "lint", "--strict", "--kube-version", KUBE_VERSION, *helm_args(values, {}, {})
    )


def render_text(
    values: Path | None = None,
    sets: Mapping[str, str] | None = None,
    set_json: Mapping[str, Any] | None = None,
    kube_version: str = KUBE_VERSION,
) -> str:
    """`helm template`'s YAML stream; RuntimeError with helm's message when it refuses."""
    result = run_tool(
        "helm",
        "template",
        "rel",
        "--namespace",
        "streaming",
        "--kube-version",
        kube_version,
        *helm_args(values, sets or {}, set_json or {}),
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return result.stdout


def render(values: Path | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(render_text(values, **kwargs), Loader=FAST_LOADER) if doc]


def render_notes(values: Path | None, workdir: Path) -> str:
    """NOTES.txt as `helm install` would print it. `helm template` skips NOTES.txt (and `helm
    install --dry-run` wants a cluster), so a copy of the chart in `workdir` turns it into a named
    template that one extra document renders as a YAML string."""
    chart = workdir / CHART.name
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n"
    )
    (chart / "templates" / "notes.yaml").write_text(
        'notes: {{ include "test.notes" . | toJson }}\n'
    )
    result = run_tool(
        "helm", "template", "rel", str(chart), "--namespace", "streaming",
        "--kube-version", KUBE_VERSION, "--show-only", "templates/notes.yaml",
        *(["--values", str(values)] if values is not None else []),
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return yaml.safe_load(result.stdout)["notes"]


# --- strict validation


def structural(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema with the API server's pruning made an error:
    an object with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` admits no other field; `nullable` admits null."""
    if isinstance(schema, list):
        return [structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = structural(value)
        elif not key.startswith("x-kubernetes-") and key not in ("nullable", "description"):
            out[key] = value
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _crd_files() -> list[Path]:
    crds = sorted(KUBERAY_CRDS.glob("*.yaml"))
    return crds + ([SERVICEMONITOR_CRD] if SERVICEMONITOR_CRD.is_file() else [])


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema of every served version of every CRD we know."""
    schemas = {}
    for path in _crd_files():
        crd = yaml.load(path.read_text(), Loader=FAST_LOADER)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = structural(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


class UnknownKind(ValueError):
    """No schema for this apiVersion/kind: it cannot be shown valid, so it is invalid."""


def validate_object(doc: Mapping[str, Any], kube_version: str = KUBE_VERSION) -> None:
    """Raise if `doc` is not a valid object for the cluster: jsonschema.ValidationError, or
    UnknownKind for a kind without a schema."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = crd_schemas().get(key)
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(doc)
        # The CRD leaves metadata to the API server, which checks it as ObjectMeta.
        _validate_k8s(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, kube_version
        )
        return
    try:
        _validate_k8s(doc, kube_version)
    except kubernetes_validate.SchemaNotFoundError:
        raise UnknownKind(
            f"no schema for {key[0]} {key[1]}: neither Kubernetes nor a known CRD"
        ) from None


def _validate_k8s(doc: Mapping[str, Any], kube_version: str) -> None:
    try:
        kubernetes_validate.validate(dict(doc), kube_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        raise jsonschema.ValidationError(f"{doc['kind']} {path}: {error.message}") from None


DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def api_server_rules(doc: Mapping[str, Any]) -> list[str]:
    """What the API server checks beyond the schema and we can check here: names, label values."""
    problems = []
    name = doc["metadata"]["name"]
    if len(name) > 63 or not DNS_1123_LABEL.match(name):
        problems.append(f"{doc['kind']} name {name!r} is not a DNS-1123 label")
    for where, labels in _label_maps(doc):
        for key, value in labels.items():
            if len(str(value)) > 63 or not LABEL_VALUE.match(str(value)):
                problems.append(
                    f"{doc['kind']} {where} label {key}={value!r} is not a valid label value"
                )
    return problems


def _label_maps(node: Any, where: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("labels", "matchLabels") and isinstance(value, dict):
                yield f"{where}.{key}", value
            else:
                yield from _label_maps(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _label_maps(item, f"{where}[{index}]")


def kuberay_rules(doc: Mapping[str, Any]) -> list[str]:
    """The checks KubeRay's operator makes before it acts (ray-operator/.../utils/validation.go),
    which the CRD's schema does not express: names, group sizes, TTL only with shutdown."""
    problems = []
    name = doc["metadata"]["name"]
    limit = {"RayCluster": 53, "RayJob": 47}[doc["kind"]]
    if len(name) > limit or not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        problems.append(
            f"{doc['kind']} name {name!r}: a DNS-1035 label of at most {limit} characters"
        )
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            problems.append("ttlSecondsAfterFinished must not be negative")
        if (spec.get("rayClusterSpec") is None) == (not spec.get("clusterSelector")):
            problems.append("exactly one of rayClusterSpec and clusterSelector")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            problems.append("activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            problems.append("backoffLimit must not be negative")
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
        submitter = (spec.get("submitterPodTemplate") or {}).get("spec", {"restartPolicy": "Never"})
        if submitter.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append("a submitter Job's pod needs restartPolicy Never or OnFailure")
        cluster = spec.get("rayClusterSpec")
        if cluster is not None and cluster.get("upgradeStrategy"):
            problems.append("upgradeStrategy is refused in a RayCluster a RayJob creates")
    else:
        cluster = spec
    if cluster is not None:
        problems += _cluster_rules(cluster)
    return problems


def _cluster_rules(cluster: Mapping[str, Any]) -> list[str]:
    problems = []
    groups = [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]
    names = [name for name, _ in groups[1:]]
    if len(set(names)) != len(names):
        problems.append(f"worker group names repeat: {names}")
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            problems.append(f"group {name} has no container")
        params = group.get("rayStartParams", {})
        if any(
            params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")
        ) and group.get("resources"):
            problems.append(f"group {name}: resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"group {name}: rayStartParams['labels'] is not supported")
        if name != "head":
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            replicas = group.get("replicas", low)
            if not low <= replicas <= high:
                problems.append(f"group {name}: need minReplicas <= replicas <= maxReplicas")
    return problems


# --- the program's side

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def secret_marker(secret: str, key: str) -> str:
    return f"<secret {secret}/{key}>"


def container_env(container: Mapping[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the kubelet would give `container`: ConfigMaps from `objects`, a marker per
    Secret key, POD_IP for status.podIP, `$(VAR)` expanded from earlier variables."""
    configmaps = {
        o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" not in source:
            raise ValueError(f"unexpected envFrom source {source}")
        name = source["configMapRef"]["name"]
        if name not in configmaps:
            raise ValueError(f"envFrom ConfigMap {name} is not rendered")
        env.update(
            {source.get("prefix", "") + key: value for key, value in configmaps[name].items()}
        )
    for item in container.get("env", []):
        if "value" in item:
            value = _VAR.sub(
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                item["value"],
            )
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            value = secret_marker(ref["name"], ref["key"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            value = POD_IP
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            value = configmaps[ref["name"]][ref["key"]]
        else:
            raise ValueError(f"unexpected env source {item}")
        env[item["name"]] = value
    return env


class CommandLineError(ValueError):
    """A command line the real CLI refuses, with the CLI's own message."""


def parse_command_line(argv: list[str]) -> Any:
    """Parse argv with the real `calm-stream` CLI down to the leaf command and return its context:
    options, arguments and their types are checked as at run time, but no command runs. (Typer may
    vendor its own click, so click's classes are reached through the command, not imported.)"""
    from pipeline.cli.app import app

    if not argv or argv[0] != "calm-stream":
        raise CommandLineError(f"not a calm-stream command line: {argv}")
    command = typer.main.get_command(app)
    try:
        context = command.make_context("calm-stream", list(argv[1:]))
        while hasattr(command, "resolve_command"):  # a group: descend into the sub-command
            protected = getattr(context, "_protected_args", None)
            rest = [*(context.protected_args if protected is None else protected), *context.args]
            name, command, rest = command.resolve_command(context, rest)
            context = command.make_context(name, rest, parent=context)
    except Exception as error:
        if not hasattr(error, "format_message"):  # not a usage error of click's
            raise
        raise CommandLineError(f"{shlex.join(argv)}: {error.format_message()}") from None
    return context


def settings_values_schema() -> dict[str, Any]:
    """The `settings` property of values.schema.json, derived from the settings model: each section
    an object that admits exactly the model's fields (less CHART_MANAGED_SETTINGS) with the model's
    types and bounds; each leaf may be null (left out: the program's default applies)."""
    from pipeline.settings import Settings

    model = Settings.model_json_schema()

    def resolve(node: Any) -> Any:
        if isinstance(node, dict) and "$ref" in node:
            return resolve(model["$defs"][node["$ref"].rsplit("/", 1)[1]])
        return node

    def leaf(node: dict[str, Any]) -> dict[str, Any]:
        kept = {
            k: v for k, v in node.items() if k not in ("title", "default", "format", "writeOnly")
        }
        if "anyOf" in kept:
            kept["anyOf"] = [leaf(option) for option in kept["anyOf"]]
        if {"type": "null"} not in kept.get("anyOf", []):
            description = kept.pop("description", None)
            kept = {"anyOf": [kept, {"type": "null"}]} | (
                {"description": description} if description else {}
            )
        return kept

    def section(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        properties = {}
        for name, field in node["properties"].items():
            if path + (name,) in CHART_MANAGED_SETTINGS:
                continue
            field = resolve(field)
            nested = field.get("type") == "object" and "properties" in field
            properties[name] = section(field, path + (name,)) if nested else leaf(field)
        return {"type": "object", "additionalProperties": False, "properties": properties}

    return section(model, ())


def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def merged_values(values_file: Path | None) -> dict[str, Any]:
    """The chart's values with a values file merged over them, the way Helm merges maps."""
    merged = copy.deepcopy(chart_values())
    if values_file is not None:
        _merge(merged, yaml.safe_load(values_file.read_text()) or {})
    return merged


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if value is None:
            base.pop(key, None)  # Helm: null deletes the key
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def write_settings_schema() -> None:
    """Rewrite the `settings` part of values.schema.json from the settings model."""
    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    description = schema["properties"]["settings"].get("description")
    schema["properties"]["settings"] = settings_values_schema() | {"description": description}
    path.write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["write-settings-schema"]:
        sys.exit("usage: python tests/helm/helm_render.py write-settings-schema")
    sys.path.insert(0, str(REPO))
    write_settings_schema()
