"""Loading and reading the manifests of deploy/kubernetes for the tests."""

import pathlib
import re
import subprocess

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
DOC = ROOT / "docs" / "deploy-kubernetes.md"
# The oldest Kubernetes the manifests support, and the newest schema bundled.
VERSIONS = ("1.30.0", "1.37.0")
IMAGE = "ghcr.io/sandpit/sandpitd"
API_PORT, METRICS_PORT = 50051, 9464
WORKLOADS = ("DaemonSet", "Deployment", "StatefulSet")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


KUSTOMIZATIONS = sorted(DEPLOY.rglob("kustomization.yaml"))
FILES = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")
RESOURCES = [(p, d) for p in FILES for d in load(p)]


def validate(resource, version):
    """The one validator every manifest goes through: strict schema check."""
    kubernetes_validate.validate(resource, version, strict=True)


def get(kind, name):
    found = [d for _, d in RESOURCES if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} definitions"
    return found[0]


def pod(workload):
    return workload["spec"]["template"]


def sandpitd_containers():
    return [
        (d["metadata"]["name"], c)
        for _, d in RESOURCES if d["kind"] in WORKLOADS
        for c in pod(d)["spec"]["containers"] if c["image"].startswith(IMAGE + ":")
    ]


def subset(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def mount_of(spec, container, volume):
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(mounts) == 1, f"volume {volume} mounted {len(mounts)} times"
    return mounts[0]


def volume(spec, name):
    return next(v for v in spec["volumes"] if v["name"] == name)


def secret_refs(resources=RESOURCES):
    """(secret name, key or None, where) for every reference in a pod spec."""
    for path, d in resources:
        if d["kind"] not in WORKLOADS:
            continue
        spec, where = pod(d)["spec"], f"{path.name}:{d['metadata']['name']}"
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    yield ref["name"], ref["key"], where
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    yield src["secretRef"]["name"], None, where
        for v in spec.get("volumes", []):
            sources = [{"secret": {"name": v["secret"]["secretName"], **v["secret"]}}] \
                if "secret" in v else v.get("projected", {}).get("sources", [])
            for s in (s["secret"] for s in sources if "secret" in s):
                for item in s.get("items") or [{"key": None}]:
                    yield s["name"], item["key"], where


def defined_secrets():
    """Secret name -> keys: Secret manifests, and kustomize secretGenerators
    whose env files are documented by a committed `.example`."""
    found = {d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
             for _, d in RESOURCES if d["kind"] == "Secret"}
    for k in KUSTOMIZATIONS:
        for gen in yaml.safe_load(k.read_text()).get("secretGenerator", []):
            keys = set()
            for env in gen.get("envs", []):
                example = k.parent / (env + ".example")
                for line in example.read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        keys.add(line.split("=", 1)[0])
            found[gen["name"]] = keys
    return found


def runner_template():
    return get("ConfigMap", "sandpit-config")["data"]["runner.toml"]


def render(tmp_path, node, pod_ip):
    (init,) = pod(get("DaemonSet", "sandpit-runner"))["spec"]["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    (tmp_path / "runner.toml").write_text(runner_template())
    env = {"PATH": "/usr/bin:/bin", "NODE_NAME": node, "POD_IP": pod_ip,
           "TEMPLATE": str(tmp_path / "runner.toml"), "OUT": str(tmp_path / "sandpitd.toml")}
    subprocess.run(init["command"], env=env, check=True, capture_output=True, timeout=30)
    return (tmp_path / "sandpitd.toml").read_text()
