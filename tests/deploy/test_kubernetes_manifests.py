"""Offline checks of deploy/kubernetes (docs/deploy-kubernetes.md).

Every manifest is validated against the Kubernetes OpenAPI schemas bundled in
kubernetes-validate, strictly (an unknown field is an error), for the oldest
supported and the newest bundled version. Then the facts the schema cannot
see: privileges and mounts of the runners, gRPC probes, the gateway's
Service and budget, Secret references, the kustomizations, the rendered
runner config and the NetworkPolicy. No network and no cluster are needed;
the kustomize build runs only where `kubectl` is installed.
"""

import copy
import re
import shutil
import subprocess
import tomllib

import kubernetes_validate
import pytest
import yaml

from k8s_manifests import (API_PORT, DEPLOY, DNS_LABEL, DOC, FILES, KUSTOMIZATIONS,
                       METRICS_PORT, RESOURCES, ROOT, VERSIONS, WORKLOADS, defined_secrets,
                       get, mount_of, pod, render, sandpitd_containers, secret_refs, subset,
                       validate, volume)


def test_the_manifests_exist():
    kinds = {d["kind"] for _, d in RESOURCES}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Deployment", "Service",
            "PodDisruptionBudget", "NetworkPolicy", "StatefulSet"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "path,resource", RESOURCES,
    ids=[f"{p.relative_to(DEPLOY)}:{d['kind']}/{d['metadata']['name']}" for p, d in RESOURCES])
def test_schema_strict(path, resource, version):
    validate(resource, version)


MUTATIONS = {
    "misspelled top-level field": lambda d: d["spec"].update(replicasx=2),
    "misspelled container field": lambda d: pod(d)["spec"]["containers"][0].update(imagex="x"),
    "misspelled probe field": lambda d: pod(d)["spec"]["containers"][0]["readinessProbe"]["grpc"]
    .update(prot=API_PORT),
    "wrong type": lambda d: d["spec"].update(replicas="two"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_validator_rejects_a_broken_manifest(mutation):
    broken = copy.deepcopy(get("Deployment", "sandpit-gateway"))
    MUTATIONS[mutation](broken)
    for version in VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken, version)


def test_runner_is_a_privileged_daemonset_with_the_host_mounts():
    ds = get("DaemonSet", "sandpit-runner")
    spec = pod(ds)["spec"]
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    assert spec["hostPID"] is True, "sandboxes must outlive the daemon's container"
    cgroup = mount_of(spec, c, "cgroup")
    assert cgroup["mountPath"] == "/sys/fs/cgroup"
    assert volume(spec, "cgroup")["hostPath"]["path"] == "/sys/fs/cgroup"
    data = mount_of(spec, c, "data")
    assert data["mountPath"] == "/var/lib/sandpit"
    assert data["mountPropagation"] == "Bidirectional"
    assert volume(spec, "data")["hostPath"] == {"path": "/var/lib/sandpit",
                                                "type": "DirectoryOrCreate"}
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert spec["nodeSelector"] == {"sandpit.dev/runner": "true"}
    assert {"key": "sandpit.dev/runner", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in spec["tolerations"]


def test_every_sandpitd_container_has_grpc_probes_on_the_api_port():
    checked = sandpitd_containers()
    assert {name for name, _ in checked} == {"sandpit-runner", "sandpit-gateway"}
    for name, c in checked:
        assert API_PORT in [p["containerPort"] for p in c["ports"]], name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe == "startupProbe" and probe not in c:
                continue
            assert c[probe].keys() & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, \
                f"{name} {probe}"
            assert c[probe]["grpc"]["port"] == API_PORT, f"{name} {probe}"


def test_gateway_is_replicated_behind_its_service_and_budget():
    dep = get("Deployment", "sandpit-gateway")
    labels = pod(dep)["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2
    assert subset(dep["spec"]["selector"]["matchLabels"], labels)
    svc = get("Service", "sandpit-gateway")
    assert svc["spec"]["type"] == "ClusterIP"
    assert subset(svc["spec"]["selector"], labels)
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["appProtocol"]) == ("grpc", API_PORT, "grpc")
    pdb = get("PodDisruptionBudget", "sandpit-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    assert subset(pdb["spec"]["selector"]["matchLabels"], labels)
    spread = pod(dep)["spec"]["topologySpreadConstraints"]
    assert {t["topologyKey"] for t in spread} >= {"kubernetes.io/hostname"}
    assert all(subset(t["labelSelector"]["matchLabels"], labels) for t in spread)
    (c,) = pod(dep)["spec"]["containers"]
    ctx, pctx = c["securityContext"], pod(dep)["spec"]["securityContext"]
    assert pctx["runAsNonRoot"] is True and pctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("svc", [d for _, d in RESOURCES if d["kind"] == "Service"],
                         ids=lambda d: d["metadata"]["name"])
def test_services_select_a_workload_and_target_a_declared_port(svc):
    targets = [d for _, d in RESOURCES if d["kind"] in WORKLOADS
               and subset(svc["spec"]["selector"], pod(d)["metadata"]["labels"])]
    assert len(targets) == 1, "a Service selects exactly one workload's pods"
    declared = [p for c in pod(targets[0])["spec"]["containers"] for p in c.get("ports", [])]
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        key = "name" if isinstance(target, str) else "containerPort"
        assert [p for p in declared if p.get(key) == target], f"targetPort {target}"


def test_every_secret_reference_names_a_defined_secret_and_key():
    defined, refs = defined_secrets(), list(secret_refs())
    assert {"sandpit-api-keys", "sandpit-database", "sandpit-postgres"} <= {n for n, _, _ in refs}
    for name, key, where in refs:
        assert name in defined, f"{where}: Secret {name} is defined nowhere"
        assert key is None or key in defined[name], f"{where}: Secret {name} has no key {key}"
    # The files the generators read hold real keys: git must never take them.
    for k in KUSTOMIZATIONS:
        for gen in yaml.safe_load(k.read_text()).get("secretGenerator", []):
            for env in gen["envs"]:
                ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q",
                                          "--no-index", str(k.parent / env)])
                assert ignored.returncode == 0, f"{k.parent / env} is not git-ignored"
    doc = DOC.read_text()
    assert all(name in doc for name in defined), "the doc names every Secret"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS,
                         ids=lambda k: str(k.relative_to(DEPLOY)))
def test_kustomization_lists_every_manifest_of_its_directory(kustomization):
    k = yaml.safe_load(kustomization.read_text())
    assert k["namespace"] == "sandpit"
    here = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
    assert here and set(k["resources"]) == here
    # and nothing in a directory without a kustomization of its own
    assert {p.parent for p in FILES} <= {k.parent for k in KUSTOMIZATIONS}


@pytest.mark.parametrize("node,pod_ip,runner_id,advertise", [
    ("node-a", "10.0.0.5", "node-a", "http://10.0.0.5:50051"),
    ("ip-10-0-0-5.EC2.internal", "fd00::5", "ip-10-0-0-5-ec2-internal", "http://[fd00::5]:50051"),
    ("n" * 70 + ".x", "10.1.2.3", "n" * 63, "http://10.1.2.3:50051"),
])
def test_runner_config_renders_for_the_node(tmp_path, node, pod_ip, runner_id, advertise):
    text = render(tmp_path, node, pod_ip)
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder is left"
    cfg = tomllib.loads(text)
    assert DNS_LABEL.match(cfg["runner_id"])
    assert (cfg["runner_id"], cfg["cluster"]["advertise"]) == (runner_id, advertise)
    assert cfg["cluster"]["role"] == "runner"


@pytest.mark.parametrize("role,workload", [("runner", "DaemonSet"), ("gateway", "Deployment")])
def test_config_agrees_with_the_pod(tmp_path, role, workload):
    w = get(workload, f"sandpit-{role}")
    spec = pod(w)["spec"]
    (c,) = spec["containers"]
    text = render(tmp_path, "n", "10.0.0.1") if role == "runner" else \
        get("ConfigMap", "sandpit-config")["data"]["gateway.toml"]
    cfg = tomllib.loads(text)
    assert cfg["cluster"]["role"] == role
    assert cfg["listen"] == f"0.0.0.0:{API_PORT}" and cfg["insecure"] is True
    assert cfg["metrics"]["listen"] == f"0.0.0.0:{METRICS_PORT}"
    assert pod(w)["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    assert {p["containerPort"] for p in c["ports"]} == {API_PORT, METRICS_PORT}
    assert c["command"][-2:] == ["--config", "/etc/sandpit/sandpitd.toml"]
    assert mount_of(spec, c, "config")["mountPath"] == "/etc/sandpit"
    if role == "runner":
        assert mount_of(spec, c, "data")["mountPath"] == cfg["data_dir"]
    else:
        assert "data_dir" not in cfg, "a gateway keeps no data"
    # database_url_file is where the pod mounts Secret sandpit-database's key.
    url_file = cfg["cluster"]["database_url_file"]
    paths = set()
    for m in c["volumeMounts"]:
        v = volume(spec, m["name"])
        secrets = [v["secret"] | {"name": v["secret"]["secretName"]}] if "secret" in v else \
            [s["secret"] for s in v.get("projected", {}).get("sources", []) if "secret" in s]
        paths |= {f"{m['mountPath']}/{i['path']}" for s in secrets
                  if s["name"] == "sandpit-database" for i in s["items"]
                  if i["key"] == "database-url"}
    assert paths == {url_file}
    if role == "runner":
        (init,) = spec["initContainers"]
        out = next(e["value"] for e in init["env"] if e["name"] == "OUT")
        assert out == "/etc/sandpit/sandpitd.toml"
        assert mount_of(spec, init, "config")["mountPath"] == "/etc/sandpit"


def test_both_roles_use_one_lease(tmp_path):
    runner = tomllib.loads(render(tmp_path, "n", "10.0.0.1"))["cluster"]
    gateway = tomllib.loads(get("ConfigMap", "sandpit-config")["data"]["gateway.toml"])["cluster"]
    assert runner["lease"] == gateway["lease"]
    assert runner["database_url_file"] == gateway["database_url_file"]


def test_runner_api_is_open_to_gateways_only():
    runner = pod(get("DaemonSet", "sandpit-runner"))["metadata"]["labels"]
    gateway = pod(get("Deployment", "sandpit-gateway"))["metadata"]["labels"]
    np = get("NetworkPolicy", "sandpit-runner")
    assert subset(np["spec"]["podSelector"]["matchLabels"], runner)
    assert np["spec"]["policyTypes"] == ["Ingress"]
    api_rules = [r for r in np["spec"]["ingress"]
                 if any(p.get("port") == API_PORT for p in r.get("ports", []))]
    assert api_rules and all(r.get("ports") for r in np["spec"]["ingress"]), "no rule opens every port"
    for rule in api_rules:
        peers = rule.get("from")
        assert peers, "the API port must not be open to everyone"
        for peer in peers:
            assert set(peer) == {"podSelector"}, "only pods of this namespace"
            sel = peer["podSelector"]["matchLabels"]
            assert subset(sel, gateway) and not subset(sel, runner)


def test_hygiene():
    for path, d in RESOURCES:
        meta, what = d["metadata"], f"{path.name}:{d['kind']}/{d['metadata']['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "sandpit", what
        if d["kind"] != "Namespace":
            assert meta["namespace"] == "sandpit", what
        if d["kind"] == "ServiceAccount":
            assert d["automountServiceAccountToken"] is False, what
        if d["kind"] not in WORKLOADS:
            continue
        spec = pod(d)["spec"]
        assert spec["automountServiceAccountToken"] is False, what
        for c in spec.get("initContainers", []) + spec["containers"]:
            name, _, tag = c["image"].rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), f"{what}: {c['image']}"
            res = c["resources"]
            assert {"cpu", "memory"} <= res["requests"].keys() and "memory" in res["limits"], what


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS,
                         ids=lambda k: str(k.parent.relative_to(DEPLOY)))
def test_kustomize_build_validates(tmp_path, kustomization):
    tree = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, tree)
    for example in tree.rglob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out = subprocess.run(
        ["kubectl", "kustomize", str(tree / kustomization.parent.relative_to(DEPLOY))],
        check=True, capture_output=True, text=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for d in docs:
        assert d["metadata"].get("namespace", "sandpit") == "sandpit"
        validate(d, VERSIONS[0])
    # The generated Secrets' hashed names replaced every reference to them.
    refs = {name for name, _, _ in secret_refs([(kustomization, d) for d in docs])}
    assert refs and refs == secrets
    assert all(re.fullmatch(r"sandpit-[a-z-]+-[a-z0-9]{10}", name) for name in secrets)
