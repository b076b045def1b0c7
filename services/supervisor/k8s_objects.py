"""Kubernetes objects of the mesh, built from ``topology.py``; pure, no I/O.

``base_objects()`` is the kustomize base (grouped by the file each group goes to),
``overlay_patches(name)`` the JSON6902 operations an overlay applies to it, and
``model_pvc_component()`` an optional component that serves a model from a
PersistentVolumeClaim. ``kustomize.py`` lays them out as files and renders them.

Why the objects look the way they do:

- Singletons (api, scheduler, kvcache) are one-replica Deployments with strategy
  Recreate: two of them would both bind and split the mesh. Their ZMQ Services
  publish not-ready addresses: a singleton is "ready" only once its replicas have
  said hello, which they can do only through that Service (readiness gating it
  would deadlock the mesh). HTTP clients use ``api-http``, which honours readiness,
  so a draining api gets no new requests.
- Replicas find singletons by Service DNS name (``tcp://scheduler:5556``) and take
  their replica id from the pod's hostname (its unique name), like compose.
- Liveness asks only that a service still heartbeats (``--live``); readiness also
  asks that it is ready, as compose's healthcheck does.
"""

from __future__ import annotations

from typing import Any

from services.supervisor.topology import (
    API_KEY_ENV,
    API_STOP_GRACE_S,
    CURVE_DIR,
    CURVE_FILES,
    ENTRYPOINT,
    IMAGE,
    IMAGE_HOME,
    IMAGE_UID,
    PROBE_FAILURES,
    PROBE_PERIOD_S,
    PROBE_TIMEOUT_S,
    SERVICES,
    START_PERIOD_S,
    WORKERS,
    MeshService,
    health_command,
)
from shared.config import env_name

Obj = dict[str, Any]

PART_OF = "meshserve"
CURVE_SECRET = "meshserve-curve"
API_KEY_SECRET = "meshserve-api-key"  # optional; key "api-key"
MODEL_CLAIM = "meshserve-model"
MODEL_MOUNT = "/models"
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.115.1"  # as compose.yaml
JAEGER_IMAGE = "jaegertracing/jaeger:2.1.0"
COLLECTOR_CONFIG = "/etc/otelcol/config.yaml"
CONTAINER = "/spec/template/spec/containers/0"


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF}


def selector(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component}


def mesh_selector(service: str) -> dict[str, str]:
    return selector(PART_OF, service)


def _meta(name: str, lab: dict[str, str]) -> Obj:
    return {"name": name, "labels": lab}


def _probe(service: str, *, live: bool = False, startup: bool = False) -> Obj:
    probe: Obj
    if service == "api":
        path = "/health/live" if live or startup else "/health/ready"
        probe = {"httpGet": {"path": path, "port": "http"}}
    else:
        probe = {"exec": {"command": list(health_command(service, live=live or startup))}}
    probe.update(periodSeconds=PROBE_PERIOD_S, timeoutSeconds=PROBE_TIMEOUT_S,
                 failureThreshold=START_PERIOD_S // PROBE_PERIOD_S if startup
                 else PROBE_FAILURES)
    return probe


def env_list(service: MeshService) -> list[Obj]:
    env: list[Obj] = [{"name": k, "value": v} for k, v in service.environment().items()]
    if service.name == "api":
        # Unset unless the Secret exists: an open API, as under compose.
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": API_KEY_SECRET, "key": "api-key", "optional": True}}})
    return env


def _ports(service: MeshService) -> list[Obj]:
    ports = [{"name": p.name, "containerPort": p.port, "protocol": "TCP"}
             for p in service.zmq_ports]
    if service.http_port:
        ports.append({"name": "http", "containerPort": service.http_port, "protocol": "TCP"})
    return ports


def _hardened() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _scratch(*mounts: tuple[str, str]) -> tuple[list[Obj], list[Obj]]:
    """emptyDir volumes and their mounts: what a read-only root still writes."""
    volumes = [{"name": name, "emptyDir": {}} for name, _ in mounts]
    return volumes, [{"name": name, "mountPath": path} for name, path in mounts]


def _strategy(service: MeshService) -> Obj:
    if service.singleton:
        return {"type": "Recreate"}
    if service.name == "worker":
        # A GPU is freed before its replacement asks for one: no spare GPU needed.
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def mesh_deployment(service: MeshService) -> Obj:
    # /tmp: the health file and the tts engines' sockets; home: torch/Triton caches.
    volumes, mounts = _scratch(("tmp", "/tmp"), ("home", IMAGE_HOME))
    volumes.append({"name": "curve", "secret": {
        "secretName": CURVE_SECRET,
        "items": [{"key": f, "path": f} for f in CURVE_FILES],
        # Group-readable for fsGroup: the image's user does not own the files.
        "defaultMode": 0o440}})
    mounts.append({"name": "curve", "mountPath": CURVE_DIR, "readOnly": True})
    container: Obj = {
        "name": service.name, "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": list(ENTRYPOINT), "args": list(service.args),
        "env": env_list(service),
        "resources": service.resources.as_k8s(),
        "startupProbe": _probe(service.name, startup=True),
        "livenessProbe": _probe(service.name, live=True),
        "readinessProbe": _probe(service.name),
        "securityContext": _hardened(),
        "volumeMounts": mounts,
    }
    if ports := _ports(service):
        container["ports"] = ports
    pod: Obj = {
        "enableServiceLinks": False,  # only MESHSERVE_* addresses, no docker-link vars
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                            "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if service.name == "api":
        pod["terminationGracePeriodSeconds"] = API_STOP_GRACE_S
    lab = labels(PART_OF, service.name)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(service.name, lab),
        "spec": {"replicas": service.replicas, "strategy": _strategy(service),
                 "selector": {"matchLabels": mesh_selector(service.name)},
                 "template": {"metadata": {"labels": lab}, "spec": pod}},
    }


def _service(name: str, lab: dict[str, str], sel: dict[str, str], ports: list[Obj],
             *, not_ready: bool = False) -> Obj:
    spec: Obj = {"type": "ClusterIP", "selector": sel, "ports": ports}
    if not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, lab), "spec": spec}


def _service_ports(ports: list[Obj]) -> list[Obj]:
    return [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"],
             "protocol": "TCP"} for p in ports]


def mesh_services(service: MeshService) -> list[Obj]:
    lab, sel = labels(PART_OF, service.name), mesh_selector(service.name)
    zmq = [p for p in _ports(service) if p["name"] != "http"]
    out = [_service(service.name, lab, sel, _service_ports(zmq), not_ready=True)]
    if service.http_port:
        http = [p for p in _ports(service) if p["name"] == "http"]
        out.append(_service(f"{service.name}-http", lab, sel, _service_ports(http)))
    return out


def zmq_network_policy(service: MeshService) -> Obj:
    """Only mesh pods reach a singleton's ZMQ ports; the HTTP port is open."""
    ingress: list[Obj] = [{
        "from": [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": PART_OF}}}],
        "ports": [{"protocol": "TCP", "port": p.port} for p in service.zmq_ports],
    }]
    if service.http_port:
        ingress.append({"ports": [{"protocol": "TCP", "port": service.http_port}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(f"{service.name}-zmq", labels(PART_OF, service.name)),
            "spec": {"podSelector": {"matchLabels": mesh_selector(service.name)},
                     "policyTypes": ["Ingress"], "ingress": ingress}}


def replicas_network_policy() -> Obj:
    """Replicas only connect out: nothing may connect in."""
    replicas = [n for n, s in SERVICES.items() if not s.singleton]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta("replicas-no-ingress", labels(PART_OF, "replicas")),
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": PART_OF},
                                     "matchExpressions": [{
                                         "key": "app.kubernetes.io/component",
                                         "operator": "In", "values": replicas}]},
                     "policyTypes": ["Ingress"], "ingress": []}}


def disruption_budget(service: MeshService) -> Obj:
    # One pod at a time on a node drain. Singletons get none: a one-pod budget
    # either blocks every drain or allows the only pod to go, which is the default.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(service.name, labels(PART_OF, service.name)),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": mesh_selector(service.name)}}}


def autoscaler(service: MeshService) -> Obj:
    assert service.autoscale is not None
    scale = service.autoscale
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(service.name, labels(PART_OF, service.name)),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": service.name},
                     "minReplicas": scale.min_replicas, "maxReplicas": scale.max_replicas,
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization",
                                                   "averageUtilization": scale.cpu_percent}}}]}}


def _plain_deployment(name: str, image: str, args: list[str], ports: list[Obj],
                      mounts: list[Obj], volumes: list[Obj], resources: Obj) -> Obj:
    """The collector or Jaeger: their images run as their own non-root user."""
    scratch_volumes, scratch_mounts = _scratch(("tmp", "/tmp"))
    container: Obj = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                      "ports": ports, "resources": resources,
                      "securityContext": _hardened(),
                      "volumeMounts": mounts + scratch_mounts}
    if args:
        container["args"] = args
    lab = labels(name, "telemetry")
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, lab),
            "spec": {"replicas": 1, "selector": {"matchLabels": selector(name, "telemetry")},
                     "template": {"metadata": {"labels": lab}, "spec": {
                         "securityContext": {"runAsNonRoot": True,
                                             "seccompProfile": {"type": "RuntimeDefault"}},
                         "containers": [container], "volumes": volumes + scratch_volumes}}}}


def _small(cpu_limit: str, memory_limit: str) -> Obj:
    return {"requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def telemetry_objects(collector_config: str) -> list[Obj]:
    """The OTel collector (config from otel/collector.yaml) and Jaeger, as in compose."""
    otlp = [{"name": "otlp-grpc", "containerPort": 4317, "protocol": "TCP"},
            {"name": "otlp-http", "containerPort": 4318, "protocol": "TCP"}]
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": _meta("otel-collector", labels("otel-collector", "telemetry")),
                  "data": {"collector.yaml": collector_config}}
    collector = _plain_deployment(
        "otel-collector", COLLECTOR_IMAGE, [f"--config={COLLECTOR_CONFIG}"], otlp,
        [{"name": "config", "mountPath": COLLECTOR_CONFIG, "subPath": "collector.yaml",
          "readOnly": True}],
        [{"name": "config", "configMap": {"name": "otel-collector"}}], _small("1", "512Mi"))
    jaeger_ports = [otlp[0], {"name": "ui", "containerPort": 16686, "protocol": "TCP"}]
    jaeger = _plain_deployment("jaeger", JAEGER_IMAGE, [], jaeger_ports, [], [],
                               _small("1", "1Gi"))
    return [
        config_map, collector,
        _service("otel-collector", labels("otel-collector", "telemetry"),
                 selector("otel-collector", "telemetry"), _service_ports(otlp)),
        jaeger,
        _service("jaeger", labels("jaeger", "telemetry"), selector("jaeger", "telemetry"),
                 _service_ports(jaeger_ports)),
    ]


def base_objects(collector_config: str) -> dict[str, list[Obj]]:
    """The base, by file name: one file per mesh service, one for telemetry."""
    files: dict[str, list[Obj]] = {}
    for name, service in SERVICES.items():
        objs = [mesh_deployment(service)]
        if service.singleton:
            objs += [*mesh_services(service), zmq_network_policy(service)]
        else:
            objs.append(disruption_budget(service))
        if service.autoscale:
            objs.append(autoscaler(service))
        files[f"{name}.yaml"] = objs
    files["network-policy.yaml"] = [replicas_network_policy()]
    files["telemetry.yaml"] = telemetry_objects(collector_config)
    return files


def overlay_patches(overlay: str) -> list[Obj]:
    """JSON6902 operations on the base's worker Deployment for ``overlay``."""
    variant = WORKERS[overlay]
    ops: list[Obj] = [
        {"op": "add", "path": f"{CONTAINER}/env/-",
         "value": {"name": env_name("device"), "value": variant.device}},
        {"op": "replace", "path": f"{CONTAINER}/resources", "value": variant.resources.as_k8s()},
    ]
    if variant.tolerations:
        ops.append({"op": "add", "path": "/spec/template/spec/tolerations",
                    "value": [dict(t) for t in variant.tolerations]})
    return ops


MODEL_SERVICES = ("api", "tokenizer", "worker")  # the services that read MESHSERVE_MODEL


def model_claim() -> Obj:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(MODEL_CLAIM, labels(PART_OF, "model")),
            # Read by every worker, tokenizer and the api, on any node.
            "spec": {"accessModes": ["ReadOnlyMany"],
                     "resources": {"requests": {"storage": "50Gi"}}}}


def model_patches() -> list[Obj]:
    """Mount the model claim at /models and serve the model folder found there."""
    return [
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": "model", "persistentVolumeClaim": {"claimName": MODEL_CLAIM,
                                                              "readOnly": True}}},
        {"op": "add", "path": f"{CONTAINER}/volumeMounts/-",
         "value": {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}},
        {"op": "add", "path": f"{CONTAINER}/env/-",
         "value": {"name": env_name("model"), "value": MODEL_MOUNT}},
    ]
