"""deploy/k8s against configs/compose.yaml: one vLLM Deployment and Service per expert, a router that reads
the same experts with shared state in Redis, and secrets only by reference."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from router.compose import (
    REDIS_IMAGE,
    VLLM_IMAGE,
    expected_endpoint,
    router_drain_s,
    service_name,
    vllm_args,
)
from router.config import RouterConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


@pytest.fixture(scope="module")
def compose_config() -> RouterConfig:
    return load_config(ROOT / "configs" / "compose.yaml", check_env=False)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    first: dict[str, Any] = containers[0]
    return first


def served_config(objects: dict[tuple[str, str], dict[str, Any]]) -> RouterConfig:
    text = objects[("ConfigMap", "moe-router-config")]["data"]["router.yaml"]
    return parse_config(yaml.safe_load(text), check_env=False)


def prestop_sleep_s(c: dict[str, Any]) -> int:
    """The seconds a container's preStop hook sleeps: an exec ``sleep N`` or the native ``sleep: {seconds: N}``."""
    pre_stop = c.get("lifecycle", {}).get("preStop")
    assert pre_stop, f"{c['name']} has no lifecycle.preStop hook"
    if "sleep" in pre_stop:
        seconds = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert len(command) == 2 and command[0] in ("sleep", "/bin/sleep"), command
        seconds = command[1]
    assert isinstance(seconds, int | str) and str(seconds).isdigit(), seconds
    return int(seconds)


def grace_period_s(deployment: dict[str, Any]) -> int:
    """The pod's terminationGracePeriodSeconds; Kubernetes' default (30) when unset."""
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert isinstance(grace, int)
    return grace


def test_kustomization_lists_every_manifest_but_the_example_secret_and_the_one_off_loader() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))["resources"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml", "gate-loader.yaml"}
    assert set(listed) == files


def test_the_gate_volume_can_be_filled_and_the_routers_keys_are_required(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    router = objects[("Deployment", "router")]
    gate = next(v for v in router["spec"]["template"]["spec"]["volumes"] if v["name"] == "gate")
    claim = objects[("PersistentVolumeClaim", gate["persistentVolumeClaim"]["claimName"])]
    # The routers mount it read-only; the loader pod writes to it, so the claim must allow writes from a pod.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    loader = yaml.safe_load((K8S / "gate-loader.yaml").read_text(encoding="utf-8"))
    (mount,) = loader["spec"]["containers"][0]["volumeMounts"]
    assert not mount.get("readOnly") and loader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        gate["persistentVolumeClaim"]["claimName"]
    # moe serve refuses the config without these variables: a missing Secret key must stop the pod, not crash it.
    refs = [e["valueFrom"]["secretKeyRef"] for e in container(router)["env"] if "valueFrom" in e]
    assert len(refs) == 3 and not any(r.get("optional") for r in refs)


def test_the_router_serves_the_compose_configs_experts_with_redis_state(
    objects: dict[tuple[str, str], dict[str, Any]], compose_config: RouterConfig
) -> None:
    served = served_config(objects)
    assert served.experts == compose_config.experts
    # The same gate, but for where the artifact sits: absolute in the ConfigMap (the next test says why).
    assert served.gate.model_copy(update={"artifact": compose_config.gate.artifact}) == compose_config.gate
    assert served.fallback == compose_config.fallback
    assert served.state.backend == "redis"
    router = objects[("Deployment", "router")]
    c = container(router)
    env = {e["name"]: e for e in c["env"]}
    assert env["MOE_CONFIG"]["value"] == "/app/configs/router.yaml"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/app/configs"] == "config" and "/app/artifacts/gate" in mounts
    # The state URL, client keys and admin key come from the Secret, never inline.
    for name in (served.state.url_env, served.security.api_keys_env, served.security.admin_key_env):
        assert name is not None and env[name]["valueFrom"]["secretKeyRef"]["name"] == "moe-secrets"


def _as_kubelet_mounts_it(configmap: dict[str, Any], folder: Path) -> None:
    """The ConfigMap's keys in ``folder`` the way the kubelet's volume lays them out: each key a symlink through
    ``..data``, itself a symlink to a timestamped folder holding the files (swapped whole on an update)."""
    stamped = folder / "..2025_01_01_00_00_00.000000001"
    stamped.mkdir(parents=True)
    for key, text in configmap["data"].items():
        (stamped / key).write_text(text, encoding="utf-8")
        (folder / key).symlink_to(Path("..data") / key)
    (folder / "..data").symlink_to(stamped.name)


def test_the_router_loads_the_gate_from_the_volume_mounted_for_it(
        objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    # A ConfigMap volume holds the file as a symlink into a timestamped folder; wherever the loader resolved the
    # gate's path from (it once followed the link, and `../artifacts/gate` was /app/configs/artifacts/gate, no
    # gate, and `moe serve` refused to start), it must land on the gate volume. Replayed under tmp_path standing
    # for the container's root.
    router = objects[("Deployment", "router")]
    c = container(router)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: PurePosixPath(m["mountPath"]) for m in c["volumeMounts"]}
    config_path = PurePosixPath(env["MOE_CONFIG"])
    assert config_path.parent == mounts["config"]
    root = tmp_path / "root"
    _as_kubelet_mounts_it(objects[("ConfigMap", "moe-router-config")], root / mounts["config"].relative_to("/"))
    config = load_config(root / config_path.relative_to("/"), check_env=False)
    artifact = config.resolve(config.gate.artifact)
    seen = PurePosixPath("/", artifact.relative_to(root)) if artifact.is_relative_to(root) else PurePosixPath(artifact)
    assert seen == mounts["gate"], f"the router would look for its gate at {seen}, not on the moe-gate volume"


def test_the_router_runs_as_the_images_user_on_a_read_only_root(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    c = container(objects[("Deployment", "router")])
    context = c["securityContext"]
    # The Dockerfile's user, by number: the kubelet cannot check runAsNonRoot against the image's `USER moe`.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = re.search(r"useradd .*--uid (\d+) (\w+)", dockerfile)
    assert uid is not None and re.search(rf"^USER {uid.group(2)}$", dockerfile, re.M)
    assert context["runAsNonRoot"] is True and context["runAsUser"] == int(uid.group(1)) != 0
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    # Read-only root: no feedback file (Redis holds it), and what is written (onnxruntime's cache under
    # $HOME/.cache, /tmp) lands on emptyDirs.
    assert context["readOnlyRootFilesystem"] is True
    assert served_config(objects).state.backend == "redis"
    volumes = {v["name"]: v for v in objects[("Deployment", "router")]["spec"]["template"]["spec"]["volumes"]}
    writable = {m["mountPath"] for m in c["volumeMounts"]
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]}
    assert {"/tmp", f"/home/{uid.group(2)}/.cache"} <= writable


def test_router_runs_several_ready_checked_replicas_behind_a_service(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    router = objects[("Deployment", "router")]
    assert router["spec"]["replicas"] >= 2
    # The tag docs/scaling.md builds and pushes: the project's version.
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert version is not None and container(router)["image"] == f"moe-router:{version.group(1)}"
    c = container(router)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    port = served_config(objects).service.port
    assert {"name": "http", "containerPort": port} in c["ports"]
    assert objects[("Service", "router")]["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    assert ("Deployment", "redis") in objects and ("Service", "redis") in objects


def test_router_drains_its_requests_before_it_is_killed(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    # The pod leaves the endpoints as preStop starts; SIGTERM follows it, and the router then drains requests that
    # may each still be sending their body, then run to fallback.deadline_s, then write their last bytes
    # (router_drain_s). The grace period counts from the preStop's start and must outlast both.
    router = objects[("Deployment", "router")]
    drain = router_drain_s(served_config(objects))
    pre_stop = prestop_sleep_s(container(router))
    assert 3 <= pre_stop <= 30, "a few seconds for endpoint removal to reach every proxy, not a drain of its own"
    assert grace_period_s(router) >= pre_stop + drain + 10


def test_experts_leave_the_service_before_sigterm_with_time_to_drain(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    # A short preStop sleep takes the pod out of the Service's endpoints before SIGTERM, so new connections go to
    # the other replicas; at SIGTERM vLLM drains what is generating for --shutdown-timeout (without it, it aborts),
    # which covers the longest the router may read one answer (a stream runs to the request's deadline, a plain
    # call to timeout_s), and the grace period covers the sleep and the drain.
    served = served_config(objects)
    vllm = [e for e in served.experts if e.type == "vllm"]
    assert vllm
    for expert in vllm:
        deployment = objects[("Deployment", service_name(expert))]
        longest = max(expert.timeout_s, served.fallback.deadline_s)
        args = container(deployment)["args"]
        drain = int(args[args.index("--shutdown-timeout") + 1])
        pre_stop = prestop_sleep_s(container(deployment))
        assert 3 <= pre_stop <= 30, expert.name
        assert drain >= longest, expert.name
        assert grace_period_s(deployment) >= pre_stop + drain + 5, expert.name


def test_one_gpu_vllm_deployment_and_service_per_expert(
    objects: dict[tuple[str, str], dict[str, Any]], compose_config: RouterConfig
) -> None:
    vllm = [e for e in compose_config.experts if e.type == "vllm"]
    deployments = {n for k, n in objects if k == "Deployment"} - {"router", "redis"}
    assert deployments == {service_name(e) for e in vllm}
    for expert in vllm:
        name = service_name(expert)
        deployment, service = objects[("Deployment", name)], objects[("Service", name)]
        c = container(deployment)
        assert c["image"] == VLLM_IMAGE
        # The flags moe compose gives the same expert, the memory share written out (no variables in k8s).
        assert c["args"] == vllm_args(expert, gpu_memory_utilization="0.90",
                                      deadline_s=served_config(objects).fallback.deadline_s)
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        # A rollout must not wait for a spare GPU: the old pod goes first (the router falls back meanwhile).
        assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                                  "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}, name
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in volumes
        # The expert's endpoint host and port are this Service's name and port.
        assert expert.endpoint == expected_endpoint(expert)
        assert service["spec"]["ports"][0]["port"] == 8000
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert ("PersistentVolumeClaim", "hf-cache") in objects


def test_no_real_secret_is_committed(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = objects[("Secret", "moe-secrets")]
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, key


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_builds_the_kustomization(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """``kubectl kustomize`` is the offline half of ``kubectl apply -k`` (a dry run needs an API server)."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout) if d}
    # the example secret and the one-off gate loader are applied by hand
    assert built == set(objects) - {("Secret", "moe-secrets"), ("Pod", "moe-gate-loader")}


def test_redis_keeps_the_feedback_it_holds(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    # The served config keeps feedback in Redis (state.backend: redis), so Redis must persist it.
    served = served_config(objects)
    assert served.feedback.enabled and served.state.backend == "redis"
    redis = objects[("Deployment", "redis")]
    c = container(redis)
    assert c["image"] == REDIS_IMAGE  # the release the compose profile runs (and its docker test checks)
    assert c["args"][:4] == ["--appendonly", "yes", "--dir", "/data"]
    # Redis evicts (only keys with a lifetime, never the verdicts) before the container's memory limit is hit.
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert args["--maxmemory-policy"] == "volatile-ttl"
    maxmemory_mb, limit = int(args["--maxmemory"].removesuffix("mb")), c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and maxmemory_mb < 0.8 * 1024 * int(limit.removesuffix("Gi"))
    assert c["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    claim = redis["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert redis["spec"]["strategy"] == {"type": "Recreate"}  # one pod at a time on a ReadWriteOnce volume


def test_redis_takes_a_password_and_only_the_routers(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Redis holds clients' remembered queries and the state that steers every router: it had no password and
    any pod in the cluster could reach it (the redis-url's password then did nothing: redis-py sends it, and a
    Redis without one accepts the connection anyway)."""
    c = container(objects[("Deployment", "redis")])
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": "moe-secrets", "key": "redis-password"}
    assert "grep -q PONG" in c["readinessProbe"]["exec"]["command"][-1]  # an error reply (NOAUTH) is not ready
    secret = objects[("Secret", "moe-secrets")]["stringData"]
    assert f":{secret['redis-password']}@redis:6379" in secret["redis-url"]
    policy = objects[("NetworkPolicy", "redis")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    router = objects[("Deployment", "router")]["spec"]["template"]["metadata"]["labels"]
    [rule] = policy["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [{"app.kubernetes.io/name": "router"}]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= router.items()


def test_http_probes_give_a_loaded_server_time_to_answer(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Kubernetes' default probe timeout is 1 s, where compose's healthchecks allow 10: a router busy at full load,
    or a vLLM server mid-batch, would fail probes it answers a moment later and leave the Service for nothing."""
    probes = [(name, kind, probe) for (k, name), obj in objects.items() if k == "Deployment"
              for kind, probe in container(obj).items() if kind.endswith("Probe") and "httpGet" in probe]
    assert len(probes) >= 8
    assert all(probe.get("timeoutSeconds", 1) >= 5 for _, _, probe in probes), probes


def test_the_router_has_a_cpu_limit_its_encoder_sizes_its_threads_to(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Without a CPU limit there is no quota to read (router.encoders.usable_cores), and the encoder sized its
    threads to half the node's cores for a pod scheduled for one."""
    resources = container(objects[("Deployment", "router")])["resources"]
    limit, request = float(resources["limits"]["cpu"]), float(resources["requests"]["cpu"])
    assert 1 <= request <= limit <= 4

