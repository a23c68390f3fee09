"""The Helm chart, proven without a cluster: lint, render, validate every object strictly, and check
that what it renders is exactly what the program accepts (settings and command lines).

The tools come from deploy/tools/install-go-tools.sh (the test command runs it first). Without
them these tests skip locally and FAIL under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dashboard_queries import series_of
from helm_render import (
    CHART,
    CHART_MANAGED_SETTINGS,
    CI_VALUES,
    INSTALLER,
    KUBE_VERSION,
    POD_IP,
    SERVICEMONITOR_CRD,
    CommandLineError,
    UnknownKind,
    api_server_rules,
    chart_values,
    container_env,
    crd_schemas,
    find_tool,
    kuberay_rules,
    lint,
    merged_values,
    parse_command_line,
    render,
    render_notes,
    render_text,
    secret_marker,
    settings_values_schema,
    structural,
    validate_object,
    values_schema,
)

from pipeline.settings import SettingsError, load_settings, setting_paths

VALUES = [None, *CI_VALUES]
IDS = ["default", *(path.name.removesuffix("-values.yaml") for path in CI_VALUES)]
SASL_SSL = CHART / "ci" / "sasl-ssl-values.yaml"
TRAINING = CHART / "ci" / "training-values.yaml"
GATED_KINDS = {"ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "RayJob"}


@pytest.fixture(scope="session", autouse=True)
def tools() -> None:
    missing = [name for name in ("helm", "kubeconform") if find_tool(name) is None]
    missing += [] if SERVICEMONITOR_CRD.is_file() else ["the ServiceMonitor CRD"]
    if missing:  # `make test` installs them; a bare pytest run must say so, not skip quietly
        pytest.fail(f"{', '.join(missing)} missing: run {INSTALLER} (or `make test`)")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CALM_STREAM_"):
            monkeypatch.delenv(name)


@cache
def rendered(values: Path | None, kube_version: str = KUBE_VERSION) -> tuple[dict[str, Any], ...]:
    return tuple(render(values, kube_version=kube_version))


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod a rendered object makes the operator create."""
    if doc["kind"] == "RayJob":
        yield "submitter", doc["spec"]["submitterPodTemplate"]
        cluster = doc["spec"]["rayClusterSpec"]
    elif doc["kind"] == "RayCluster":
        cluster = doc["spec"]
    else:
        return
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def containers(values: Path | None) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) over every container of every rendered pod template."""
    for doc in rendered(values):
        for where, template in pod_templates(doc):
            spec = template["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{doc['kind']}/{where}/{container['name']}", spec, container


def settings_leaves(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[Any, Any]]:
    """(path, value) of each leaf of a `settings` values tree; a dict-valued setting is a leaf."""
    for key, value in node.items():
        if isinstance(value, dict) and path + (key,) != ("pricing", "node_price_per_hour"):
            yield from settings_leaves(value, path + (key,))
        else:
            yield path + (key,), value


# --- lint, render, strict validation


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_helm_lint_strict(values: Path | None) -> None:
    result = lint(values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ci_variant_exists() -> None:
    assert {"minimal", "gpu", "s3", "sasl-ssl", "training"} <= set(IDS)


@pytest.mark.parametrize(
    ("values", "kube_version"),
    [*((v, KUBE_VERSION) for v in VALUES), (None, "1.27.0"), (None, "1.37.0")],
    ids=[*IDS, "default-k8s-1.27", "default-k8s-1.37"],
)
def test_every_rendered_object_is_valid(values: Path | None, kube_version: str) -> None:
    docs = rendered(values, kube_version)
    assert {"ConfigMap", "RayCluster", "ServiceAccount"} <= {doc["kind"] for doc in docs}
    for doc in docs:
        validate_object(doc, kube_version)
        assert api_server_rules(doc) == [], doc["kind"]
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert kuberay_rules(doc) == [], doc["kind"]


@pytest.fixture(scope="module")
def kubeconform_schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Offline schemas for kubeconform: Kubernetes' from kubernetes-validate (strict) with their
    $refs made relative, the CRDs' converted by `structural`, named as kubeconform looks them up."""
    import kubernetes_validate

    schemas = tmp_path_factory.mktemp("schemas")
    package = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    version_dir = package / f"v{KUBE_VERSION}-local-strict"
    kinds = {(doc["apiVersion"], doc["kind"]) for values in VALUES for doc in rendered(values)}
    crds = crd_schemas()
    for name in ["_definitions.json"] + [_schema_file(*kind) for kind in kinds - crds.keys()]:
        text = (version_dir / name).read_text()
        schema = json.loads(text.replace('"/api/_definitions.json#', '"_definitions.json#'))
        schema.pop("$id", None)  # refs resolve next to the file, not on kubernetes.io
        (schemas / name).write_text(json.dumps(schema))
    for kind, schema in crds.items():
        draft = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
        (schemas / _schema_file(*kind)).write_text(json.dumps(draft | schema))
    return schemas


def kubeconform(schemas: Path, docs: list[dict[str, Any]], tmp_path: Path) -> str:
    stream = tmp_path / "objects.yaml"
    stream.write_text(yaml.safe_dump_all(docs))
    template = f"{schemas}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json"
    result = subprocess.run(
        [str(find_tool("kubeconform")), "-strict", "-summary", "-kubernetes-version",
         KUBE_VERSION, "-schema-location", template, str(stream)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result.stdout


def test_kubeconform_agrees(kubeconform_schemas: Path, tmp_path: Path) -> None:
    """Every rendered object again through kubeconform -strict, a second (Go) validator."""
    docs = [doc for values in VALUES for doc in rendered(values)]
    summary = kubeconform(kubeconform_schemas, docs, tmp_path)
    assert f"Valid: {len(docs)}, Invalid: 0, Errors: 0, Skipped: 0" in summary, summary


def test_kubeconform_rejects_bad_and_unknown_objects(kubeconform_schemas: Path, tmp_path: Path):
    cluster = json.loads(json.dumps(next(d for d in rendered(None) if d["kind"] == "RayCluster")))
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(AssertionError, match="minReplica"):
        kubeconform(kubeconform_schemas, [cluster], tmp_path)
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(AssertionError, match="Widget"):
        kubeconform(kubeconform_schemas, [widget], tmp_path)


def _schema_file(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    return f"{kind.lower()}-{(group.split('.')[0] + '-') if group else ''}{version}.json"


def test_unknown_kind_fails_validation() -> None:
    with pytest.raises(UnknownKind):
        validate_object(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
        )


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplica=1),
        lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicyy="Always"
        ),
        lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas="4"),
        lambda c: c["metadata"].update(labelz={"a": "b"}),
    ],
    ids=[
        "typo-in-group",
        "typo-in-pod-template",
        "non-string-start-param",
        "string-replicas",
        "typo-in-metadata",
    ],
)
def test_raycluster_schema_rejects_what_the_api_server_would(corrupt: Any) -> None:
    cluster = json.loads(json.dumps(next(d for d in rendered(None) if d["kind"] == "RayCluster")))
    corrupt(cluster)
    with pytest.raises(jsonschema.ValidationError):
        validate_object(cluster)


def test_structural_conversion_keeps_open_maps_open() -> None:
    schema = structural(
        {
            "type": "object",
            "properties": {"a": {"type": "object", "additionalProperties": {"type": "string"}}},
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["a"]["additionalProperties"] == {"type": "string"}


def test_rayjob_operator_rules() -> None:  # the CEL-like rules JSON schema cannot express
    job = json.loads(json.dumps(next(d for d in rendered(TRAINING) if d["kind"] == "RayJob")))
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert kuberay_rules(job) == []
    job["spec"]["shutdownAfterJobFinishes"] = False
    assert kuberay_rules(job) == ["ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"]


# --- what every object and container looks like


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_labels(values: Path | None) -> None:
    standard = {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/part-of",
        "helm.sh/chart",
    }
    for doc in rendered(values):
        labels = doc["metadata"]["labels"]
        assert standard <= labels.keys(), doc["kind"]
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        for where, template in pod_templates(doc):
            assert (
                standard | {"app.kubernetes.io/component"} <= template["metadata"]["labels"].keys()
            ), where


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_restricted_pod_security_everywhere(values: Path | None) -> None:
    seen = 0
    for where, spec, container in containers(values):
        pod, own = spec["securityContext"], container["securityContext"]
        assert pod["runAsNonRoot"] is True and own["runAsNonRoot"] is True, where
        assert pod["seccompProfile"]["type"] == own["seccompProfile"]["type"] == "RuntimeDefault", (
            where
        )
        assert own["allowPrivilegeEscalation"] is False, where
        assert own["capabilities"] == {"drop": ["ALL"]}, where
        assert own["readOnlyRootFilesystem"] is True, where
        assert "privileged" not in own and "hostNetwork" not in spec and "hostPID" not in spec, (
            where
        )
        # Ray writes /tmp/ray: /tmp must be a writable emptyDir under a read-only root.
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        seen += 1
    assert seen >= 3
    for doc in rendered(values):
        options = doc["spec"].get("autoscalerOptions") if doc["kind"] == "RayCluster" else None
        if options:  # the autoscaler container KubeRay adds to the head pod
            assert options["securityContext"]["readOnlyRootFilesystem"] is True
            assert options["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert {m["mountPath"] for m in options["volumeMounts"]} == {"/tmp", "/tmp/ray"}


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_every_container_has_requests_and_limits(values: Path | None) -> None:
    for where, _, container in containers(values):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][kind].keys(), f"{where} {kind}"


def test_head_runs_ray_then_the_driver() -> None:
    cluster = next(d for d in rendered(None) if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    ray_head, driver = head["containers"]
    assert ray_head["name"] == "ray-head"
    assert "command" not in ray_head  # KubeRay runs `ray start --head` there
    assert driver["command"] + driver["args"] == ["calm-stream", "run"]
    for container in (ray_head, driver):
        assert {"name": "ray-logs", "mountPath": "/tmp/ray"} in container["volumeMounts"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    assert {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]} == {"ingest", "inference"}
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_new_settings_replace_the_pods() -> None:
    """With upgradeStrategy Recreate KubeRay replaces the pods when their template changes; the
    settings' checksum on every template makes a settings change such a change."""

    def checksums(docs: Any) -> set[str]:
        cluster = next(d for d in docs if d["kind"] == "RayCluster")
        return {
            t["metadata"]["annotations"]["checksum/settings"] for _, t in pod_templates(cluster)
        }

    before = checksums(rendered(None))
    after = checksums(render(set_json={"settings.model.temperature": 0.7}))
    assert len(before) == len(after) == 1 and before != after


def test_gpu_workers_get_gpus_tolerations_and_spread() -> None:
    cluster = next(
        d for d in rendered(CHART / "ci" / "gpu-values.yaml") if d["kind"] == "RayCluster"
    )
    inference = next(
        g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "inference"
    )
    spec = inference["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["priorityClassName"] == "calm-stream-gpu"
    spread = spec["topologySpreadConstraints"][0]
    assert (
        spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker-inference"
    )
    assert (inference["minReplicas"], inference["maxReplicas"]) == (1, 4)


# --- gated extras


def test_gated_extras_off_by_default() -> None:
    kinds = {doc["kind"] for doc in rendered(None)}
    assert not kinds & GATED_KINDS
    assert not [d for d in rendered(None) if d["metadata"]["labels"].get("grafana_dashboard")]


def test_gated_extras_on() -> None:
    docs = rendered(SASL_SSL)
    kinds = [doc["kind"] for doc in docs]
    assert {"ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds)
    assert kinds.count("PodDisruptionBudget") == 2  # ingest, inference: a head PDB is opt-in
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {
        p["name"] for p in service["spec"]["ports"]
    }
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= _head_labels(docs).items()


def _head_labels(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    return cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]


# Each panel the dashboard must have, by a word of its title, and the series it must read.
DASHBOARD_PANELS = {
    "events consumed": {"calm_events_consumed_total"},
    "tokens per second": {"calm_generation_tokens_total"},
    "consumer lag": {"calm_consumer_lag"},
    "dead letters": {"calm_dead_letters_total"},
    "$ per 1k": {"calm_cost_dollars_total", "calm_generation_tokens_total"},
    "calm vs discrete baseline": {"calm_cost_dollars_total", "calm_baseline_cost_dollars_total"},
    "fact accuracy": {"calm_summary_fact_accuracy_bucket", "calm_summary_invented_facts_total"},
}


def test_grafana_dashboard_reads_the_pipelines_metrics() -> None:
    from pipeline.sinks.metrics import PipelineMetrics

    (board,) = [
        d for d in rendered(SASL_SSL) if d["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert board["kind"] == "ConfigMap"
    assert board["metadata"]["annotations"] == {"grafana_folder": "calm-stream"}
    dashboard = json.loads(board["data"]["calm-stream.json"])
    queried = {
        panel["title"].lower(): {
            name for target in panel["targets"] for name in series_of(target["expr"])
        }
        for panel in dashboard["panels"]
    }
    for topic, series in DASHBOARD_PANELS.items():
        panels = [title for title in queried if topic in title]
        assert len(panels) == 1, f"one panel for {topic!r}: {list(queried)}"
        assert series <= queried[panels[0]], f"{panels[0]}: {queried[panels[0]]}"
    # Every series a panel queries is one the pipeline exports, as Prometheus names it (counters
    # get _total, histograms _bucket).
    exported = set()
    for family in PipelineMetrics().registry.collect():
        exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
    everything = set().union(*queried.values())
    assert everything - exported == set()


# --- values schema


def test_settings_schema_is_the_settings_model() -> None:
    """values.schema.json's settings are derived from pipeline/settings.py; regenerate with
    `python tests/helm/helm_render.py write-settings-schema` when the model changes."""
    committed = values_schema()["properties"]["settings"]
    committed = {k: v for k, v in committed.items() if k != "description"}
    assert committed == settings_values_schema()


def test_values_mirror_every_setting() -> None:
    paths = {path for path, _ in settings_leaves(chart_values()["settings"])}
    assert paths == set(setting_paths()) - CHART_MANAGED_SETTINGS


def test_readme_documents_every_value() -> None:
    """The values table in the chart's README has a row for every key of values.yaml (maps that
    hold Kubernetes objects or free-form data are one row; worker groups are `<name>`)."""
    opaque = {"resources", "nodeSelector", "affinity", "rayStartParams", "podAnnotations",
              "podLabels", "labels", "annotations", "config", "node_price_per_hour"}  # fmt: skip

    def keys(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[str]:
        for key, value in node.items():
            here = path + (("<name>",) if path[-1:] == ("workerGroups",) else (key,))
            if isinstance(value, dict) and value and key not in opaque:
                yield from keys(value, here)
            else:
                yield ".".join(here)

    documented = set(
        re.findall(r"^\| `([^`]+)` \|", (CHART / "README.md").read_text(), re.MULTILINE)
    )
    assert set(keys(chart_values())) - documented == set()


@pytest.mark.parametrize(
    ("sets", "set_json", "complaint"),
    [
        (
            {"settings.kafka.bootstrap_server": "k:9092"},
            {},
            "additional properties 'bootstrap_server'",
        ),
        ({}, {"settings.kafka.poll_max_records": "500"}, "poll_max_records"),
        ({}, {"settings.windows.kind": "hopping"}, "/settings/windows/kind"),
        ({"settings.kafka.topics.dlq": "bad topic!"}, {}, "/settings/kafka/topics/dlq"),
        ({}, {"settings.model.temperature": 1.5}, "/settings/model/temperature"),
        ({"settings.kafka.sasl_password": "hunter2"}, {}, "additional properties 'sasl_password'"),
        ({}, {"ray.workerGroups.inference.maxReplicas": "8"}, "maxReplicas"),
        ({}, {"ray.head.rayStartParams": {"num-cpus": 0}}, "num-cpus"),
        ({}, {"containerSecurityContext.readOnlyRootFilesystem": False}, "readOnlyRootFilesystem"),
        ({"pipeline.extraEnv[0].name": "CALM_STREAM_KAFKA__SASL_PASSWORD"}, {}, "extraEnv"),
        ({"traning.enabled": "true"}, {}, "additional properties 'traning'"),
        ({"ray.head.resources.requests.cpu": "-1"}, {}, "/ray/head/resources/requests/cpu"),
        (
            {},
            {"ray.workerGroups.inference.resources.limits.nvidia\\.com/gpu": 0.5},
            "nvidia.com~1gpu",
        ),
        ({"storage.pvc.size": "0Gi"}, {}, "/storage/pvc/size"),
        ({"pipeline.extraEnv[0].name": "calm_stream_kafka__group_id"}, {}, "/extraEnv/0/name"),
    ],
    ids=[
        "typo",
        "string-for-int",
        "bad-enum",
        "bad-topic-name",
        "out-of-range",
        "secret-as-value",
        "string-replicas",
        "int-start-param",
        "writable-root",
        "settings-through-extra-env",
        "top-level-typo",
        "negative-quantity",
        "half-a-gpu",
        "empty-volume",
        "lower-case-settings-env",
    ],
)
def test_schema_rejects_bad_values(
    sets: dict[str, str], set_json: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(
        RuntimeError, match="values don't meet the specifications of the schema"
    ) as error:
        render_text(sets=sets, set_json=set_json)
    assert complaint in str(error.value)


def test_readme_defaults_are_the_values() -> None:
    """A default the values table gives as one `literal` is the value in values.yaml."""
    values = chart_values()
    checked = 0
    for line in (CHART / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) < 3 or not re.fullmatch(r"`[^`]+`", cells[0]):
            continue
        key = cells[0].strip("`")
        default = cells[3] if key.startswith("settings.") else cells[2]
        literal = re.fullmatch(r"`([^`]*)`", default)
        if literal is None or key.split(".")[0] not in values:
            continue
        node: Any = values
        for part in key.split("."):
            node = node["ingest" if part == "<name>" else part]
        assert yaml.safe_load(literal.group(1)) == node, key
        checked += 1
    assert checked > 100


def test_values_file_with_a_typo_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "typo-values.yaml"
    bad.write_text(
        "settings:\n  kafka:\n    bootstrap_servers: [k:9092]\n    secuirty_protocol: SSL\n"
    )
    with pytest.raises(RuntimeError, match="secuirty_protocol"):
        render_text(bad)
    assert lint(bad).returncode != 0


@pytest.mark.parametrize(
    ("set_json", "complaint"),
    [
        ({"settings.kafka.security_protocol": "SASL_SSL"}, "needs settings.kafka.sasl_mechanism"),
        ({"settings.sinks.root": "s3://bucket/sinks"}, "the sink needs a local path"),
        ({"kafkaCredentials.tls.secretName": "tls"}, "neither SSL nor SASL_SSL"),
        ({"ray.workerGroups.ingest.minReplicas": 9}, "minReplicas <= replicas <= maxReplicas"),
        (
            {"training.enabled": True, "training.corpus": "/data/c", "training.cpusPerWorker": 2.5},
            "training.cpusPerWorker 2.5 exceeds the 2 CPUs of a worker pod",
        ),
        ({"training.enabled": True}, "training.corpus is required"),
        ({"storage.mountPath": "/tmp"}, "storage.mountPath /tmp is where the chart mounts"),
        (
            {"ray.workerGroups.ingest.resources.requests.cpu": "1500m"},
            "ray.workerGroups.ingest.resources: requests.cpu 1500m exceeds limits.cpu 1",
        ),
        (
            {"training.worker.resources.requests.memory": "9Gi"},
            "training.worker.resources: requests.memory 9Gi exceeds limits.memory 8Gi",
        ),
        ({"settings.windows.kind": "sliding"}, "kind sliding needs settings.windows.slide_seconds"),
        (
            {"settings.windows.kind": "sliding", "settings.windows.slide_seconds": 600},
            "slide_seconds must not exceed settings.windows.size_seconds",
        ),
        ({"settings.windows.slide_seconds": 60}, "slide_seconds applies only to settings.windows"),
        (
            {"settings.pricing.node_type": "cpu-9000"},
            'node_type "cpu-9000" has no price in settings.pricing.node_price_per_hour (cpu-2, ',
        ),
    ],
    ids=[
        "sasl-incomplete",
        "sink-on-s3",
        "tls-without-ssl",
        "replicas",
        "train-cpus",
        "no-corpus",
        "mount-on-tmp",
        "request-over-limit",
        "training-request-over-limit",
        "sliding-without-slide",
        "slide-over-size",
        "slide-when-tumbling",
        "unpriced-node",
    ],
)
def test_template_refuses_inconsistent_values(set_json: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(complaint)):
        render_text(set_json=set_json)


# --- secrets


def secret_settings_env() -> set[str]:
    """CALM_STREAM_* names of the settings the model holds as SecretStr."""
    from pipeline.settings import Settings

    names = set()
    for path in setting_paths():
        model: Any = Settings
        for part in path[:-1]:
            model = model.model_fields[part].annotation
        if "SecretStr" in str(model.model_fields[path[-1]].annotation):
            names.add("CALM_STREAM_" + "__".join(path).upper())
    return names


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_secrets_never_in_a_configmap(values: Path | None) -> None:
    secret_env = secret_settings_env() | {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}
    assert {"CALM_STREAM_KAFKA__SASL_PASSWORD", "CALM_STREAM_KAFKA__SSL_PASSWORD"} <= secret_env
    for doc in rendered(values):
        assert doc["kind"] != "Secret"  # the chart only references existing Secrets
        if doc["kind"] == "ConfigMap":
            leaked = secret_env & doc.get("data", {}).keys()
            assert not leaked, f"{doc['metadata']['name']}: {leaked}"
    for where, _, container in containers(values):
        for item in container.get("env", []):
            if item["name"] in secret_env:
                assert "secretKeyRef" in item.get("valueFrom", {}), f"{where} {item['name']}"
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, where


def test_sasl_ssl_credentials_come_from_secrets() -> None:
    docs = rendered(SASL_SSL)
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    env = container_env(head["containers"][1], list(docs))
    settings = _load(env)
    assert settings.kafka.sasl_password.get_secret_value() == secret_marker(
        "kafka-calm-stream-user", "password"
    )
    assert settings.kafka.ssl_password.get_secret_value() == secret_marker(
        "kafka-client-tls-key", "passphrase"
    )
    assert str(settings.kafka.ssl_cafile) == "/etc/calm-stream/kafka-tls/ca.crt"
    tls = next(v for v in head["volumes"] if v["name"] == "kafka-tls")
    assert tls["secret"]["secretName"] == "kafka-client-tls"
    for group in cluster["spec"]["workerGroupSpecs"]:  # source actors on any node open the files
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {
            "name": "kafka-tls",
            "mountPath": "/etc/calm-stream/kafka-tls",
            "readOnly": True,
        } in mounts


def test_s3_credentials_come_from_a_secret() -> None:
    docs = rendered(CHART / "ci" / "s3-values.yaml")
    for where, _, container in containers(CHART / "ci" / "s3-values.yaml"):
        if container["name"] in ("ray-head", "ray-worker", "pipeline"):
            env = {e["name"]: e for e in container["env"]}
            assert (
                env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
                == "calm-stream-s3"
            ), where
            assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000", where
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert configmap["data"]["CALM_STREAM_MODEL__REGISTRY"] == "s3://calm-stream/prod/registry"
    assert configmap["data"]["CALM_STREAM_SINKS__ROOT"] == "/data/sinks"
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]  # existingClaim


# --- the chart and the program agree


def _load(env: dict[str, str]):
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if name.startswith("CALM_STREAM_"):
                patch.setenv(name, value)
        return load_settings()


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_rendered_environment_is_what_the_settings_accept(values: Path | None) -> None:
    """Each container's environment loads into the settings model with no unknown or invalid
    variable, and every value the chart was given arrives as given."""
    docs = list(rendered(values))
    given = merged_values(values)["settings"]
    checked = 0
    for where, _, container in containers(values):
        env = container_env(container, docs)
        if not any(name.startswith("CALM_STREAM_") for name in env):
            assert container["name"] in ("seed-registry", "ray-job-submitter"), where
            continue
        try:
            settings = _load(env)
        except SettingsError as error:
            pytest.fail(f"{where}: {error}")
        for path, value in settings_leaves(given):
            if value is None:
                continue
            loaded = settings
            for part in path:
                loaded = getattr(loaded, part)
            assert loaded == value, f"{where}: {'.'.join(path)}"
        assert settings.sinks.root.startswith("/")
        if container["name"] == "pipeline":
            assert settings.ray.address == f"{POD_IP}:6379"
        checked += 1
    assert checked >= 3


def test_requests_equal_to_limits_in_other_units_render() -> None:
    docs = render(set_json={"ray.head.resources.requests": {"cpu": "2000m", "memory": "4096Mi"}})
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["requests"] == {"cpu": "2000m", "memory": "4096Mi"}


def test_large_integers_render_as_integers() -> None:
    """Helm reads numbers as floats and prints 2592000 as 2.592e+06, which the API server refuses
    for an integer field; the templates print integers."""
    month = 2_592_000
    text = render_text(
        set_json={
            "ray.autoscaling.idleTimeoutSeconds": month,
            "pipeline.drainSeconds": month,
            "training.enabled": True,
            "training.corpus": "/data/corpus",
            "training.ttlSecondsAfterFinished": month,
            "training.activeDeadlineSeconds": month,
        }
    )
    assert "e+0" not in text
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}
    assert docs["RayCluster"]["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == month
    assert docs["RayJob"]["spec"]["ttlSecondsAfterFinished"] == month
    assert docs["RayJob"]["spec"]["activeDeadlineSeconds"] == month
    assert f"sleep {month}" in text


def test_pdb_names_are_unique_and_the_head_is_drainable_by_default() -> None:
    group = chart_values()["ray"]["workerGroups"]["ingest"]
    docs = render(set_json={"podDisruptionBudget.enabled": True, "ray.workerGroups.head": group})
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert sorted(names) == [f"rel-calm-stream-worker-{g}" for g in ("head", "inference", "ingest")]
    docs = render(
        set_json={"podDisruptionBudget.enabled": True, "podDisruptionBudget.headMinAvailable": 1}
    )
    head = [d for d in docs if d["metadata"]["name"] == "rel-calm-stream-head"]
    assert [d["kind"] for d in head] == ["PodDisruptionBudget"]
    assert head[0]["spec"]["minAvailable"] == 1


def test_a_worker_group_without_ray_start_params_gets_an_empty_map() -> None:
    docs = render(set_json={"ray.workerGroups.inference.rayStartParams": None})
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert groups["inference"]["rayStartParams"] == {}
    validate_object(cluster)


def test_consistent_windows_and_pricing_render_and_load() -> None:
    """What the template's cross-field checks let through, the settings model accepts."""
    docs = render(
        set_json={
            "settings.windows.kind": "sliding",
            "settings.windows.slide_seconds": 60,
            "settings.pricing.node_type": "cpu-9",
            "settings.pricing.node_price_per_hour": {"cpu-9": 1.0},
        }
    )
    settings = _load(next(d for d in docs if d["kind"] == "ConfigMap")["data"])
    assert (settings.windows.kind, settings.windows.slide_seconds) == ("sliding", 60)
    assert settings.pricing.node_price_per_hour[settings.pricing.node_type] == 1.0


def test_a_wrong_rendered_value_is_caught() -> None:
    """The check above can fail: a value the model refuses, slipped past the schema, is reported."""
    docs = [json.loads(json.dumps(doc)) for doc in rendered(None)]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    configmap["data"]["CALM_STREAM_KAFKA__BOOTSTRAP_SERVERS"] = "no-port-here"
    configmap["data"]["CALM_STREAM_RAY__SOURCE_ACTOR"] = "2"
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    env = container_env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1], docs)
    with pytest.raises(SettingsError, match="CALM_STREAM_RAY__SOURCE_ACTOR"):
        _load(env)
    del env["CALM_STREAM_RAY__SOURCE_ACTOR"]
    with pytest.raises(SettingsError, match="bootstrap_servers"):
        _load(env)


def pod_filesystem(root: Path, spec: dict[str, Any], container: dict[str, Any], docs: Any):
    """Lay out under `root` what `container` sees at its mount points (mounted ConfigMaps as
    files, other volumes empty) and return a function mapping a container path to its local twin."""
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    mounts = [mount["mountPath"] for mount in container.get("volumeMounts", [])]
    for mount in container.get("volumeMounts", []):
        local = root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volumes[mount["name"]]:
            for key, text in configmaps[volumes[mount["name"]]["configMap"]["name"]].items():
                (local / key).write_text(text)

    def localize(arg: str) -> str:
        inside = [m for m in mounts if arg == m or arg.startswith(m.rstrip("/") + "/")]
        return f"{root}{arg}" if inside else arg

    return localize


def command_lines(values: Path | None) -> Iterator[tuple[str, list[list[str]], Any, Any]]:
    """(where, commands, pod spec, container) of every calm-stream command line the chart renders:
    container commands, and the `&&`-joined commands of a RayJob's entrypoint (run in its head)."""
    for where, spec, container in containers(values):
        argv = container.get("command", []) + container.get("args", [])
        if argv[:1] == ["calm-stream"]:
            yield where, [argv], spec, container
    for doc in rendered(values):
        if doc["kind"] == "RayJob":
            head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            commands: list[list[str]] = [[]]
            for word in shlex.split(doc["spec"]["entrypoint"]):
                if word == "&&":
                    commands.append([])
                else:
                    commands[-1].append(word)
            yield "RayJob/entrypoint", commands, head, head["containers"][0]


def parse_in_pod(commands: list[list[str]], spec: Any, container: Any, docs: Any, root: Path):
    """Parse each command as it would run in the container: paths under its mounts point at a
    local copy of them; a `train` run directory exists for the commands after it, as train
    leaves it (<storage>/<run-name>)."""
    localize = pod_filesystem(root, spec, container, docs)
    contexts = []
    for argv in commands:
        context = parse_command_line([localize(arg) for arg in argv])
        if context.info_name == "train":
            (Path(context.params["storage"]) / context.params["run_name"]).mkdir(parents=True)
        contexts.append(context)
    return contexts


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_rendered_command_lines_parse_with_the_real_cli(values: Path | None, tmp_path: Path):
    lines = list(command_lines(values))
    assert [where for where, *_ in lines if where.endswith("/pipeline")]  # the driver is there
    for index, (where, commands, spec, container) in enumerate(lines):
        try:
            parse_in_pod(commands, spec, container, rendered(values), tmp_path / str(index))
        except CommandLineError as error:
            pytest.fail(f"{where}: {error}")


def test_training_job_trains_then_publishes_where_the_pipeline_reads(tmp_path: Path) -> None:
    from pipeline.training.stages import load_train_config

    docs = rendered(TRAINING)
    commands, spec, container = next(
        line[1:] for line in command_lines(TRAINING) if line[0].startswith("RayJob")
    )
    train, export = parse_in_pod(commands, spec, container, docs, tmp_path)
    given = merged_values(TRAINING)["training"]
    assert (train.info_name, export.info_name) == ("train", "export")
    assert train.params["workers"] == given["workers"] == 2
    assert train.params["corpus"] == f"{tmp_path}{given['corpus']}"  # on the volume
    assert list(train.params["stage"]) == given["stages"]
    # The recipe the job mounts is the one in the values, and the program accepts it.
    assert yaml.safe_load(train.params["config"].read_text()) == given["config"]
    load_train_config(train.params["config"], list(train.params["set_"]))
    # export publishes the run train wrote, into the registry the pipeline reads.
    assert export.params["checkpoint"] == Path(train.params["storage"]) / train.params["run_name"]
    settings = next(
        d for d in docs if d["kind"] == "ConfigMap" and "CALM_STREAM_MODEL__REGISTRY" in d["data"]
    )
    assert export.params["out"] == f"{tmp_path}{settings['data']['CALM_STREAM_MODEL__REGISTRY']}"
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


TRAIN_EXTRA_ONLY = ("torch", "onnx", "safetensors", "matplotlib", "pandas")
BLOCKER = f"""
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in {TRAIN_EXTRA_ONLY!r}:
            raise ImportError(f"{{name}} is not in the runtime image")

sys.meta_path.insert(0, Blocked())
"""


def test_the_runtime_image_runs_the_rendered_driver_command() -> None:
    """The runtime image has the package without its `train` extra (no torch, onnx, safetensors,
    matplotlib, nor Ray Data's pandas): the CLI must load and parse the driver's command there."""
    (argv,) = [line[1][0] for line in command_lines(None) if line[0].endswith("/pipeline")]
    code = BLOCKER + (
        "try:\n    import torch\nexcept ImportError:\n    pass\n"
        "else:\n    sys.exit('the blocker did not block torch')\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helm_render import parse_command_line\n"
        f"print(parse_command_line({argv!r}).info_name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False, cwd=CHART.parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "run"


def test_a_bad_command_line_is_caught() -> None:
    with pytest.raises(CommandLineError, match="--no-such-flag"):
        parse_command_line(["calm-stream", "settings", "--no-such-flag"])
    with pytest.raises(CommandLineError, match="no-such-command"):
        parse_command_line(["calm-stream", "no-such-command"])
    assert parse_command_line(
        ["calm-stream", "--set", "ray.source_actors=2", "settings", "--json"]
    ).params == {"as_json": True}


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_notes_name_what_the_chart_renders(values: Path | None, tmp_path: Path) -> None:
    """Every object, Service, label selector and container NOTES.txt tells the user to look at is
    one the chart renders (or, for <cluster>-head-svc, that KubeRay creates for its RayCluster)."""
    docs = rendered(values)
    notes = render_notes(values, tmp_path)
    names = {(d["kind"].lower(), d["metadata"]["name"]) for d in docs}
    services = {name for kind, name in names if kind == "service"}
    services |= {f"{name}-head-svc" for kind, name in names if kind == "raycluster"}
    commands = [line for line in notes.splitlines() if "kubectl -n streaming" in line]
    assert len(commands) >= 4
    for kind, name in re.findall(r"kubectl -n streaming get (\w+) (\S+)", notes):
        assert (kind, name) in names
    for name in re.findall(r"\bsvc/(\S+)", notes):
        assert name in services
    for selector, container in re.findall(r"logs -f -l (\S+) -c (\S+)", notes):
        wanted = dict(pair.split("=") for pair in selector.split(","))
        assert [
            where
            for doc in docs
            for where, template in pod_templates(doc)
            if wanted.items() <= template["metadata"]["labels"].items()
            and container in {c["name"] for c in template["spec"]["containers"]}
        ], selector
    assert ("RayJob" in notes) == any(d["kind"] == "RayJob" for d in docs)
    settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert settings["CALM_STREAM_MODEL__REGISTRY"] in notes
    assert settings["CALM_STREAM_SINKS__ROOT"] in notes


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_torch_only_where_training_runs(values: Path | None) -> None:
    """The trainer image (torch) runs the training job's Ray nodes; everything else, the job's
    `ray job submit` pod included, runs the runtime image."""
    given = merged_values(values)["images"]
    for where, _, container in containers(values):
        trains = where.startswith("RayJob/") and not where.startswith("RayJob/submitter/")
        repository = given["trainer" if trains else "runtime"]["repository"]
        assert container["image"].startswith(repository + ":"), where


def test_images_are_built_as_the_chart_runs_them() -> None:
    """The Dockerfiles pin the base image, install the Ray the chart declares, run as the user the
    pod security context names, copy only what .dockerignore lets into the context, and the
    runtime image leaves out the train extra (torch)."""
    import tomllib

    values = chart_values()
    images = CHART.parents[1] / "deploy" / "images"
    rules = (CHART.parents[1] / ".dockerignore").read_text().splitlines()
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    excluded = [rule.rstrip("/") for rule in rules if rule[:1] not in ("", "#", "!", "*")]

    def under(path: str, roots: list[str]) -> bool:
        return any(path == root or path.startswith(root + "/") for root in roots)

    security = values["podSecurityContext"]
    for name in ("Dockerfile.runtime", "Dockerfile.trainer"):
        text = (images / name).read_text()
        assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.MULTILINE), (
            name
        )
        assert f"ARG RAY_VERSION={values['ray']['version']}" in text, name
        assert f"USER {security['runAsUser']}:{security['runAsGroup']}" in text, name
        for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
            path = source.rstrip("/")
            assert under(path, allowed) and not under(path, excluded), f"{name}: COPY {source}"
        assert ('".[train]"' in text) == (name == "Dockerfile.trainer"), name
    project = tomllib.loads((CHART.parents[1] / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]  # the images' default tag


def test_large_numbers_render_as_integers() -> None:
    configmap = next(
        d
        for d in rendered(TRAINING)
        if d["kind"] == "ConfigMap" and "CALM_STREAM_SINKS__ROOT" in d["data"]
    )
    assert configmap["data"]["CALM_STREAM_SINKS__ROTATE_ROWS"] == "1000000"  # not 1e+06


# --- smoke: the rendered driver against a real broker and a real local Ray

DRIVER = """
import sys
from pipeline.cli.app import app
try:
    app(prog_name="calm-stream")
finally:
    # The runtime image has no torch: the driver must never need it.
    sys.stderr.write(f"\\ntorch imported: {'torch' in sys.modules}\\n")
"""


def test_rendered_pipeline_runs_against_the_test_broker(
    kafka_broker: Any, topic_factory: Any, ray_local: None, tmp_path: Path
) -> None:
    """The rendered driver command with the rendered environment, pointed at the test broker and a
    local Ray (the pod IP's place), reads simulated events and leaves results in the sink."""
    import itertools

    import pyarrow.dataset as ds
    import ray
    from support import build_registry

    from pipeline.sim.producer import TopicWriter, produce
    from pipeline.sim.simulator import simulate

    iot, transactions = topic_factory(1), topic_factory(1)
    client = {"bootstrap_servers": kafka_broker.bootstrap_servers}
    produce(
        itertools.islice(simulate("iot", seed=3, entities=4).messages(), 120),
        TopicWriter(iot, client),
    )
    produce(
        itertools.islice(simulate("transactions", seed=3, entities=4).messages(), 40),
        TopicWriter(transactions, client),
    )
    registry = build_registry(tmp_path / "bundles")
    docs = render(
        set_json={
            "settings.kafka.bootstrap_servers": [kafka_broker.bootstrap_servers],
            "settings.kafka.topics": {
                "iot": iot,
                "transactions": transactions,
                "dlq": f"{iot}-dlq",
                "late": f"{iot}-late",
            },
            "settings.kafka.group_id": f"{iot}-group",
            "settings.model.registry": str(registry),
            "settings.model.max_new_tokens": 8,
            "settings.ray.inference_actor_cpus": 0.5,
            "settings.metrics.port": 0,
            "storage.mountPath": str(tmp_path / "data"),
            "pipeline.extraArgs": ["--until-idle", "3"],
        }
    )
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    driver = next(
        c
        for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        if c["name"] == "pipeline"
    )
    argv = driver["command"] + driver["args"]
    env = container_env(driver, docs)
    assert env["CALM_STREAM_RAY__ADDRESS"] == f"{POD_IP}:6379"
    env["CALM_STREAM_RAY__ADDRESS"] = ray.get_runtime_context().gcs_address  # the head, here
    base = {k: v for k, v in os.environ.items() if not k.startswith("CALM_STREAM_")}
    calm = {k: v for k, v in env.items() if k.startswith("CALM_STREAM_")}

    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *argv[1:]],
        env=base | calm,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert "torch imported: False" in result.stderr
    results = ds.dataset(
        tmp_path / "data" / "sinks" / "results", format="parquet", partitioning="hive"
    ).to_table()
    assert results.num_rows > 0
    keys = results.column("key").to_pylist()
    assert len(keys) == len(set(keys))
    assert (
        ds.dataset(
            tmp_path / "data" / "sinks" / "telemetry", format="parquet", partitioning="hive"
        ).count_rows()
        > 0
    )
