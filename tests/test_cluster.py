"""The deployment files in cluster/, checked offline: KubeRay manifests against the CRD schemas (unknown fields
rejected), the cluster-launcher configs against the ray-schema.json inside the ray wheel, mutated copies that
must fail, and cross-checks against the code (pinned Ray version, entrypoint flags, the Serve config, shared
storage, the Dockerfile). No Kubernetes, Docker or Ray cluster needed; the placement test on a simulated Ray
cluster is tests/test_cluster_dryrun.py.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# The KubeRay CRDs' openAPIV3Schemas, vendored and trimmed (tests/data/kuberay-crds/README.md: version, source)
CRD_DIR = ROOT / "tests" / "data" / "kuberay-crds"
MANIFESTS = {
    "rayjob": CLUSTER / "kuberay" / "rayjob-finetune.yaml",
    "rayservice": CLUSTER / "kuberay" / "rayservice.yaml",
    "raycluster": CLUSTER / "kuberay" / "raycluster.yaml",
}
CRD_FILES = {"RayJob": "RayJob.json", "RayService": "RayService.json", "RayCluster": "RayCluster.json"}
VM_CONFIGS = [CLUSTER / "vm" / "cluster.yaml", CLUSTER / "vm" / "local.yaml"]
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
SHARED_PVC = CLUSTER / "kuberay" / "shared-storage.yaml"
SERVE_OVERLAY = CLUSTER / "kuberay" / "serve-overlay.yaml"
NETWORK_POLICY = CLUSTER / "kuberay" / "network-policy.yaml"
ENTRYPOINT = "cluster/kuberay/finetune_or_resume.py"  # the RayJob's: jobs/finetune.py, resuming on a retry
# One Ray token (Secret) per side: whoever holds the training clusters' token must not control the service.
RAY_TOKEN_SECRET = {
    "RayJob": "scoreaction-ray-token",
    "RayCluster": "scoreaction-ray-token",
    "RayService": "scoreaction-serve-ray-token",
}


# --------------------------------------------------------------------------------------------------
# Helpers: loading, strict schemas, walking pod templates
# --------------------------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def pinned_ray() -> str:
    """The exact Ray version of constraints.txt (what `make venv` and the image install)."""
    m = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert m, "constraints.txt pins no ray==X.Y.Z"
    return m.group(1)


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects unknown fields: every object schema that lists properties
    (and does not preserve unknown fields) gets additionalProperties: false, recursively."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_SCHEMAS: dict[tuple[str, str], dict] = {}


def crd_schema(kind: str, version: str) -> dict:
    """The strict openAPIV3Schema of one version of a KubeRay CRD (vendored: tests/data/kuberay-crds/)."""
    key = (kind, version)
    if key not in _SCHEMAS:
        crd = json.loads((CRD_DIR / CRD_FILES[kind]).read_text())
        assert crd["kind"] == kind and crd["group"] == "ray.io"
        versions = crd["versions"]
        assert version not in crd["notVendored"], (
            f"{kind} {version} is served by KubeRay but not vendored; use v1 (or re-run trim.py --keep {version})"
        )
        assert version in versions, f"{kind} has no version {version!r}; the CRD serves {sorted(versions)}"
        assert versions[version]["served"], f"{kind} {version} is not served"
        _SCHEMAS[key] = strict(versions[version]["openAPIV3Schema"])
    return _SCHEMAS[key]


def crd_errors(manifest: dict) -> list[str]:
    """Schema errors of a KubeRay manifest (empty when valid), as 'path: message'."""
    group, _, version = manifest.get("apiVersion", "").partition("/")
    assert group == "ray.io", f"apiVersion {manifest.get('apiVersion')!r} is not ray.io/..."
    validator = jsonschema.Draft7Validator(crd_schema(manifest["kind"], version))
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]
    name = manifest.get("metadata", {}).get("name", "")
    # the CRD leaves metadata to the API server: check what it would (a DNS-1123 name)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    return errors


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
        manifest["kind"], spec
    )


def pod_templates(manifest: dict) -> list[tuple[str, dict]]:
    """(name, pod template) of every pod the manifest makes: head, worker groups, the RayJob's submitter."""
    cs = cluster_spec(manifest)
    out = [("head", cs["headGroupSpec"]["template"])]
    out += [(f"worker {g['groupName']}", g["template"]) for g in cs.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in manifest["spec"]:
        out.append(("submitter", manifest["spec"]["submitterPodTemplate"]))
    return out


def containers(manifest: dict) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) of every container, the autoscaler sidecar included."""
    out = []
    for where, tpl in pod_templates(manifest):
        spec = tpl["spec"]
        out += [
            (f"{where}/{c['name']}", c, spec)
            for c in spec.get("containers", []) + spec.get("initContainers", [])
        ]
    auto = cluster_spec(manifest).get("autoscalerOptions")
    if cluster_spec(manifest).get("enableInTreeAutoscaling"):
        assert auto, "enableInTreeAutoscaling without autoscalerOptions: the sidecar gets no limits"
        out.append(("autoscaler", auto, cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]))
    return out


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPUs, or bytes for memory)."""
    s = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


KINDS = {"rayjob": "RayJob", "rayservice": "RayService", "raycluster": "RayCluster"}


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request) -> dict:
    return load(MANIFESTS[request.param])


# --------------------------------------------------------------------------------------------------
# Schema validation and mutations
# --------------------------------------------------------------------------------------------------


def test_strict_schema_rejects_unknown_fields_but_keeps_maps():
    schema = strict(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    ok = {"a": {"b": "x"}, "labels": {"any": "thing"}, "free": {"anything": 1}}
    assert jsonschema.Draft7Validator(schema).is_valid(ok)
    assert not jsonschema.Draft7Validator(schema).is_valid({**ok, "typo": 1})
    assert not jsonschema.Draft7Validator(schema).is_valid({**ok, "a": {"b": "x", "c": 1}})


def test_pod_templates_are_fully_specified_in_the_crds():
    """Unknown-field rejection reaches into containers only if the CRD spells the pod template out."""
    for kind in CRD_FILES:
        schema = crd_schema(kind, "v1")["properties"]["spec"]
        cs = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(kind)
        if cs:
            schema = schema["properties"][cs]
        container = schema["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"][
            "properties"
        ]["containers"]["items"]
        assert container.get("additionalProperties") is False and "securityContext" in container["properties"]


def test_manifests_validate_against_the_kuberay_crds(manifest):
    assert manifest["apiVersion"] == "ray.io/v1"  # the served storage version; v1alpha1 is deprecated
    assert crd_errors(manifest) == []


# (description, path to the parent, key, new value or DELETE): one wrong type, one missing required field
# and one unknown field per kind, at the spec level and inside the pod template.
DELETE = object()
MUTATIONS = {
    "RayJob": [
        ("wrong type: shutdownAfterJobFinishes", ["spec"], "shutdownAfterJobFinishes", "yes"),
        ("wrong type: ttlSecondsAfterFinished", ["spec"], "ttlSecondsAfterFinished", "600"),
        (
            "wrong type: rayStartParams value",
            ["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams"],
            "num-cpus",
            0,
        ),
        ("missing required: headGroupSpec", ["spec", "rayClusterSpec"], "headGroupSpec", DELETE),
        (
            "missing required: groupName",
            ["spec", "rayClusterSpec", "workerGroupSpecs", 0],
            "groupName",
            DELETE,
        ),
        ("unknown field: ttlSecondsAfterFinish", ["spec"], "ttlSecondsAfterFinish", 600),
        (
            "unknown field in a container",
            ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0],
            "imagePullPolicyy",
            "Always",
        ),
        ("bad enum: authOptions.mode", ["spec", "rayClusterSpec", "authOptions"], "mode", "password"),
    ],
    "RayService": [
        ("wrong type: serveConfigV2", ["spec"], "serveConfigV2", {"applications": []}),
        ("wrong type: maxReplicas", ["spec", "rayClusterConfig", "workerGroupSpecs", 0], "maxReplicas", "4"),
        ("missing required: rayClusterConfig", ["spec"], "rayClusterConfig", DELETE),
        ("missing required: template", ["spec", "rayClusterConfig", "headGroupSpec"], "template", DELETE),
        ("unknown field: upgradeStrategy.kind", ["spec", "upgradeStrategy"], "kind", "NewCluster"),
        (
            "unknown field in securityContext",
            [
                "spec",
                "rayClusterConfig",
                "headGroupSpec",
                "template",
                "spec",
                "containers",
                0,
                "securityContext",
            ],
            "readOnlyRootFS",
            True,
        ),
    ],
    "RayCluster": [
        ("wrong type: enableInTreeAutoscaling", ["spec"], "enableInTreeAutoscaling", "true"),
        (
            "wrong type: container ports",
            ["spec", "headGroupSpec", "template", "spec", "containers", 0],
            "ports",
            8265,
        ),
        ("missing required: minReplicas", ["spec", "workerGroupSpecs", 0], "minReplicas", DELETE),
        ("missing required: containers", ["spec", "headGroupSpec", "template", "spec"], "containers", DELETE),
        ("unknown field: headGroupSpec.replicas", ["spec", "headGroupSpec"], "replicas", 1),
        ("unknown field: spec.autoscaling", ["spec"], "autoscaling", True),
    ],
}


@pytest.mark.parametrize(
    "name,case",
    [(n, c) for n in sorted(MANIFESTS) for c in MUTATIONS[load(MANIFESTS[n])["kind"]]],
    ids=lambda x: x if isinstance(x, str) else x[0],
)
def test_a_mutated_manifest_fails(name, case):
    description, path, key, value = case
    bad = copy.deepcopy(load(MANIFESTS[name]))
    parent = bad
    for step in path:
        parent = parent[step]
    if value is DELETE:
        assert key in parent, f"{description}: the manifest has no {key!r} to delete"
        del parent[key]
    else:
        parent[key] = value
    errors = crd_errors(bad)
    assert errors, f"{description}: the mutated {name} manifest still validates"
    # for the right reason: each error names the mutated field (YAML aliases can repeat it in several places)
    assert all(key in e for e in errors), errors


def test_a_wrong_api_version_fails():
    m = load(MANIFESTS["raycluster"])
    m["apiVersion"] = "ray.io/v2"
    with pytest.raises(AssertionError, match="no version 'v2'"):
        crd_errors(m)


# --------------------------------------------------------------------------------------------------
# Security: token auth, nothing exposed, non-root, read-only root filesystem, requests and limits
# --------------------------------------------------------------------------------------------------


def test_token_auth_and_nothing_exposed_outside(manifest):
    cs = cluster_spec(manifest)
    assert cs["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET[manifest["kind"]]}
    head = cs["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP" and head.get("enableIngress") is False
    if manifest["kind"] == "RayService":
        svc = manifest["spec"]["serveService"]["spec"]
        assert svc["type"] == "ClusterIP"
        assert [p["port"] for p in svc["ports"]] == [8000]  # the Serve HTTP port only, never 8265
    text = json.dumps(manifest)
    assert "LoadBalancer" not in text and "NodePort" not in text


def test_the_service_and_the_training_clusters_have_separate_ray_tokens():
    secrets = {
        kind: cluster_spec(load(MANIFESTS[n]))["authOptions"]["secretName"] for n, kind in KINDS.items()
    }
    assert secrets == RAY_TOKEN_SECRET
    assert secrets["RayService"] not in (secrets["RayJob"], secrets["RayCluster"])
    # the submitter (outside the Ray cluster, so KubeRay does not inject the token) uses the job's own Secret
    job = load(MANIFESTS["rayjob"])
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in submitter["env"] if "valueFrom" in e}
    assert refs["RAY_AUTH_TOKEN"] == {"name": RAY_TOKEN_SECRET["RayJob"], "key": "auth_token"}
    # and every place that tells the reader how to make a Secret or fetch a token names the right one
    for name in ("rayservice", "rayjob", "raycluster"):
        text = MANIFESTS[name].read_text()
        other = {"rayservice": "scoreaction-ray-token"}.get(name, "scoreaction-serve-ray-token")
        assert not re.search(rf"(secret generic|get secret) {other}\b", text), (name, other)


def api_key_env() -> str:
    from serve.settings import API_KEY_ENV

    return API_KEY_ENV


def test_the_api_key_comes_from_a_secret_through_the_env_never_from_serve_config():
    """Serve's REST API (GET /api/serve/applications/) and the RayService's status show serveConfigV2: the key
    must not be there. Every container of the service that can host a replica gets it from the Secret."""
    svc = load(MANIFESTS["rayservice"])
    key_env = api_key_env()  # what serve/web.py reads at each request
    for where, c, _ in containers(svc):
        if where == "autoscaler":
            continue
        (entry,) = [e for e in c.get("env", []) if e["name"] == key_env]
        assert "value" not in entry, f"{where}: {key_env} written into the manifest"
        assert entry["valueFrom"] == {"secretKeyRef": {"name": "scoreaction-api-key", "key": "api_key"}}, (
            where
        )
    serve_config = svc["spec"]["serveConfigV2"]
    assert key_env not in serve_config and "api_key" not in serve_config.lower()
    assert "runtime_env" not in serve_config  # nor any other environment variable by that route
    # the training side never holds the serving key
    for name in ("rayjob", "raycluster"):
        assert key_env not in json.dumps(load(MANIFESTS[name])), name


# --------------------------------------------------------------------------------------------------
# NetworkPolicy (a core Kubernetes kind: its structure is checked here, then what it admits)
# --------------------------------------------------------------------------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_PEER = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "podSelector": _SELECTOR,
        "namespaceSelector": _SELECTOR,
        "ipBlock": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cidr"],
            "properties": {
                "cidr": {"type": "string"},
                "except": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}
_PORT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        "port": {"type": ["integer", "string"]},
        "endPort": {"type": "integer"},
    },
}
_RULE = {"type": "array", "items": {"type": "object", "additionalProperties": False}}
# networking.k8s.io/v1 NetworkPolicy, as the API server's OpenAPI schema has it (what these manifests use)
NETWORK_POLICY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["podSelector"],
            "properties": {
                "podSelector": _SELECTOR,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "from": {"type": "array", "items": _PEER},
                            "ports": {"type": "array", "items": _PORT},
                        },
                    },
                },
                "egress": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "to": {"type": "array", "items": _PEER},
                            "ports": {"type": "array", "items": _PORT},
                        },
                    },
                },
            },
        },
    },
}


def network_policies() -> list[dict]:
    return [d for d in yaml.safe_load_all(NETWORK_POLICY.read_text()) if d]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": has and value in e.get("values", []),
            "NotIn": not has or value not in e.get("values", []),
            "Exists": has,
            "DoesNotExist": not has,
        }[e["operator"]]
        if not ok:
            return False
    return True


def admitted(policies: list[dict], pod: dict, source: dict, port: int) -> bool:
    """Whether `source` ({"labels", "namespace"}; None for a client outside the cluster) may open a TCP
    connection to `port` of `pod` ({"labels"}, in the namespace "ns") under the ingress policies."""
    applying = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], pod["labels"])
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applying:
        return True  # no policy selects the pod: Kubernetes admits everything
    for p in applying:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(
                x.get("protocol", "TCP") == "TCP" and x.get("port") in (None, port) for x in ports
            ):
                continue
            peers = rule.get("from")
            if peers is None:
                return True  # any source
            for peer in peers:
                if source is None or "ipBlock" in peer:
                    continue  # outside clients only through ipBlock, which these policies never use
                ns_ok = (
                    selects(peer["namespaceSelector"], source["namespace_labels"])
                    if "namespaceSelector" in peer
                    else source["namespace"] == "ns"
                )
                if ns_ok and selects(peer.get("podSelector", {}), source["labels"]):
                    return True
    return False


def scoreaction_pods() -> dict[str, dict]:
    """Every pod the three manifests make, by '<manifest> <pod>', with its labels (namespace "ns")."""
    return {
        f"{name} {where}": {"labels": tpl["metadata"]["labels"]}
        for name in sorted(MANIFESTS)
        for where, tpl in pod_templates(load(MANIFESTS[name]))
    }


def pod_source(pod: dict) -> dict:
    return {
        "labels": pod["labels"],
        "namespace": "ns",
        "namespace_labels": {"kubernetes.io/metadata.name": "ns"},
    }


OPERATOR = {
    "labels": {"app.kubernetes.io/name": "kuberay-operator"},
    "namespace": "kuberay-system",
    "namespace_labels": {"kubernetes.io/metadata.name": "kuberay-system"},
}
# Ray's ports: GCS, dashboard, client, metrics, dashboard agent, a worker port, object manager; and Serve's
RAY_PORTS = [6379, 8265, 10001, 8080, 52365, 10002, 8076]
SERVE_PORT = 8000


def test_network_policies_are_well_formed():
    policies = network_policies()
    assert len(policies) >= 3
    for p in policies:
        jsonschema.validate(p, NETWORK_POLICY_SCHEMA)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", p["metadata"]["name"]), p["metadata"]["name"]
        assert p["spec"]["policyTypes"] == ["Ingress"]  # egress stays open (DNS, image pulls, the API server)
    assert len({p["metadata"]["name"] for p in policies}) == len(policies)
    # a default deny for every scoreaction pod: nothing is admitted that a rule does not name
    assert any(
        p["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "scoreaction"}}
        and not p["spec"]["ingress"]
        for p in policies
    )
    # the schema has teeth
    bad = copy.deepcopy(policies[1])
    bad["spec"]["ingress"][0]["form"] = bad["spec"]["ingress"][0].pop("from")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, NETWORK_POLICY_SCHEMA)


def test_selector_and_admission_semantics():
    assert selects({}, {"a": "b"}) and selects({"matchLabels": {"a": "b"}}, {"a": "b", "c": "d"})
    assert not selects({"matchLabels": {"a": "b"}}, {"a": "c"})
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x", "y"]}]}, {"a": "y"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {})
    open_8000 = {
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 8000}]}]}
    }
    pod = {"labels": {"x": "y"}}
    assert admitted([open_8000], pod, None, 8000) and not admitted([open_8000], pod, None, 8265)
    assert admitted([], pod, None, 8265)  # unselected pods are open: hence the default deny


def test_network_policy_admits_only_the_serve_port_from_outside():
    policies = network_policies()
    pods = scoreaction_pods()
    # rayjob: head, workers, submitter; rayservice: head, workers; raycluster: head, workers
    assert len(pods) == 7, sorted(pods)
    stranger = {"labels": {"app": "something-else"}, "namespace": "other", "namespace_labels": {}}
    neighbour = {"labels": {"app": "something-else"}, "namespace": "ns", "namespace_labels": {}}
    for where, pod in pods.items():
        assert any(selects(p["spec"]["podSelector"], pod["labels"]) for p in policies), f"{where}: no policy"
        serving = pod["labels"].get("app.kubernetes.io/instance") == "scoreaction-serve"
        for source in (None, stranger, neighbour):
            # the serve port of the service's pods, and nothing else, from outside the Ray clusters
            assert admitted(policies, pod, source, SERVE_PORT) == serving, (where, source)
            for port in RAY_PORTS:
                assert not admitted(policies, pod, source, port), (where, port, source)


def test_network_policy_keeps_each_ray_cluster_to_itself():
    policies = network_policies()
    pods = scoreaction_pods()
    for to_where, to_pod in pods.items():
        for from_where, from_pod in pods.items():
            same = (
                to_pod["labels"]["app.kubernetes.io/instance"]
                == from_pod["labels"]["app.kubernetes.io/instance"]
            )
            for port in RAY_PORTS:
                # Ray needs every port between the pods of one cluster (the submitter -> the head's 8265
                # included), and no cluster reaches another's GCS, dashboard or workers
                assert admitted(policies, to_pod, pod_source(from_pod), port) == same, (
                    from_where,
                    to_where,
                    port,
                )
    # the training clusters are one instance each, the service another: the RayJob's pods share one
    instances = {where.split()[0]: pod["labels"]["app.kubernetes.io/instance"] for where, pod in pods.items()}
    assert len(set(instances.values())) == 3


def test_network_policy_lets_the_kuberay_operator_reach_the_heads_dashboard_only():
    policies = network_policies()
    for where, pod in scoreaction_pods().items():
        head = where.endswith(" head")
        assert admitted(policies, pod, OPERATOR, 8265) == head, where
        assert not admitted(policies, pod, OPERATOR, 6379), where
    # a pod without the operator's label is not let in, even in the operator's namespace
    impostor = {"labels": {"app": "x"}, "namespace": "kuberay-system", "namespace_labels": {}}
    assert not any(admitted(policies, pod, impostor, 8265) for pod in scoreaction_pods().values())


def test_a_network_policy_opening_the_dashboard_fails_the_check():
    policies = network_policies() + [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "oops"},
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "scoreaction"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"port": 8265}]}],
            },
        }
    ]
    pods = scoreaction_pods()
    assert any(admitted(policies, pod, None, 8265) for pod in pods.values())


def test_every_container_is_non_root_read_only_and_limited(manifest):
    for where, c, pod in containers(manifest):
        ctx, pod_ctx = c.get("securityContext", {}), pod.get("securityContext", {})
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert pod_ctx.get("runAsUser", 0) != 0, where
        res = c.get("resources", {})
        for key in ("cpu", "memory"):
            req, lim = res.get("requests", {}).get(key), res.get("limits", {}).get(key)
            assert req is not None and lim is not None, f"{where}: {key} request and limit are required"
            assert quantity(req) <= quantity(lim), where
        if "nvidia.com/gpu" in res.get("limits", {}):
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], where


def test_ray_containers_write_only_to_mounted_volumes(manifest):
    """A read-only root needs emptyDirs where Ray writes: /tmp (session dir /tmp/ray) and /dev/shm in memory."""
    for where, tpl in pod_templates(manifest):
        spec = tpl["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            if where == "submitter":
                continue
            shm = volumes[mounts["/dev/shm"]]
            assert shm["emptyDir"].get("medium") == "Memory" and "sizeLimit" in shm["emptyDir"], where
            assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == "scoreaction-shared"
    auto = cluster_spec(manifest)["autoscalerOptions"]
    head_volumes = {v["name"] for v in cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in auto["volumeMounts"]} <= head_volumes


def test_head_runs_no_actors_and_gpu_workers_autoscale(manifest):
    cs = cluster_spec(manifest)
    assert cs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cs["enableInTreeAutoscaling"] is True
    groups = cs["workerGroupSpecs"]
    assert groups, "no worker group"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g[
            "groupName"
        ]
        assert g["minReplicas"] < g["maxReplicas"], f"{g['groupName']}: no room to autoscale"
        (c,) = g["template"]["spec"]["containers"]
        assert quantity(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, g["groupName"]


# --------------------------------------------------------------------------------------------------
# Cross-checks against the code
# --------------------------------------------------------------------------------------------------


def image_tag() -> str:
    m = re.search(r"^FROM rayproject/ray:(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, "the Dockerfile's FROM is not rayproject/ray:<tag>"
    return m.group(1)


def test_ray_version_agrees_everywhere(manifest):
    """constraints.txt's pin = the installed ray = the Dockerfile's base image = rayVersion = every image tag."""
    version = pinned_ray()
    assert ray.__version__ == version
    assert image_tag().startswith(f"{version}-"), image_tag()
    assert cluster_spec(manifest)["rayVersion"] == version
    for where, c, _ in containers(manifest):
        if "image" in c:  # the autoscaler defaults to the head's image
            assert c["image"].endswith(f"-ray{version}-py311-gpu"), (where, c["image"])
    for cfg in VM_CONFIGS:
        assert load(cfg)["docker"]["image"].endswith(f"-ray{version}-py311-gpu"), cfg


def test_dockerfile_python_matches_the_project():
    requires = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert requires
    py = re.search(r"-py3(\d+)-", image_tag().replace("${RAY_VARIANT}", "py311-gpu") + "-")
    assert py and int(py.group(1)) >= int(requires.group(1))


def entrypoint_args(manifest: dict) -> list[str]:
    """The arguments of jobs/finetune.py in the RayJob's entrypoint (`python ENTRYPOINT ARGS`)."""
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["python", ENTRYPOINT], argv
    return argv[2:]


def test_rayjob_entrypoint_names_existing_files_and_its_flags_parse():
    import jobs.finetune as finetune

    job = load(MANIFESTS["rayjob"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert (ROOT / argv[1]).is_file()
    args = finetune.parse_args(entrypoint_args(job) + ["--dry-run"])
    assert args.dry_run and not args.single_process and not args.resume
    assert (ROOT / args.config).is_file(), args.config
    cfg = job_config()
    assert cfg.run.output_dir == args.output_dir and Path(args.output_dir).is_absolute()


def job_config():
    from scoreaction.config import build_config

    args = entrypoint_args(load(MANIFESTS["rayjob"]))
    import jobs.finetune as finetune

    ns = finetune.parse_args(args)
    overrides = [*ns.overrides, f"run.output_dir={ns.output_dir}"]
    return build_config(ns.preset, ROOT / ns.config, overrides)


def test_rayjob_lifecycle_fields():
    spec = load(MANIFESTS["rayjob"])["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["activeDeadlineSeconds"] > 0
    # a failed Ray job is retried (KubeRay: a new Ray cluster, the same entrypoint), and the entrypoint resumes
    assert spec["backoffLimit"] >= 1
    assert "--resume" not in shlex.split(spec["entrypoint"])  # added per attempt, when there is a checkpoint
    assert shlex.split(spec["entrypoint"])[:2] == ["python", ENTRYPOINT]


def entrypoint_wrapper():
    """cluster/kuberay/finetune_or_resume.py as a module (it is a script in the image, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_or_resume", ROOT / ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("storage", ["output-dir", "storage_path"])
def test_rayjob_entrypoint_starts_a_new_run_and_resumes_when_there_are_checkpoints(
    tmp_path, storage, tiny_policy
):
    """First attempt: no checkpoint, no --resume (jobs/finetune.py refuses to resume from nothing). A retry
    after a checkpoint: --resume (a plain start would refuse to overwrite it). Decided in the folder where the
    run's checkpoints are, also when run.storage_path puts them elsewhere (as cluster/configs/sd15-lora.yaml
    does). The checkpoint is a real one, written by the library."""
    from scoreaction.checkpoint import save_checkpoint
    from scoreaction.distributed.driver import check_run_dir

    wrapper = entrypoint_wrapper()
    out = tmp_path / "runs" / "my-run"
    argv = ["--preset", "tiny", "--output-dir", str(out)]
    if storage == "storage_path":
        argv += ["--set", f"run.storage_path={tmp_path / 'storage'}"]
    cfg = wrapper.build_config("tiny", None, argv[4:][1::2], {"run.output_dir": str(out)})
    checkpoint_dir = wrapper.checkpoint_dir_for(cfg, out)
    if storage == "storage_path":
        assert checkpoint_dir.is_relative_to(tmp_path / "storage")

    # attempt 1: an empty folder starts the run, and jobs/finetune.py's own check agrees that it may
    assert wrapper.with_resume(argv) == argv
    assert check_run_dir(cfg, checkpoint_dir, resume=False) is None
    # attempt 2, after a checkpoint: resume, since starting over would be refused
    step = save_checkpoint(tiny_policy, checkpoint_dir / "step_000001", step=1)
    (checkpoint_dir / "latest").write_text(step.name + "\n")
    assert wrapper.with_resume(argv) == [*argv, "--resume"]
    assert "already holds" in wrapper.refusal_to_start(argv)
    # what needs no decision passes through unchanged
    for extra in (["--dry-run"], ["--resume"], ["--single-process"]):
        assert wrapper.with_resume(argv + extra) == argv + extra
    # a config jobs/finetune.py rejects is left to it (its message, its exit code)
    bad = [*argv, "--set", "run.epochs=-1"]
    assert wrapper.with_resume(bad) == bad


def test_rayjob_entrypoint_passes_everything_else_to_jobs_finetune(monkeypatch):
    wrapper = entrypoint_wrapper()
    seen = []
    monkeypatch.setattr(wrapper.finetune, "main", lambda argv: seen.append(argv) or 7)
    monkeypatch.setattr(wrapper, "refusal_to_start", lambda argv: "holds step_000004")
    assert wrapper.main(["--preset", "tiny", "--output-dir", "/x"]) == 7  # its exit code
    assert seen == [["--preset", "tiny", "--output-dir", "/x", "--resume"]]


def merge_overlay(base: Any, overlay: Any) -> Any:
    """serve-overlay.yaml's rules: maps merge by key, lists of named items by name, null deletes a key."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = copy.deepcopy(base)
        for k, v in overlay.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge_overlay(out.get(k), v)
        return out
    if isinstance(base, list) and isinstance(overlay, list) and all("name" in x for x in overlay):
        out = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in overlay:
            if item["name"] in index:
                out[index[item["name"]]] = merge_overlay(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(overlay)


def test_merge_overlay_rules():
    base = {"a": 1, "apps": [{"name": "x", "n": 1, "d": [{"name": "m", "k": 1}]}], "h": {"host": "l", "p": 8}}
    over = {"a": None, "apps": [{"name": "x", "d": [{"name": "m", "k": 2, "z": 3}]}], "h": {"host": "0"}}
    assert merge_overlay(base, over) == {
        "apps": [{"name": "x", "n": 1, "d": [{"name": "m", "k": 2, "z": 3}]}],
        "h": {"host": "0", "p": 8},
    }


def test_rayservice_serve_config_is_serve_config_yaml_plus_the_overlay():
    svc = load(MANIFESTS["rayservice"])
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    expected = merge_overlay(load(ROOT / "serve" / "config.yaml"), load(SERVE_OVERLAY))
    assert embedded == expected, (
        "serveConfigV2 in cluster/kuberay/rayservice.yaml differs from serve/config.yaml + serve-overlay.yaml:\n"
        + yaml.safe_dump(expected, sort_keys=False)
    )


def test_rayservice_serve_config_is_valid_for_serve_and_the_app():
    """The embedded config parses as Ray Serve's deploy schema, and its args/user_config as serve/settings."""
    from ray.serve.schema import ServeDeploySchema

    from serve.settings import ModelArgs, ServeSettings

    embedded = yaml.safe_load(load(MANIFESTS["rayservice"])["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)
    (app,) = schema.applications
    ModelArgs.model_validate(app.args)
    for d in app.deployments:
        ServeSettings.model_validate(d.user_config)


def test_rayservice_fits_its_gpu_worker_group():
    svc = load(MANIFESTS["rayservice"])
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    deps = {d["name"]: d for d in app["deployments"]}
    model = deps["ImageModel"]
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    opts = model["ray_actor_options"]
    # one model replica per GPU pod, beside the ingress
    assert opts["num_gpus"] == quantity(limits["nvidia.com/gpu"])
    assert opts["num_cpus"] + deps["Ingress"]["ray_actor_options"]["num_cpus"] <= quantity(limits["cpu"])
    auto = model["autoscaling_config"]
    assert auto["min_replicas"] == group["minReplicas"] and auto["max_replicas"] == group["maxReplicas"]
    assert svc["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")


def test_job_and_service_share_storage_and_base_model():
    from scoreaction.distributed.driver import checkpoint_dir_for

    cfg = job_config()
    ckpt = checkpoint_dir_for(cfg, Path(cfg.run.output_dir))
    app = yaml.safe_load(load(MANIFESTS["rayservice"])["spec"]["serveConfigV2"])["applications"][0]
    roots = {d["user_config"]["checkpoint_root"] for d in app["deployments"]}
    assert len(roots) == 1
    (root,) = roots
    # the service's catalog lists runs as <checkpoint_root>/<run>/checkpoints
    assert ckpt == Path(root) / Path(cfg.run.output_dir).name / "checkpoints", (ckpt, root)
    assert app["args"]["base_model"]["name_or_path"] == cfg.model.name_or_path
    assert app["args"]["base_model"]["preset"] == cfg.model.preset
    # the volume that holds them: the same claim, mounted at the same place, in every pod of both
    pvc = load(SHARED_PVC)
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in ("rayjob", "rayservice", "raycluster"):
        for where, tpl in pod_templates(load(MANIFESTS[name])):
            if where == "submitter":
                continue
            spec = tpl["spec"]
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in spec["volumes"]
                if "persistentVolumeClaim" in v
            }
            for c in spec["containers"]:
                shared = [m for m in c["volumeMounts"] if m["mountPath"] == "/shared"]
                assert len(shared) == 1 and claims[shared[0]["name"]] == pvc["metadata"]["name"], (
                    name,
                    where,
                )
                assert root.startswith("/shared/") and cfg.run.storage_path.startswith("/shared/")


def test_job_config_fits_the_rayjob_worker_pods():
    """Quick arithmetic check; tests/test_cluster_dryrun.py places the actors on a simulated cluster."""
    from scoreaction.distributed.plan import NodeInfo, PlanError, build_plan, check_fit, validate_layout

    cfg = job_config()
    validate_layout(cfg)
    cs = cluster_spec(load(MANIFESTS["rayjob"]))
    nodes = [NodeInfo("head", "h", {"CPU": float(cs["headGroupSpec"]["rayStartParams"]["num-cpus"])})]
    for g in cs["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": quantity(limits["cpu"]), "GPU": quantity(limits["nvidia.com/gpu"])}
        nodes += [NodeInfo(f"{g['groupName']}-{i}", "w", res) for i in range(g["replicas"])]
    placed = check_fit(build_plan(cfg), nodes)
    assert all(node != "head" for _, _, node in placed)
    # one pod fewer and the plan no longer fits: 4 GPUs asked for, 3 there
    with pytest.raises(PlanError, match="4 GPU in all"):
        check_fit(build_plan(cfg), nodes[:-1])


# --------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------------


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes. rel: a path relative to the context."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = Path(rel).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(x, pattern[3:]) for x in parts)
        )
        if hit:
            excluded = not negate
    return excluded


def test_dockerfile_copies_existing_files_and_installs_like_the_makefile():
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M)
    sources = [s for line in copies for s in line.split()[:-1]]
    assert {
        "pyproject.toml",
        "constraints.txt",
        "scoreaction/",
        "jobs/",
        "serve/",
        "cluster/configs/",
        ENTRYPOINT,
    } <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not dockerignore_excludes(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    # every file the manifests' entrypoint needs is in the image
    for rel in (
        "jobs/finetune.py",
        ENTRYPOINT,
        "cluster/configs/sd15-lora.yaml",
        "serve/app.py",
        "serve/config.yaml",
    ):
        assert not dockerignore_excludes(rel), rel
    for rel in (".venv/bin/python", "outputs/demo/summary.json", ".git/HEAD", "tests/test_cluster.py"):
        assert dockerignore_excludes(rel), f"{rel} would be sent to the Docker daemon"
    # the Makefile's install: pip with the same constraints file, on the project
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt", make)
    (install,) = re.findall(r"^RUN python -m pip install (.+?)(?:\s*\\?\n|\s*&&)", text, re.M)
    assert "-c constraints.txt" in install and install.split()[-1] == "."
    assert "USER ray" in text and "WORKDIR /app" in text
    # the manifests' workingDir is the image's WORKDIR
    for name in MANIFESTS:
        for where, c, _ in containers(load(MANIFESTS[name])):
            if "workingDir" in c:
                assert c["workingDir"] == "/app", where


def test_dockerignore_matcher():
    assert dockerignore_excludes("Makefile")
    assert not dockerignore_excludes("scoreaction/config.py")
    assert dockerignore_excludes("scoreaction/__pycache__/config.cpython-311.pyc")
    assert dockerignore_excludes("cluster/kuberay/rayjob-finetune.yaml")


# --------------------------------------------------------------------------------------------------
# Cluster-launcher configs (ray up)
# --------------------------------------------------------------------------------------------------


def ray_launcher_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_vm_config_validates_against_the_ray_wheel_schema(path):
    cfg = load(path)
    jsonschema.validate(cfg, ray_launcher_schema())
    # and what `ray up` does with it: fill in the provider's defaults, then Ray's own check (the schema plus
    # its extra rules, e.g. head_node_type among the node types); offline, no cloud call
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_aws_config_has_autoscaling_gpu_workers_and_token_auth():
    cfg = load(CLUSTER / "vm" / "cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [
        t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu and all(t["min_workers"] < t["max_workers"] for t in gpu)
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert "dashboard-host" not in json.dumps(cfg)  # the dashboard stays on the head's localhost


def test_local_config_uses_the_local_provider():
    cfg = load(CLUSTER / "vm" / "local.yaml")
    assert cfg["provider"]["type"] == "local" and cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.pop("provider"),
        lambda c: c.__setitem__("max_workers", "eight"),
        lambda c: c.__setitem__("idle_timeout_minute", 5),
        lambda c: c["docker"].__setitem__("imagee", "x"),
    ],
    ids=["missing provider", "wrong type", "unknown field", "unknown docker field"],
)
def test_a_mutated_vm_config_fails(mutate):
    cfg = load(CLUSTER / "vm" / "cluster.yaml")
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_launcher_schema())
