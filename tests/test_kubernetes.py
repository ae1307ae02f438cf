"""deploy/kubernetes: validated offline against the Kubernetes JSON schemas (kubernetes-validate ships them), and
checked for what the service needs: probes, drain timing, non-root read-only containers, the spool, the schema
Job, egress limits, settings that the service accepts. No cluster runs here."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service import gunicorn_conf, gunicorn_worker
from service.config import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests are for, and the newest whose schemas the package ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                yield path.name, document


def resources() -> dict[str, dict[str, Any]]:
    """The Kubernetes objects (not the kustomization), by kind."""
    found: dict[str, dict[str, Any]] = {}
    for _, document in documents():
        if document["kind"] != "Kustomization":
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


DELETE = object()


def validate(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    for document in yaml.safe_load_all((MANIFESTS / name).read_text()):
        validate(document, version)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "template", "spec", "containers", 0, "readinesProbe"), {"httpGet": {"path": "/readyz"}}),  # typo
        (("spec", "replicas"), "two"),
        (("spec", "template", "spec", "containers", 0, "name"), DELETE),  # required
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_validation_catches_a_broken_deployment(path: tuple[str | int, ...], value: Any) -> None:
    broken = copy.deepcopy(resources()["Deployment"])
    target: Any = broken
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, KUBERNETES_VERSIONS[0])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_expected_objects_are_there() -> None:
    assert set(resources()) == {
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }


def server_container() -> dict[str, Any]:
    [container] = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    container_: dict[str, Any] = container
    return container_


def test_probes_liveness_healthz_readiness_readyz() -> None:
    container = server_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # A kubelet probe must time out before the worker would block on it for long.
    assert container["readinessProbe"]["timeoutSeconds"] <= 5


def test_drain_fits_in_the_termination_grace_period() -> None:
    """preStop pause, then gunicorn's graceful drain, all before Kubernetes' SIGKILL."""
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    command = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert pause >= 5, "endpoints take a few seconds to be removed from the load balancers"
    assert gunicorn_conf.graceful_timeout > gunicorn_worker.DRAIN_MARGIN_SECONDS
    assert pause + gunicorn_conf.graceful_timeout < pod["terminationGracePeriodSeconds"]
    strategy = resources()["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    return str(users[-1])


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_containers_are_non_root_with_a_read_only_root(kind: str) -> None:
    pod = resources()[kind]["spec"]["template"]["spec"]
    user, group = dockerfile_user().split(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user
    assert str(pod["securityContext"]["runAsGroup"]) == group
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]


def test_the_writable_paths_are_volumes() -> None:
    """Read-only root: the spool (CMV_CDS_SPOOL_DIR) and /tmp (Prometheus multiprocess files) are mounted."""
    mounts = {mount["mountPath"]: mount["name"] for mount in server_container()["volumeMounts"]}
    spool_dir = resources()["ConfigMap"]["data"]["CMV_CDS_SPOOL_DIR"]
    assert any(spool_dir.startswith(path + "/") for path in mounts)
    assert "/tmp" in mounts
    volumes = {volume["name"] for volume in resources()["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts.values()) <= volumes


def pod_labels(kind: str) -> dict[str, str]:
    labels: dict[str, str] = resources()[kind]["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_service_pdb_and_hpa_target_the_server_pods() -> None:
    objects = resources()
    server = pod_labels("Deployment")
    assert selects(objects["Service"]["spec"]["selector"], server)
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert selects(objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], server)
    assert not selects(objects["Service"]["spec"]["selector"], pod_labels("Job")), "the Job gets no traffic"
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert objects["Deployment"]["spec"]["replicas"] >= 2


def test_network_policy_limits_egress_to_dns_the_database_and_fhir_servers() -> None:
    policy = resources()["NetworkPolicy"]["spec"]
    assert "Egress" in policy["policyTypes"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels("Deployment"))
    assert selects(policy["podSelector"]["matchLabels"], pod_labels("Job"))
    ports = sorted({port["port"] for rule in policy["egress"] for port in rule["ports"]})
    assert ports == [53, 443, 5432]
    for rule in policy["egress"]:
        assert rule["to"], "an egress rule without destinations would allow every host"


def test_the_schema_job_runs_migrate_with_the_owner_url() -> None:
    job = resources()["Job"]["spec"]["template"]["spec"]
    [container] = job["containers"]
    assert container["command"][:2] == ["cmv-cds", "migrate"]
    assert container["image"] == server_container()["image"]
    [url] = [env for env in container["env"] if env["name"] == "CMV_CDS_DATABASE_URL"]
    secret = resources()["Secret"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "migrate-database-url"}
    assert job["restartPolicy"] in ("OnFailure", "Never")


def test_configuration_comes_from_the_configmap_and_the_secret() -> None:
    """Every variable is a setting, and the service accepts the values (trusted issuers parsed)."""
    objects = resources()
    container = server_container()
    assert {source["configMapRef"]["name"] for source in container["envFrom"]} == {
        objects["ConfigMap"]["metadata"]["name"]
    }
    environ = dict(objects["ConfigMap"]["data"])
    for env in container["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == objects["Secret"]["metadata"]["name"]
        environ[env["name"]] = objects["Secret"]["stringData"][ref["key"]]
    fields = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert set(environ) <= fields
    settings = Settings.load(environ=environ)
    assert settings.require_auth is True
    assert settings.trusted_issuers
    assert settings.database_url.startswith("postgresql+psycopg://")
