"""The deployment files, checked offline with the tools that read them.

compose.yaml by Debian's ``docker-compose config``; deploy/k8s/ by kubernetes-validate
against a pinned Kubernetes version (strict: an unknown field fails); the Prometheus
rules by ``promtool check rules`` and ``promtool test rules``. No Docker daemon and no
cluster run here, so the image is not built: the Dockerfile is checked for what the
rest relies on (a non-root user, the readiness healthcheck, the pinned llama.cpp).
`make test` installs promtool and docker-compose (target deploy-tools).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"
ADMIN_KEY = "k" * 32


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `make test` installs it (target deploy-tools)")
    return found


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``docker-compose`` on the repo's file; an empty env file, so that a user's .env in
    the checkout does not change what is checked."""
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return subprocess.run(
            [tool("docker-compose"), "--env-file", empty.name, "-f", str(ROOT / "compose.yaml"),
             *args],
            capture_output=True, text=True, cwd=ROOT, check=False,
            env={"LOCKGATE_AUTH__ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"} if env is None
            else env,
        )  # fmt: skip


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def kind(name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if (d["kind"], d["metadata"]["name"]) == (name, "lockgate")]
    return doc


# -- compose ------------------------------------------------------------------


def test_compose_file_is_valid_with_every_profile() -> None:
    done = compose("--profile", "ollama", "--profile", "gpu", "config")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert {"gateway-1", "gateway-2", "lb", "redis", "llama-server", "prometheus", "grafana"} <= (
        set(services)
    )
    assert services["ollama"]["profiles"] == ["ollama"]
    assert services["vllm"]["profiles"] == ["gpu"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "--appendonly" in services["redis"]["command"]
    # Both replicas: one config, the shared Redis, a stop grace that covers the drain.
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert gateway["environment"]["LOCKGATE_REDIS_URL"].startswith("redis://redis:")
        assert float(gateway["stop_grace_period"].rstrip("s")) > drain_seconds()


def test_compose_refuses_to_start_without_an_admin_key() -> None:
    done = compose("config", "-q", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "LOCKGATE_AUTH__ADMIN_KEY" in done.stderr


def test_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a service with a misspelt key is refused."""
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x:\n    image: redis\n    restrat: always\n")
    done = subprocess.run(
        [tool("docker-compose"), "-f", str(broken), "config", "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "restrat" in done.stderr


def test_prometheus_in_compose_scrapes_both_replicas() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "lockgate"  # the alerts' `up{job="lockgate"}`
    assert job["static_configs"][0]["targets"] == ["gateway-1:8000", "gateway-2:8000"]


# -- the gateway's config, as compose and Kubernetes ship it --------------------


def drain_seconds() -> float:
    return load_settings(ROOT / "configs" / "replicas.yaml", {}).server.drain_seconds


def test_replicas_config_is_valid_and_the_configmap_carries_it_verbatim() -> None:
    settings = load_settings(
        ROOT / "configs" / "replicas.yaml",
        {"LOCKGATE_AUTH__ADMIN_KEY": ADMIN_KEY, "LOCKGATE_REDIS_URL": "redis://redis:6379/0"},
    )
    assert settings.redis_url is not None and settings.server.host == "0.0.0.0"
    (configmap,) = [d for _, d in manifests() if d["kind"] == "ConfigMap"]
    assert configmap["data"]["config.yaml"] == (ROOT / "configs" / "replicas.yaml").read_text()


# -- Kubernetes -----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_validate_strictly_against_pinned_kubernetes(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    deployment = kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_deployment_probes_and_termination_cover_the_drain() -> None:
    pod = kind("Deployment")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health/live"
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The grace period counts from the preStop hook: it must hold the hook, the whole
    # drain and the cut's grace, or the kubelet kills streams the drain was finishing.
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain_seconds() + 5
    env = {e["name"]: e for e in gateway["env"]}
    assert env["LOCKGATE_AUTH__ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "lockgate-admin"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_disruption_budget_and_autoscaler_target_the_gateway() -> None:
    selector = kind("Deployment")["spec"]["selector"]["matchLabels"]
    assert kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "lockgate"
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "lockgate_queue_depth"
    volumes = {v["name"]: v for v in kind("Deployment")["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["batch-files"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for _, d in manifests() if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# -- Prometheus rules -------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_unit_tests_pass() -> None:
    """alerts_test.yaml: each alert fires on the series that should fire it, and not on
    its near miss (a half-open instance, a 1% error rate, a half-spent budget)."""
    done = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yaml"],
        capture_output=True, text=True, cwd=DEPLOY / "prometheus", check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tests = (DEPLOY / "prometheus" / "alerts_test.yaml").read_text()
    tested = set(re.findall(r"alertname: (\w+)", tests))
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert tested == {r["alert"] for g in rules["groups"] for r in g["rules"]}  # every alert


# -- the image ------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_with_a_readiness_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]  # the runtime stage
    assert re.search(r"^USER lockgate$", final, re.M)
    assert "build-essential" not in final  # no compiler in the image
    assert re.search(r"^HEALTHCHECK .*/health/ready", final, re.M | re.S)
    pinned = re.search(r"^LLAMA_CPP_PYTHON := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pinned is not None
    assert f"ARG LLAMA_CPP_PYTHON={pinned[1]}" in text  # the version the tests ran
    for source in re.findall(r"^COPY (?!--)(\S+)", text, re.M):
        assert (ROOT / source).exists(), source
