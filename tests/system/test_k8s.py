"""The Kubernetes manifests, checked offline: no cluster, no API server.

Each kustomization under k8s/ is rendered by a small renderer below (the subset of kustomize the
manifests use; `kubectl kustomize`, where installed, must agree with it), every object is validated
against the Kubernetes OpenAPI schemas (kubernetes_validate), and the parts that must agree with the
job itself are checked against it: exit codes against job.errors, the spec in the ConfigMap against
`ftjob validate`, the env names against what `ftjob run` reads, and finally the container's command
and env are run as a local process with the volumes mapped to temporary directories.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from job import errors

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))

# The oldest Kubernetes the manifests target (podFailurePolicy is GA from 1.31) and the newest the
# schema package knows.
K8S_VERSIONS = ["1.31", kubernetes_validate.latest_version()]

# The multi-node env contract of `ftjob run` (see DESIGN.md and the CLI): rank and rendezvous.
RANK_ENV = {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE"}
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


# ------------------------------------------------------------------ a tiny kustomize
#
# Supports exactly what k8s/ uses: resources (files and directories), configMapGenerator (files,
# behavior create/replace/merge), strategic-merge patches (file or inline, target taken from the
# patch or given), images, and the content-hash suffix on generated ConfigMaps with the references
# to them rewritten. Anything else in a kustomization.yaml is an error, so the renderer can't
# silently drift from what kustomize would do.

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "images", "patches"}
# Strategic-merge keys of the Kubernetes lists the manifests patch; other lists are replaced whole.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


class Rendered:
    def __init__(self, objects: list[dict], generated: set[str]):
        self.objects, self.generated = objects, generated


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl apply -k directory` would create, in resource order."""
    rendered = _render(Path(directory))
    return _apply_name_hashes(rendered)


def _render(root: Path) -> Rendered:
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - SUPPORTED_KEYS
    assert not unknown, f"{root}/kustomization.yaml uses {unknown}, which the test renderer does not implement"
    objects: list[dict] = []
    generated: set[str] = set()
    for entry in kustomization.get("resources", []):
        path = root / entry
        if path.is_dir():
            sub = _render(path)
            objects += sub.objects
            generated |= sub.generated
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    for gen in kustomization.get("configMapGenerator", []):
        data = {}
        for item in gen.get("files", []):
            key, _, file = item.rpartition("=")
            data[key or Path(file).name] = (root / file).read_text(encoding="utf-8")
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        behavior = gen.get("behavior", "create")
        existing = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            assert not existing, f"{root}: ConfigMap {gen['name']} already exists (use behavior: replace/merge)"
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                            "data": data})
            generated.add(gen["name"])
        else:
            assert len(existing) == 1, f"{root}: behavior {behavior} but no ConfigMap {gen['name']} to act on"
            if behavior == "replace":
                existing[0]["data"] = data
            else:
                existing[0]["data"].update(data)
    for entry in kustomization.get("patches", []):
        text = (root / entry["path"]).read_text(encoding="utf-8") if "path" in entry else entry["patch"]
        patch = yaml.safe_load(text)
        target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        hits = [o for o in objects
                if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        assert hits, f"{root}: patch target {target} matches nothing"
        for obj in hits:
            merged = strategic_merge(obj, {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")})
            obj.clear()
            obj.update(merged)
    for image in kustomization.get("images", []):
        for container in _containers(objects):
            name, tag, digest = _split_image(container["image"])
            if name == image["name"]:
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
                digest = image.get("digest", digest)
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return Rendered(objects, generated)


def strategic_merge(base, patch, field: str | None = None):
    """Kubernetes strategic merge for the list keys in MERGE_KEYS; `null` in the patch deletes."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    merge_key = MERGE_KEYS.get(field or "")
    if merge_key and isinstance(base, list) and isinstance(patch, list):
        out = copy.deepcopy(base)
        added = []
        for item in patch:
            for i, old in enumerate(out):
                if old.get(merge_key) == item.get(merge_key):
                    out[i] = strategic_merge(old, item)
                    break
            else:
                added.append(copy.deepcopy(item))
        return added + out  # kustomize puts new items first
    return copy.deepcopy(patch)


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    image, _, digest = image.partition("@")
    name, tag = image, None
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
    return name, tag, digest or None


def _pod_specs(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Job", "Deployment", "StatefulSet")]


def _containers(objects: list[dict]) -> list[dict]:
    return [c for spec in _pod_specs(objects) for c in spec.get("containers", []) + spec.get("initContainers", [])]


def _apply_name_hashes(rendered: Rendered) -> list[dict]:
    """Generated ConfigMaps get a content-hash suffix (not kustomize's hash function, same effect),
    and the pod templates that reference them are rewritten."""
    renames = {}
    for obj in rendered.objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] in rendered.generated:
            digest = hashlib.sha256(json.dumps(obj["data"], sort_keys=True).encode()).hexdigest()[:10]
            renames[obj["metadata"]["name"]] = obj["metadata"]["name"] = f"{obj['metadata']['name']}-{digest}"
    for spec in _pod_specs(rendered.objects):
        for volume in spec.get("volumes", []):
            refs = [volume.get("configMap")] + [s.get("configMap") for s in volume.get("projected", {}).get("sources", [])]
            for ref in filter(None, refs):
                ref["name"] = renames.get(ref["name"], ref["name"])
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = renames.get(ref["name"], ref["name"])
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref:
                    ref["name"] = renames.get(ref["name"], ref["name"])
    return rendered.objects


# ------------------------------------------------------------------ helpers over rendered objects


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def job_container(objects: list[dict]) -> dict:
    containers = one(objects, "Job")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Job runs exactly one container (ftjob)"
    return containers[0]


def mounts(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(volumeMount, volume) pairs of the ftjob container."""
    pod = one(objects, "Job")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return [(m, volumes[m["name"]]) for m in job_container(objects)["volumeMounts"]]


def spec_mount(objects: list[dict]) -> tuple[str, dict]:
    """Where the spec ConfigMap is mounted, and that ConfigMap."""
    cm = one(objects, "ConfigMap")
    hits = [m for m, v in mounts(objects) if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    assert len(hits) == 1, "the spec ConfigMap is mounted exactly once"
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


def is_multinode(objects: list[dict]) -> bool:
    return one(objects, "Job")["spec"].get("completionMode") == "Indexed"


def under(path: str, mount_path: str) -> bool:
    return path == mount_path or path.startswith(mount_path.rstrip("/") + "/")


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / request.param)


# ------------------------------------------------------------------ the layout itself


def test_layout_has_single_and_multinode_and_overlays():
    assert {"base", "multinode"} <= set(KUSTOMIZATIONS)
    assert any(k.startswith("overlays/") for k in KUSTOMIZATIONS), "a place for users to set image, spec, sizes"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(kustomization):
    """The renderer above is only trusted because real kustomize gives the same objects."""
    kubectl = _which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed; the renderer is checked where it is")
    out = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    mine = render(K8S / kustomization)
    assert _canonical(mine) == _canonical(theirs)


def _which(name: str) -> str | None:
    from shutil import which
    return which(name)


def _canonical(objects: list[dict]) -> list:
    """Order-insensitive form with the generated names' hash suffixes removed."""
    text = json.dumps(objects, sort_keys=True)
    for obj in objects:
        hashed = re.fullmatch(r"(.+)-[a-z0-9]{10}", obj["metadata"]["name"])
        if obj["kind"] == "ConfigMap" and hashed:
            text = text.replace(json.dumps(hashed.group(0)), json.dumps(hashed.group(1)))

    def sort_lists(node, field=None):
        if isinstance(node, dict):
            return {k: sort_lists(v, k) for k, v in node.items()}
        if isinstance(node, list):
            items = [sort_lists(v) for v in node]
            key = MERGE_KEYS.get(field or "")
            return sorted(items, key=lambda i: str(i.get(key))) if key else items
        return node

    return sorted((sort_lists(o) for o in json.loads(text)), key=lambda o: (o["kind"], o["metadata"]["name"]))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_match_kubernetes_schema(rendered, version):
    name, objects = rendered
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: {e}")


# ------------------------------------------------------------------ pod: security, shm, signals, GPUs


def test_pod_security_is_restricted(rendered):
    name, objects = rendered
    pod = one(objects, "Job")["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["containers"] + pod.get("initContainers", []):
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"]["drop"] == ["ALL"]
        assert not csc.get("capabilities", {}).get("add")
        assert not csc.get("privileged")
        assert csc.get("runAsUser", sc["runAsUser"]) > 0


def test_pod_runs_as_the_image_user(rendered):
    """runAsUser/runAsGroup/fsGroup are the uid the image creates, so the volumes are writable."""
    _, objects = rendered
    sc = one(objects, "Job")["spec"]["template"]["spec"]["securityContext"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    uid, _, gid = user.partition(":")
    assert (sc["runAsUser"], sc.get("runAsGroup")) == (int(uid), int(gid or uid))
    assert sc.get("fsGroup") == int(gid or uid), "fsGroup makes the PVC writable for the job's user"


def test_shm_is_memory_backed(rendered):
    _, objects = rendered
    shm = [(m, v) for m, v in mounts(objects) if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1, "NCCL needs more than the container's 64 MiB /dev/shm"
    assert shm[0][1]["emptyDir"]["medium"] == "Memory"


def test_grace_period_covers_a_checkpoint(rendered):
    """The launcher waits 30 s for workers after SIGTERM; the checkpoint save and ftjob's own exit come
    on top. The pod default (30 s) would SIGKILL before the checkpoint is complete."""
    _, objects = rendered
    assert one(objects, "Job")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 90


def test_gpus_are_requested(rendered):
    _, objects = rendered
    gpus = job_container(objects)["resources"]["limits"]["nvidia.com/gpu"]
    assert isinstance(gpus, int) and gpus >= 1


def test_pod_failure_policy_uses_ftjob_exit_codes(rendered):
    _, objects = rendered
    job = one(objects, "Job")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy requires Never"
    container = job_container(objects)["name"]
    by_code = {}
    conditions = {}
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In"
            assert codes.get("containerName") == container
            for code in codes["values"]:
                assert code not in by_code, f"exit code {code} in two rules: the first would win silently"
                by_code[code] = rule["action"]
        for cond in rule.get("onPodConditions", []):
            conditions[(cond["type"], cond["status"])] = rule["action"]
    assert by_code[errors.BAD_INPUT] == "FailJob", "bad spec/data/model: retrying fails the same way"
    assert by_code[errors.PREEMPTED] == "Ignore", "preempted with a checkpoint: restart, don't count"
    assert by_code.get(errors.DIVERGED) == "FailJob"
    # Everything else (a crash, LOCKED) is a counted retry: it may be transient.
    assert set(by_code) == {errors.BAD_INPUT, errors.PREEMPTED, errors.DIVERGED}
    assert conditions[("DisruptionTarget", "True")] == "Ignore"
    # A replacement pod must not start while the old one still holds the run directory's lock.
    assert job["spec"].get("podReplacementPolicy", "Failed") == "Failed"


# ------------------------------------------------------------------ container: image, args, spec


def test_image_is_set_by_kustomize(rendered):
    name, objects = rendered
    images = []
    root = K8S / name
    while True:  # the nearest kustomization (this one or a base below it) that sets `images`
        k = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
        if k.get("images"):
            images = k["images"]
            break
        (sub,) = [r for r in k.get("resources", []) if (root / r).is_dir()]
        root = (root / sub).resolve()
    (image,) = [i for i in images if i["name"] == "ftjob"]
    assert job_container(objects)["image"] == f"{image['newName']}:{image['newTag']}"
    if name == "base":
        assert job_container(objects)["image"] == "ftjob:latest"


def test_container_runs_the_mounted_spec(rendered):
    _, objects = rendered
    container = job_container(objects)
    mount_path, cm = spec_mount(objects)
    (key,) = cm["data"]
    assert "command" not in container, "the image's ENTRYPOINT (ftjob) must stay the command"
    assert container["args"] == ["run", f"{mount_path}/{key}"]


def test_spec_paths_are_on_the_volumes(rendered):
    """data and model on the (read-only) input volume, output_dir on a writable claim."""
    _, objects = rendered
    spec = spec_of(objects)
    pairs = mounts(objects)

    def mount_for(path):
        hits = [(m, v) for m, v in pairs if under(path, m["mountPath"])]
        assert hits, f"{path} is on no mounted volume"
        return max(hits, key=lambda h: len(h[0]["mountPath"]))

    for path in (spec["data"]["database"], spec["model"]["path"]):
        _, volume = mount_for(path)
        assert "persistentVolumeClaim" in volume
    m, volume = mount_for(spec["output_dir"])
    assert "persistentVolumeClaim" in volume and not m.get("readOnly"), "runs are written to a PVC"


# ------------------------------------------------------------------ multi-node wiring


def test_storage_access_modes_fit_the_node_count(rendered):
    _, objects = rendered
    claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claims
    wanted = "ReadWriteMany" if is_multinode(objects) else "ReadWriteOnce"
    for claim in claims:
        assert claim["spec"]["accessModes"] == [wanted], claim["metadata"]["name"]


def test_single_node_sets_no_rank_env(rendered):
    _, objects = rendered
    if is_multinode(objects):
        pytest.skip("multi-node")
    assert not set(env_of(job_container(objects))) & RANK_ENV
    assert not any(o["kind"] == "Service" for o in objects)


def test_multinode_is_an_indexed_job_with_stable_names(rendered):
    _, objects = rendered
    if not is_multinode(objects):
        pytest.skip("single node")
    job = one(objects, "Job")
    service = one(objects, "Service")
    pod = job["spec"]["template"]["spec"]
    container = job_container(objects)
    env = env_of(container)
    job_name, svc_name = job["metadata"]["name"], service["metadata"]["name"]

    nodes = int(env["NNODES"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes >= 2
    # Pods are `<job>-<index>.<service>` only with a headless Service named like the subdomain.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job_name}
    assert pod["subdomain"] == svc_name
    assert env["MASTER_ADDR"] == f"{job_name}-0.{svc_name}"
    assert int(env["MASTER_PORT"]) in {p["port"] for p in service["spec"].get("ports", [])}
    (rank,) = [e for e in container["env"] if e["name"] == "NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    assert env_of(container, completion_index=1)["NODE_RANK"] == "1"


def test_rank_env_names_are_the_ones_ftjob_reads(rendered):
    """A misspelt env name is silently ignored by the job: every rank variable the manifests set
    must be in the contract and read somewhere in job/."""
    _, objects = rendered
    names = set(env_of(job_container(objects))) - {"HF_HUB_OFFLINE"}
    assert names <= RANK_ENV, f"not in ftjob's env contract: {names - RANK_ENV}"
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "job").rglob("*.py"))
    unread = {n for n in names if f'"{n}"' not in sources and f"'{n}'" not in sources}
    assert not unread, f"set by the manifest but read nowhere in job/: {sorted(unread)}"


# ------------------------------------------------------------------ the spec and the command, for real


def _ftjob() -> str:
    exe = Path(sys.executable).with_name("ftjob")
    if exe.exists():
        return str(exe)
    found = _which("ftjob")
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
    and one empty text (the job drops those)."""
    words = ("женщина книга город река время человек дом слово мир жизнь "
             "the of and to in is was for on with as by at from").split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(f'CREATE TABLE "{table}" (title TEXT, url TEXT, "{column}" TEXT)')
        texts = [" ".join(words[(i * 7 + j * 3 + j * j) % len(words)] for j in range(80)) + "."
                 for i in range(rows)]
        texts[3] = ""
        db.executemany(f'INSERT INTO "{table}" VALUES (?, ?, ?)',
                       [(f"page {i}", f"https://example.invalid/{i}", t) for i, t in enumerate(texts)])


class PodOnDisk:
    """The pod's filesystem view, with every volume mount mapped to a directory under `root`:
    the spec ConfigMap written out, the spec's database and model created where the spec points."""

    def __init__(self, objects: list[dict], root: Path, model: Path | None):
        self.root = root
        self.mounts = [m["mountPath"] for m, _ in mounts(objects)]
        mount_path, cm = spec_mount(objects)
        for key, text in cm["data"].items():
            self.local(f"{mount_path}/{key}").parent.mkdir(parents=True, exist_ok=True)
            self.local(f"{mount_path}/{key}").write_text(text, encoding="utf-8")
        spec = spec_of(objects)
        self.spec = spec
        _write_database(self.local(spec["data"]["database"]), spec["data"]["table"],
                        spec["data"].get("text_column", "text"))
        model_dir = self.local(spec["model"]["path"])
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        if model is not None:
            model_dir.symlink_to(model.resolve(), target_is_directory=True)
        else:  # enough of a model directory for a spec check (no weights)
            from transformers import GPT2Config
            GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=64).save_pretrained(model_dir)
        self.local(spec["output_dir"]).mkdir(parents=True, exist_ok=True)
        self.run_dir = self.local(spec["output_dir"]) / spec["name"]

    def local(self, pod_path: str) -> Path:
        mount = max((m for m in self.mounts if under(pod_path, m)), key=len, default=None)
        assert mount, f"{pod_path} is not on a mounted volume"
        return self.root / mount.lstrip("/") / os.path.relpath(pod_path, mount)

    def args(self, args: list[str]) -> list[str]:
        return [str(self.local(a)) if a.startswith("/") else a for a in args]

    def path_overrides(self) -> list[str]:
        s = self.spec
        return ["--set", f"data.database={self.local(s['data']['database'])}",
                "--set", f"model.path={self.local(s['model']['path'])}",
                "--set", f"output_dir={self.local(s['output_dir'])}"]


def _clean_env() -> dict[str, str]:
    """This process's env without rank/scheduler variables that would leak into the job."""
    drop = RANK_ENV | {"JOB_COMPLETION_INDEX", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}


def test_spec_in_configmap_passes_ftjob_validate(rendered, tmp_path, request):
    name, objects = rendered
    pod = PodOnDisk(objects, tmp_path, _demo_model(request))
    container = job_container(objects)
    (spec_file,) = [a for a in pod.args(container["args"]) if a.endswith(".yaml")]
    out = subprocess.run([_ftjob(), "validate", spec_file, *pod.path_overrides()], capture_output=True,
                         text=True, timeout=300, env={**_clean_env(), **env_of(container)})
    assert out.returncode == errors.OK, f"{name}: ftjob validate rejected the ConfigMap spec:\n{out.stdout}{out.stderr}"


# Small enough for two CPU processes in well under a minute, after the one-off DeepSpeed shm op build.
CPU_SIZES = ["--set", "resources.accelerator=cpu", "--set", "train.max_steps=2", "--set", "train.micro_batch=2",
             "--set", "train.grad_accum=1", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=1",
             "--set", "data.block_size=32", "--set", "data.workers=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_manifest_locally(objects, tmp_path, request, env_overrides: dict[str, str]) -> tuple[PodOnDisk, str]:
    model = _demo_model(request)
    if model is None:
        pytest.skip("needs the demo_assets fixture (tests/conftest.py): a tiny local model at .model")
    pod = PodOnDisk(objects, tmp_path, model)
    container = job_container(objects)
    env = {**_clean_env(), **env_of(container, completion_index=0), **env_overrides}
    cmd = [_ftjob(), *pod.args(container["args"]), *pod.path_overrides(), *CPU_SIZES]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    log = f"$ {' '.join(cmd)}\n{out.stdout[-6000:]}{out.stderr[-6000:]}"
    assert out.returncode == errors.OK, log
    assert (pod.run_dir / "final").is_dir(), f"no final/ in {pod.run_dir}\n{log}"
    return pod, log


@pytest.mark.slow
def test_single_node_manifest_runs_as_a_local_process(tmp_path, request):
    """The Job's args and env, as the container would get them, run `ftjob` to completion."""
    _run_manifest_locally(render(K8S / "base"), tmp_path, request, {})


@pytest.mark.slow
def test_multinode_manifest_env_runs_as_a_local_process(tmp_path, request):
    """Pod index 0's env with the node count cut to 1: the rank variables are ones ftjob accepts.
    The cluster DNS name of the master does not resolve here, so loopback stands in for it."""
    objects = render(K8S / "multinode")
    env = env_of(job_container(objects), completion_index=0)
    assert env["NODE_RANK"] == "0"
    port = str(_free_port())
    _, log = _run_manifest_locally(objects, tmp_path, request,
                                   {"NNODES": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    # The port exists only in the env, so seeing it in the launch line shows the env was read.
    assert re.search(rf"\b{port}\b", log), f"MASTER_PORT={port} from the env did not reach the launcher\n{log}"
