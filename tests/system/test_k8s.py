"""The Kubernetes manifests, checked offline: no cluster, no API server.

Every kustomization under k8s/ is rendered by the real kustomize (`kubectl kustomize`, what
`kubectl apply -k` runs); every object is validated strictly against the Kubernetes OpenAPI schemas
(kubernetes-validate, 1.31 and the newest it knows), and JobSets against JobSet's published CRD schema
(tests/data/, unknown fields rejected) with their Job template checked as a batch/v1 Job. The parts
that must agree with the job itself are checked against it: exit codes against job.errors, the spec
in the ConfigMap with `ftjob validate`, the env names against what job/ reads, the model cache against
the image's HF_HOME. Finally the container's args and env are run as local `ftjob` processes with the
volumes mapped to temporary directories: once with the database appearing only after the start (the
--wait-for-inputs path), once with a multi-node pod's rank variables.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job import errors

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DOCKERFILE = REPO / "docker" / "Dockerfile"
JOBSET_CRD = REPO / "tests" / "data" / "jobset.x-k8s.io_jobsets.yaml"

KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
# Every kustomization is one of these; a new one must be added to its list (test below), so that it
# gets the checks of its kind.
TRAINERS = ["base", "multinode", "overlays/single-node", "overlays/multi-node", "overlays/multi-node-jobset"]
USER_OVERLAYS = [k for k in TRAINERS if k.startswith("overlays/")]
LOADERS = ["loader", "loader-rwx"]
COMPONENTS = ["components/kueue", "components/rwx-chown"]
APPLIED = TRAINERS + LOADERS

# The oldest Kubernetes the manifests target (podFailurePolicy is GA from 1.31) and the newest the
# schema package knows.
K8S_VERSIONS = ["1.31", kubernetes_validate.latest_version()]

# The multi-node env contract of `ftjob run` (job/train/launch.py): rank and rendezvous.
RANK_ENV = {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE"}
# Set for the libraries, not for ftjob's launcher.
LIBRARY_ENV = {"HF_HUB_OFFLINE", "HF_HOME"}
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
STORAGE_SELECTOR = ("app.kubernetes.io/component", "storage")  # `kubectl apply -l` in k8s/README.md


# ------------------------------------------------------------------ rendering (real kustomize)


def kubectl() -> str:
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if not found:
        pytest.fail("kubectl not found: the manifests are rendered with `kubectl kustomize` "
                    "(apt-get install kubectl; .ci/run installs it)")
    return found


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.lru_cache(maxsize=None)
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / name))


def render(name: str) -> list[dict]:
    """The objects `kubectl apply -k k8s/<name>` would create (a fresh copy per call)."""
    return copy.deepcopy(list(_rendered(name)))


def kustomization_kind(name: str) -> str:
    return yaml.safe_load((K8S / name / "kustomization.yaml").read_text(encoding="utf-8")).get("kind", "Kustomization")


def with_components(tmp_path: Path, overlay: str, components: list[str]) -> Path:
    """A copy of k8s/ in which `overlay`'s kustomization.yaml lists `components`, as k8s/README.md
    tells users to do; returns the copy's root."""
    root = tmp_path / "k8s"
    if not root.exists():
        shutil.copytree(K8S, root)
    path = root / overlay / "kustomization.yaml"
    k = yaml.safe_load(path.read_text(encoding="utf-8"))
    k["components"] = list(k.get("components") or []) + [
        os.path.relpath(root / c, root / overlay) for c in components]
    path.write_text(yaml.safe_dump(k, sort_keys=False), encoding="utf-8")
    return root


# ------------------------------------------------------------------ the workload: a Job or a JobSet


@dataclass
class Workload:
    obj: dict  # the Job or the JobSet
    job_spec: dict  # batch/v1 JobSpec: the Job's, or the JobSet's replicatedJob template's

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def pod(self) -> dict:
        return self.job_spec["template"]["spec"]

    @property
    def container(self) -> dict:
        containers = self.pod["containers"]
        assert [c["name"] for c in containers] == ["ftjob"], "the pod runs exactly one container, ftjob"
        return containers[0]

    @property
    def multinode(self) -> bool:
        return self.job_spec.get("completionMode") == "Indexed"


def workload(objects: list[dict]) -> Workload:
    found = [o for o in objects if o["kind"] in ("Job", "JobSet")]
    assert len(found) == 1, f"expected one Job or JobSet, found {[o['kind'] for o in found]}"
    obj = found[0]
    if obj["kind"] == "Job":
        return Workload(obj, obj["spec"])
    (rjob,) = obj["spec"]["replicatedJobs"]
    return Workload(obj, rjob["template"]["spec"])


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def mounts(pod: dict, container: dict) -> list[tuple[dict, dict]]:
    """(volumeMount, volume) pairs of a container."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return [(m, volumes[m["name"]]) for m in container.get("volumeMounts", [])]


def spec_mount(objects: list[dict]) -> tuple[str, dict]:
    """Where the spec ConfigMap is mounted, and that ConfigMap."""
    w = workload(objects)
    cm = one(objects, "ConfigMap")
    hits = [m for m, v in mounts(w.pod, w.container) if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    assert len(hits) == 1, f"the spec ConfigMap {cm['metadata']['name']} is mounted exactly once"
    return hits[0]["mountPath"], cm


def spec_of(objects: list[dict]) -> dict:
    _, cm = spec_mount(objects)
    (text,) = cm["data"].values()
    return yaml.safe_load(text)


def env_of(container: dict, completion_index: int = 0) -> dict[str, str]:
    """The container's env as the kubelet would set it for the pod with this completion index."""
    out = {}
    for item in container.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == COMPLETION_INDEX, f"{item['name']}: no local stand-in for {field}"
            out[item["name"]] = str(completion_index)
    return out


def under(path: str, mount_path: str) -> bool:
    return path == mount_path or path.startswith(mount_path.rstrip("/") + "/")


def image_env() -> dict[str, str]:
    env = {}
    for line in DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            for token in line[4:].split():
                key, _, value = token.partition("=")
                env[key] = value
    return env


def image_user() -> tuple[int, int]:
    (user,) = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


@pytest.fixture(scope="module", params=TRAINERS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


# ------------------------------------------------------------------ schemas


@functools.lru_cache(maxsize=None)
def jobset_schema() -> tuple[str, dict]:
    """(apiVersion, JSON schema) of JobSet from its vendored CRD, closed: an unknown field is an error,
    as `kubectl apply` (server-side field validation, Strict) makes it."""
    crd = yaml.safe_load(JOBSET_CRD.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for child in node.get("properties", {}).values():
                close(child)
            for key in ("items", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    close(node[key])
        return node

    return f"{crd['spec']['group']}/v1alpha2", close(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


# JobSet's admission webhook (pkg/webhooks/jobset_webhook.go), which the CRD schema does not express.
JOBSET_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded",
                          "PodFailurePolicy"}
JOBSET_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def validate_jobset(obj: dict, version: str) -> list[str]:
    problems = []
    api_version, schema = jobset_schema()
    if obj["apiVersion"] != api_version:
        problems.append(f"apiVersion {obj['apiVersion']}, the CRD serves {api_version}")
    problems += [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                 for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
    # ObjectMeta is not in the CRD's schema (the API server checks it for every kind): check it as a
    # ConfigMap's; the Job template (cut from the vendored CRD, see its header) as a batch/v1 Job's.
    wrappers = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}]
    name = obj["metadata"]["name"]
    spec = obj["spec"]
    for rjob in spec.get("replicatedJobs", []):
        replicas = rjob.get("replicas", 1)
        job_spec = rjob["template"]["spec"]
        job_name = f"{name}-{rjob['name']}-{replicas - 1}"
        pod_name = f"{job_name}-{job_spec.get('completions', 1) - 1}-abcde"
        for what, value in (("job name", job_name), ("pod name", pod_name), ("groupName", rjob.get("groupName", "default"))):
            if not (DNS1035.match(value) and len(value) <= 63):
                problems.append(f"{rjob['name']}: {what} {value!r} is not a DNS-1035 label of at most 63 characters")
        meta = {**rjob["template"].get("metadata", {}), "name": job_name}
        wrappers.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec})
    names = [r["name"] for r in spec.get("replicatedJobs", [])]
    rules = spec.get("failurePolicy", {}).get("rules", [])
    if len(set(names)) != len(names) or len({r["name"] for r in rules}) != len(rules):
        problems.append("replicatedJob names and failure policy rule names must be unique")
    for rule in rules:
        if not JOBSET_RULE_NAME.match(rule["name"]) or len(rule["name"]) > 128:
            problems.append(f"failure policy rule name {rule['name']!r} is invalid")
        problems += [f"failure policy rule {rule['name']}: unknown job failure reason {r!r}"
                     for r in rule.get("onJobFailureReasons", []) if r not in JOBSET_FAILURE_REASONS]
        problems += [f"failure policy rule {rule['name']}: no replicatedJob {r!r}"
                     for r in rule.get("targetReplicatedJobs", []) if r not in names]
    for wrapper in wrappers:
        try:
            kubernetes_validate.validate(wrapper, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"as a {wrapper['kind']}: {e}")
    return problems


def validate(objects: list[dict], version: str, where: str) -> None:
    for obj in objects:
        label = f"{where}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {version})"
        if obj["kind"] == "JobSet":
            problems = validate_jobset(obj, version)
            assert not problems, f"{label} invalid:\n" + "\n".join(problems)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{label} invalid: {e}")


# ------------------------------------------------------------------ layout and schemas


def test_every_kustomization_is_known():
    assert sorted(TRAINERS + LOADERS + COMPONENTS) == KUSTOMIZATIONS, (
        "add the new kustomization to TRAINERS, LOADERS or COMPONENTS so that it gets its checks")
    assert all(kustomization_kind(c) == "Component" for c in COMPONENTS)
    assert all(kustomization_kind(k) == "Kustomization" for k in APPLIED)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders_with_kubectl(name):
    objects = render(name)
    if name in COMPONENTS:
        assert objects == [], "a component adds nothing by itself; overlays include it"
    elif name in TRAINERS:
        workload(objects)
    else:
        assert [o["kind"] for o in objects] == ["Pod"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", APPLIED)
def test_objects_match_the_schemas(name, version):
    validate(render(name), version, name)


def test_jobset_validation_rejects_what_the_api_server_would():
    """The JobSet checks above are only worth something if they fail on a broken JobSet."""
    good = workload(render("overlays/multi-node-jobset")).obj
    assert not validate_jobset(good, K8S_VERSIONS[-1])
    breakages = {
        "unknown JobSet field": lambda js: js["spec"].__setitem__("failurePolicyy", {}),
        "unknown field in the pod template": lambda js: js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"].__setitem__("restartPolicyy", "Never"),
        "wrong type": lambda js: js["spec"]["network"].__setitem__("enableDNSHostnames", "yes"),
        "bad failure reason": lambda js: js["spec"]["failurePolicy"]["rules"][0].__setitem__("onJobFailureReasons", ["ExitCode2"]),
        "bad enum": lambda js: js["spec"]["failurePolicy"].__setitem__("restartStrategy", "RecreateAll"),
    }
    for what, breaks in breakages.items():
        bad = copy.deepcopy(good)
        breaks(bad)
        assert validate_jobset(bad, K8S_VERSIONS[-1]), f"{what} was not caught"


# ------------------------------------------------------------------ pod: security, shm, signals, GPUs


def assert_restricted(pod: dict, containers: list[dict]) -> None:
    """Pod Security Standard "restricted" for the pod and these containers."""
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert not any("hostPath" in v for v in pod.get("volumes", []))
    for container in containers:
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"]["drop"] == ["ALL"]
        assert not csc["capabilities"].get("add")
        assert not csc.get("privileged")
        assert csc.get("runAsNonRoot", True) is True
        assert csc.get("runAsUser", sc["runAsUser"]) > 0


def test_pod_security_is_restricted(rendered):
    _, objects = rendered
    w = workload(objects)
    assert_restricted(w.pod, w.pod["containers"] + w.pod.get("initContainers", []))


def test_pod_runs_as_the_image_user(rendered):
    """runAsUser/runAsGroup/fsGroup are the uid the image creates, so ReadWriteOnce volumes are writable."""
    _, objects = rendered
    sc = workload(objects).pod["securityContext"]
    uid, gid = image_user()
    assert (sc["runAsUser"], sc.get("runAsGroup")) == (uid, gid)
    assert sc.get("fsGroup") == gid, "fsGroup makes the claims writable for the job's user"
    assert sc.get("fsGroupChangePolicy") == "OnRootMismatch", "don't chown a full volume on every restart"


def test_shm_is_memory_backed(rendered):
    _, objects = rendered
    w = workload(objects)
    shm = [(m, v) for m, v in mounts(w.pod, w.container) if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1, "NCCL needs more than the container's 64 MiB /dev/shm"
    assert shm[0][1]["emptyDir"]["medium"] == "Memory"


def test_grace_period_covers_a_checkpoint(rendered):
    """SIGTERM -> ftjob -> the workers (not DeepSpeed's launcher, whose own timer SIGKILLs them 30 s
    later) -> checkpoint -> exit 75: the whole grace period is the checkpoint's, and the pod default
    (30 s) would SIGKILL a slow save."""
    _, objects = rendered
    assert workload(objects).pod["terminationGracePeriodSeconds"] >= 120


def test_gpus_are_requested(rendered):
    _, objects = rendered
    gpus = workload(objects).container["resources"]["limits"]["nvidia.com/gpu"]
    assert isinstance(gpus, int) and gpus >= 1


def test_pod_failure_policy_uses_ftjob_exit_codes(rendered):
    _, objects = rendered
    w = workload(objects)
    assert w.pod["restartPolicy"] == "Never", "podFailurePolicy requires Never"
    by_code, conditions = {}, {}
    for rule in w.job_spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In"
            assert codes.get("containerName") == w.container["name"]
            for code in codes["values"]:
                assert code not in by_code, f"exit code {code} in two rules: the first would win silently"
                by_code[code] = rule["action"]
        for cond in rule.get("onPodConditions", []):
            conditions[(cond["type"], cond["status"])] = rule["action"]
    assert by_code[errors.BAD_INPUT] == "FailJob", "bad spec/data/model: retrying fails the same way"
    assert by_code[errors.DIVERGED] == "FailJob", "a retry resumes into the same divergence"
    assert by_code[errors.VOLUME] == "FailJob", "the new pod gets the same full or read-only volume"
    assert by_code[errors.PREEMPTED] == "Ignore", "preempted with a checkpoint: restart, don't count"
    # Everything else (a crash, LOCKED) is a counted retry: it may be transient.
    assert set(by_code) == {errors.BAD_INPUT, errors.DIVERGED, errors.VOLUME, errors.PREEMPTED}
    assert conditions == {("DisruptionTarget", "True"): "Ignore"}
    # A replacement pod must not start while the old one still holds the run directory's lock.
    assert w.job_spec.get("podReplacementPolicy") == "Failed"


# ------------------------------------------------------------------ container: image, args, spec, volumes


def test_image_is_set_by_kustomize(rendered):
    name, objects = rendered
    root = K8S / name
    while True:  # the nearest kustomization (this one or a base below it) that sets `images`
        k = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
        if k.get("images"):
            break
        (sub,) = [r for r in k.get("resources", []) if (root / r).is_dir()]
        root = (root / sub).resolve()
    (image,) = [i for i in k["images"] if i["name"] == "ftjob"]
    w = workload(objects)
    for container in w.pod["containers"] + w.pod.get("initContainers", []):
        assert container["image"] == f"{image['newName']}:{image['newTag']}", container["name"]


@functools.lru_cache(maxsize=None)
def ftjob_run_help() -> str:
    out = subprocess.run([_ftjob(), "run", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_container_runs_the_mounted_spec_and_waits_for_its_inputs(rendered):
    _, objects = rendered
    container = workload(objects).container
    mount_path, cm = spec_mount(objects)
    (key,) = cm["data"]
    assert "command" not in container, "the image's ENTRYPOINT (ftjob) must stay the command"
    args = container["args"]
    assert args[:2] == ["run", f"{mount_path}/{key}"]
    assert args[2:3] == ["--wait-for-inputs"] and len(args) == 4, args
    assert 600 <= int(args[3]) <= 7200, "long enough to copy the inputs, short enough to notice a mistake"
    assert "--wait-for-inputs" in ftjob_run_help(), "`ftjob run` has no --wait-for-inputs: the pods would exit 2"


def test_spec_paths_are_on_the_volumes(rendered):
    """data and model on the read-only inputs claim, output_dir on a writable claim."""
    _, objects = rendered
    w = workload(objects)
    spec = spec_of(objects)
    pairs = mounts(w.pod, w.container)

    def mount_for(path):
        hits = [(m, v) for m, v in pairs if under(path, m["mountPath"])]
        assert hits, f"{path} is on no mounted volume"
        return max(hits, key=lambda h: len(h[0]["mountPath"]))

    for path in (spec["data"]["database"], spec["model"]["path"]):
        m, volume = mount_for(path)
        assert volume["persistentVolumeClaim"]["claimName"] == "ftjob-inputs" and m.get("readOnly"), path
    m, volume = mount_for(spec["output_dir"])
    assert "persistentVolumeClaim" in volume and not m.get("readOnly"), "runs are written to a claim"


def test_claims_are_mounted_whole(rendered):
    """kubelet cannot create a missing subPath directory on a read-only volume: with an empty inputs
    claim the pod would hang in CreateContainerConfigError instead of starting and waiting."""
    _, objects = rendered
    w = workload(objects)
    for m, v in mounts(w.pod, w.container):
        if "persistentVolumeClaim" in v:
            assert not m.get("subPath") and not m.get("subPathExpr"), m


def test_model_cache_is_mounted_where_hf_home_points(rendered):
    _, objects = rendered
    w = workload(objects)
    hf_home = image_env()["HF_HOME"]
    assert env_of(w.container).get("HF_HOME", hf_home) == hf_home
    assert env_of(w.container).get("HF_HUB_OFFLINE") == "1"
    (cache,) = [(m, v) for m, v in mounts(w.pod, w.container) if m["mountPath"] == hf_home]
    m, volume = cache
    assert volume["persistentVolumeClaim"]["claimName"] == "ftjob-hf-cache"
    assert not m.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly"), (
        "the libraries expect to be able to write to their cache")


def test_claims_fit_the_node_count_and_can_be_applied_alone(rendered):
    _, objects = rendered
    w = workload(objects)
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"] for v in w.pod["volumes"] if "persistentVolumeClaim" in v}
    assert used == set(claims) == {"ftjob-inputs", "ftjob-hf-cache", "ftjob-output"}
    wanted = "ReadWriteMany" if w.multinode else "ReadWriteOnce"
    key, value = STORAGE_SELECTOR
    for name, claim in claims.items():
        assert claim["spec"]["accessModes"] == [wanted], name
        assert claim["metadata"]["labels"].get(key) == value, f"{name}: `kubectl apply -l {key}={value}` misses it"
    others = [o for o in objects if o["kind"] != "PersistentVolumeClaim"]
    assert not [o for o in others if o["metadata"].get("labels", {}).get(key) == value]


# ------------------------------------------------------------------ scheduling and multi-node wiring


def test_user_overlays_have_scheduling_placeholders():
    for name in USER_OVERLAYS:
        pod = workload(render(name)).pod
        assert isinstance(pod.get("nodeSelector"), dict), name
        assert isinstance(pod.get("tolerations"), list) and pod["tolerations"], name
        assert isinstance(pod.get("priorityClassName"), str), name


def test_single_node_sets_no_rank_env(rendered):
    _, objects = rendered
    w = workload(objects)
    if w.multinode:
        pytest.skip("multi-node")
    assert not set(env_of(w.container)) & RANK_ENV
    assert not any(o["kind"] == "Service" for o in objects)


def test_multinode_wiring(rendered):
    """Node count in one place per variant, rank from the completion index, rank 0's stable DNS name."""
    _, objects = rendered
    w = workload(objects)
    if not w.multinode:
        pytest.skip("single node")
    env = env_of(w.container)
    nodes = int(env["NNODES"])
    assert w.job_spec["completions"] == w.job_spec["parallelism"] == nodes >= 2
    (rank,) = [e for e in w.container["env"] if e["name"] == "NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    assert env_of(w.container, completion_index=1)["NODE_RANK"] == "1"
    if w.kind == "Job":
        service = one(objects, "Service")
        job_name, svc_name = w.obj["metadata"]["name"], service["metadata"]["name"]
        # Pods are `<job>-<index>.<service>` only with a headless Service named like the subdomain.
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == {"job-name": job_name}
        assert service["spec"].get("publishNotReadyAddresses") is True
        assert w.pod["subdomain"] == svc_name
        assert env["MASTER_ADDR"] == f"{job_name}-0.{svc_name}"
        assert int(env["MASTER_PORT"]) in {p["port"] for p in service["spec"].get("ports", [])}
    else:
        js = w.obj
        (rjob,) = js["spec"]["replicatedJobs"]
        network = js["spec"]["network"]
        assert network["enableDNSHostnames"] is True and network.get("publishNotReadyAddresses", True) is True
        subdomain = network.get("subdomain", js["metadata"]["name"])
        assert env["MASTER_ADDR"] == f"{js['metadata']['name']}-{rjob['name']}-0-0.{subdomain}", "index 0's pod"
        assert rjob.get("replicas", 1) == 1, "one Indexed Job whose pods are the nodes"
        assert not any(o["kind"] in ("Service", "Job") for o in objects), "JobSet makes its own Service and Jobs"
        assert "subdomain" not in w.pod, "JobSet sets the pods' subdomain to its Service"
        assert w.job_spec["backoffLimit"] == 0, "any counted pod failure fails the Job: JobSet restarts all pods"
        policy = js["spec"]["failurePolicy"]
        assert policy["rules"][0]["action"] == "FailJobSet"
        assert policy["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"], (
            "ftjob's FailJob exit codes (bad input, diverged, volume) must fail the set, not restart it")
        assert policy["maxRestarts"] >= 1
        assert policy.get("restartStrategy") == "BlockingRecreate", "old pods gone before new ones lock the run dir"


def test_multinode_pods_go_to_different_nodes(rendered):
    _, objects = rendered
    w = workload(objects)
    if not w.multinode:
        pytest.skip("single node")
    labels = w.job_spec["template"]["metadata"]["labels"]
    spreads = [c for c in w.pod.get("topologySpreadConstraints", [])
               if c["topologyKey"] == "kubernetes.io/hostname" and c["whenUnsatisfiable"] == "DoNotSchedule"
               and c["maxSkew"] == 1]
    assert len(spreads) == 1, "one pod per node: a hard spread over kubernetes.io/hostname"
    selector = spreads[0]["labelSelector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the spread must count this job's own pods"
    assert spreads[0].get("matchLabelKeys") == ["batch.kubernetes.io/controller-uid"], "...and only them"


def test_rank_env_names_are_the_ones_ftjob_reads(rendered):
    """A misspelt env name is silently ignored by the job: every rank variable the manifests set
    must be in the contract and read somewhere in job/."""
    _, objects = rendered
    names = set(env_of(workload(objects).container)) - LIBRARY_ENV
    assert names <= RANK_ENV, f"not in ftjob's env contract: {names - RANK_ENV}"
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "job").rglob("*.py"))
    unread = {n for n in names if f'"{n}"' not in sources and f"'{n}'" not in sources}
    assert not unread, f"set by the manifest but read nowhere in job/: {sorted(unread)}"


def test_jobset_is_the_multinode_job_converted():
    """The JobSet variant carries ../multi-node's pod template, exit-code policy and node count;
    only rank 0's address and the subdomain differ."""
    job = workload(render("overlays/multi-node"))
    jobset = workload(render("overlays/multi-node-jobset"))
    assert jobset.kind == "JobSet" and job.kind == "Job"
    for key in ("podFailurePolicy", "completions", "parallelism", "podReplacementPolicy", "completionMode"):
        assert jobset.job_spec[key] == job.job_spec[key], key
    expected = copy.deepcopy(job.job_spec["template"])
    expected["spec"].pop("subdomain")
    actual = copy.deepcopy(jobset.job_spec["template"])
    for template in (expected, actual):  # env order is irrelevant here (no $(VAR) references)
        env = template["spec"]["containers"][0]["env"]
        env.sort(key=lambda item: item["name"])
        for item in env:
            if item["name"] == "MASTER_ADDR":
                item["value"] = "<rank 0>"
    assert actual == expected
    cm = one(render("overlays/multi-node-jobset"), "ConfigMap")["metadata"]["name"]
    assert any(v.get("configMap", {}).get("name") == cm for v in jobset.pod["volumes"]), (
        "the JobSet must mount the generated (hashed) ConfigMap name")


# ------------------------------------------------------------------ optional components, loader


@pytest.mark.parametrize("overlay", USER_OVERLAYS)
def test_kueue_component(overlay, tmp_path):
    root = with_components(tmp_path, overlay, ["components/kueue"])
    objects = kustomize(root / overlay)
    w = workload(objects)
    assert w.obj["metadata"]["labels"].get("kueue.x-k8s.io/queue-name"), "Kueue picks up labelled workloads"
    assert w.obj["spec"].get("suspend") is True, "created suspended; Kueue unsuspends it when admitted"
    assert w.job_spec.get("suspend") is None or w.kind == "Job"
    validate(objects, K8S_VERSIONS[-1], f"{overlay} + kueue")


def check_volume_owner(pod: dict, owner: dict, main: dict, claims: set[str]) -> None:
    """A root init container that only chowns the given claims to the main container's uid/gid."""
    sc = owner["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sorted(sc["capabilities"]["add"]) == ["CHOWN", "FOWNER"]
    assert owner["image"] == main["image"]
    owned = {v["persistentVolumeClaim"]["claimName"] for m, v in mounts(pod, owner)}
    assert owned == claims
    script = " ".join(owner["command"])
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert f"chown {uid}:{gid}" in script
    for m, _ in mounts(pod, owner):
        assert m["mountPath"] in script, f"{m['mountPath']} is mounted but not chowned"
    # Apart from it, the pod is as restricted as before.
    assert_restricted(pod, [c for c in pod["containers"]])


@pytest.mark.parametrize("overlay", ["overlays/single-node", "overlays/multi-node"])
def test_rwx_chown_component(overlay, tmp_path):
    root = with_components(tmp_path, overlay, ["components/rwx-chown"])
    rendered_names = [overlay] + (["overlays/multi-node-jobset"] if overlay == "overlays/multi-node" else [])
    for name in rendered_names:  # multi-node-jobset inherits it from multi-node
        objects = kustomize(root / name)
        w = workload(objects)
        (owner,) = w.pod["initContainers"]
        check_volume_owner(w.pod, owner, w.container, {"ftjob-output", "ftjob-hf-cache"})
        validate(objects, K8S_VERSIONS[-1], f"{name} + rwx-chown")


def test_loader_pod_fills_the_claims_the_job_reads():
    pod = one(render("loader"), "Pod")
    spec = pod["spec"]
    (loader,) = spec["containers"]
    assert_restricted(spec, [loader])
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == image_user()
    job_objects = render("base")
    job = workload(job_objects)
    claims = {o["metadata"]["name"] for o in job_objects if o["kind"] == "PersistentVolumeClaim"}
    loader_mounts = {v["persistentVolumeClaim"]["claimName"]: m for m, v in mounts(spec, loader)}
    assert set(loader_mounts) == {"ftjob-inputs", "ftjob-hf-cache"} <= claims
    assert not any(m.get("readOnly") for m in loader_mounts.values())
    # Mounted where the Job mounts them, so the paths in k8s/README.md and the specs are the same.
    job_mounts = {v["persistentVolumeClaim"]["claimName"]: m["mountPath"]
                  for m, v in mounts(job.pod, job.container) if "persistentVolumeClaim" in v}
    for claim, m in loader_mounts.items():
        assert m["mountPath"] == job_mounts[claim]
    # It creates the directories the specs point into, and the Hub cache's hub/.
    script = " ".join(loader["command"])
    for name in TRAINERS:
        spec_ = spec_of(render(name))
        for path in (spec_["data"]["database"], spec_["model"]["path"]):
            assert str(Path(path).parent) in script, f"{name}: the loader does not create {Path(path).parent}"
    assert f"{image_env()['HF_HOME']}/hub" in script
    assert loader["image"] == job.container["image"], "the same (default) image as the Job"
    assert spec["restartPolicy"] == "Never" and "sleep" in script, "it ends by itself, releasing the claims"


def test_loader_rwx_variant():
    pod = one(render("loader-rwx"), "Pod")["spec"]
    (loader,) = pod["containers"]
    (owner,) = pod["initContainers"]
    check_volume_owner(pod, owner, loader, {"ftjob-inputs", "ftjob-hf-cache"})


# ------------------------------------------------------------------ the spec and the command, for real


def _ftjob() -> str:
    exe = Path(sys.executable).with_name("ftjob")
    if exe.exists():
        return str(exe)
    found = shutil.which("ftjob")
    assert found, "the ftjob console script is not installed (pip install -e .)"
    return found


def _demo_model(request) -> Path | None:
    try:
        assets = request.getfixturevalue("demo_assets")
    except pytest.FixtureLookupError:
        return None
    model = getattr(assets, "model", None) or assets["model"]
    return Path(model)


def _write_database(path: Path, table: str, column: str, rows: int = 160) -> None:
    """A stand-in for the Wikibooks dump: the spec's table and text column, a few hundred words a row,
    and one empty text (the job drops those). Written under another name and renamed into place, as
    k8s/README.md tells users to copy it, so a waiting job never opens half a file."""
    words = ("женщина книга город река время человек дом слово мир жизнь "
             "the of and to in is was for on with as by at from").split()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.incoming")
    with sqlite3.connect(partial) as db:
        db.execute(f'CREATE TABLE "{table}" (title TEXT, url TEXT, "{column}" TEXT)')
        texts = [" ".join(words[(i * 7 + j * 3 + j * j) % len(words)] for j in range(80)) + "."
                 for i in range(rows)]
        texts[3] = ""
        db.executemany(f'INSERT INTO "{table}" VALUES (?, ?, ?)',
                       [(f"page {i}", f"https://example.invalid/{i}", t) for i, t in enumerate(texts)])
    db.close()
    os.replace(partial, path)


class PodOnDisk:
    """The pod's filesystem view, with every volume mount mapped to a directory under `root`: the
    spec ConfigMap written out, the spec's model created where the spec points and (unless told to
    wait) its database."""

    def __init__(self, objects: list[dict], root: Path, model: Path | None, write_database: bool = True):
        self.root = root
        w = workload(objects)
        self.container = w.container
        self.mounts = [m["mountPath"] for m, _ in mounts(w.pod, w.container)]
        for mount in self.mounts:
            self.local(mount).mkdir(parents=True, exist_ok=True)
        mount_path, cm = spec_mount(objects)
        for key, text in cm["data"].items():
            self.local(f"{mount_path}/{key}").write_text(text, encoding="utf-8")
        self.spec = spec_of(objects)
        if write_database:
            self.write_database()
        model_dir = self.local(self.spec["model"]["path"])
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        if model is not None:
            model_dir.symlink_to(model.resolve(), target_is_directory=True)
        else:  # enough of a model directory for a spec check (no weights)
            from transformers import GPT2Config
            GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=64).save_pretrained(model_dir)
        self.run_dir = self.local(self.spec["output_dir"]) / self.spec["name"]

    def write_database(self) -> None:
        data = self.spec["data"]
        _write_database(self.local(data["database"]), data["table"], data.get("text_column", "text"))

    def local(self, pod_path: str) -> Path:
        mount = max((m for m in self.mounts if under(pod_path, m)), key=len, default=None)
        assert mount, f"{pod_path} is not on a mounted volume"
        return self.root / mount.lstrip("/") / os.path.relpath(pod_path, mount)

    def args(self, args: list[str]) -> list[str]:
        return [str(self.local(a)) if a.startswith("/") else a for a in args]

    def env(self, completion_index: int = 0) -> dict[str, str]:
        """The container's env, with paths inside the pod (HF_HOME) mapped like the volumes."""
        env = env_of(self.container, completion_index)
        return {k: str(self.local(v)) if v.startswith("/") and any(under(v, m) for m in self.mounts) else v
                for k, v in env.items()}

    def path_overrides(self) -> list[str]:
        s = self.spec
        return ["--set", f"data.database={self.local(s['data']['database'])}",
                "--set", f"model.path={self.local(s['model']['path'])}",
                "--set", f"output_dir={self.local(s['output_dir'])}"]


def _clean_env() -> dict[str, str]:
    """This process's env without rank/scheduler variables and cache locations that would leak in."""
    drop = RANK_ENV | {"JOB_COMPLETION_INDEX", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                       "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}


_validated: dict[str, str] = {}  # what test_spec_in_configmap_passes_ftjob_validate checked, by content


def test_spec_in_configmap_passes_ftjob_validate(rendered, tmp_path, request):
    name, objects = rendered
    w = workload(objects)
    # The JobSet variant mounts multi-node's ConfigMap with multi-node's env (bar MASTER_ADDR, which
    # validate does not resolve): one `ftjob validate` (seconds of imports) per distinct pair.
    key = json.dumps([one(objects, "ConfigMap")["data"],
                      {k: v for k, v in env_of(w.container).items() if k != "MASTER_ADDR"}], sort_keys=True)
    if key in _validated:
        pytest.skip(f"same spec and env as {_validated[key]}, validated there")
    _validated[key] = name
    pod = PodOnDisk(objects, tmp_path, _demo_model(request))
    (spec_file,) = [a for a in pod.args(pod.container["args"]) if a.endswith(".yaml")]
    out = subprocess.run([_ftjob(), "validate", spec_file, *pod.path_overrides()], capture_output=True,
                         text=True, timeout=300, env={**_clean_env(), **pod.env()})
    assert out.returncode == errors.OK, f"{name}: ftjob validate rejected the ConfigMap spec:\n{out.stdout}{out.stderr}"


def test_hub_id_in_the_mounted_cache_works_offline(tmp_path, request):
    """A model given as a Hub id resolves from the claim mounted at HF_HOME, with the Hub offline."""
    model = _demo_model(request)
    if model is None:
        pytest.skip("needs the demo_assets fixture (tests/conftest.py): a tiny local model")
    objects = render("overlays/single-node")
    pod = PodOnDisk(objects, tmp_path, model)
    env = pod.env()
    repo = Path(env["HF_HOME"]) / "hub" / "models--ftjob-test--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model.resolve(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (spec_file,) = [a for a in pod.args(pod.container["args"]) if a.endswith(".yaml")]
    overrides = pod.path_overrides()
    overrides[overrides.index(f"model.path={pod.local(pod.spec['model']['path'])}")] = "model.path=ftjob-test/tiny-gpt2"
    out = subprocess.run([_ftjob(), "validate", spec_file, *overrides], capture_output=True, text=True,
                         timeout=300, env={**_clean_env(), **env})
    assert out.returncode == errors.OK, f"the Hub id was not found in the mounted cache:\n{out.stdout}{out.stderr}"


# Small enough for two CPU processes in well under a minute, after the one-off DeepSpeed shm op build.
CPU_SIZES = ["--set", "resources.accelerator=cpu", "--set", "train.max_steps=2", "--set", "train.micro_batch=2",
             "--set", "train.grad_accum=1", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=1",
             "--set", "data.block_size=32", "--set", "data.workers=1", "--set", "resources.procs_per_node=1"]




def _run_manifest_locally(objects, tmp_path, request, env_overrides: dict[str, str],
                          database_after_s: float | None = None) -> tuple[PodOnDisk, str]:
    """The container's args and env as a local `ftjob` process. With `database_after_s`, the database
    appears only that long after the start (and once the process is seen waiting for it)."""
    model = _demo_model(request)
    if model is None:
        pytest.skip("needs the demo_assets fixture (tests/conftest.py): a tiny local model at .model")
    pod = PodOnDisk(objects, tmp_path, model, write_database=database_after_s is None)
    env = {**_clean_env(), **pod.env(completion_index=0), **env_overrides}
    cmd = [_ftjob(), *pod.args(pod.container["args"]), *pod.path_overrides(), *CPU_SIZES]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        if database_after_s is not None:
            database = pod.local(pod.spec["data"]["database"])
            time.sleep(database_after_s)
            # The process must be waiting, not gone (exit 2, no database) and not past the inputs.
            deadline = started + database_after_s + 60
            while not any(database.name in line or "wait" in line.lower() for line in list(lines)):
                assert proc.poll() is None, f"ftjob exited {proc.returncode} before the database existed:\n{''.join(lines)}"
                assert time.monotonic() < deadline, f"no line says what ftjob waits for:\n{''.join(lines)}"
                time.sleep(0.5)
            assert proc.poll() is None, f"ftjob exited {proc.returncode} while waiting:\n{''.join(lines)}"
            pod.write_database()
        proc.wait(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    log = f"$ {' '.join(cmd)}\n" + "".join(lines)[-12000:]
    assert proc.returncode == errors.OK, log
    assert (pod.run_dir / "final").is_dir(), f"no final/ in {pod.run_dir}\n{log}"
    return pod, log


@pytest.mark.slow
def test_single_node_manifest_waits_for_its_database(tmp_path, request):
    """The Job's args and env, as the container would get them, against an inputs claim whose
    database is copied only 10 s after the pod started: ftjob waits for it, then runs to a finished
    final/ (before --wait-for-inputs: exit 2 and a failed Job on the first apply)."""
    _run_manifest_locally(render("base"), tmp_path, request, {}, database_after_s=10)


@pytest.mark.parametrize("index", [0, 1])
def test_multinode_pod_env_places_the_node_and_reaches_the_launcher(index, monkeypatch, tmp_path):
    """Each pod's env, as the kubelet sets it for its completion index, read by ftjob's own node_info and
    turned into DeepSpeed's launcher command (the single-node manifest runs as a real process above)."""
    import base64

    from job import spec as spec_lib
    from job.cluster import node_info
    from job.rundir import RunPaths
    from job.train.launch import launcher_command

    objects = render("multinode")
    env = env_of(workload(objects).container, completion_index=index)
    for name in RANK_ENV | {"JOB_COMPLETION_INDEX", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = spec_lib.from_dict({**spec_of(objects), "resources": {"accelerator": "cuda"}})
    node = node_info(spec, gpu_count=2)
    assert (node.nnodes, node.node_rank, node.master_addr) == (int(env["NNODES"]), index, env["MASTER_ADDR"])
    cmd = launcher_command(RunPaths(tmp_path), node)
    assert f"--node_rank={index}" in cmd and f"--master_port={env['MASTER_PORT']}" in cmd
    layout = json.loads(base64.urlsafe_b64decode(cmd[4].removeprefix("--world_info=")))
    assert len(layout) == int(env["NNODES"]) and all(ids == [0, 1] for ids in layout.values())
