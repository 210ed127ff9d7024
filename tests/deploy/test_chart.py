"""helm/signpost rendered, linted and checked offline: Helm's own library
(helm-python-sdk) renders and lints it and applies values.schema.json;
kubernetes-validate checks every manifest against the newest Kubernetes
schema it ships, strictly (unknown fields fail); the ConfigMap's TOML goes
through `signpost controller --check-config`."""
import subprocess

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import CHART

KUBE_VERSION = kubernetes_validate.latest_version()

# The least a release needs: the controller's TLS Secret (cert-manager's format).
MINIMAL = {"security": {"tls": {"secretName": "signpost-tls"}}}

FULL = {
    "image": {"repository": "registry.example.com/signpost", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "sp",
    "serviceAccount": {"create": True, "name": "signpost-controller",
                       "roleArn": "arn:aws:iam::111122223333:role/signpost-controller",
                       "annotations": {"example.com/owner": "platform"}},
    "controller": {
        "replicas": 1, "logLevel": "signpost=debug,info",
        "config": {
            "resync_interval": "15s", "default_port": 8080,
            "aws": {"region": "eu-west-1", "endpoint_url": "https://vpce.example.com",
                    "max_attempts": 5, "attempt_timeout": "2s", "operation_timeout": "10s",
                    "calls_per_second": 7.5},
            "health": {"interval": "2s", "timeout": "500ms", "healthy_threshold": 3,
                       "unhealthy_threshold": 2, "max_concurrent_probes": 64,
                       "services": {"users": {"interval": "1s", "unhealthy_threshold": 5},
                                    "billing-api": {"timeout": "1s"}}},
            "events": {"queue_url": "https://sqs.eu-west-1.amazonaws.com/111122223333/signpost-events",
                       "wait_time": "10s"},
        },
        "env": [{"name": "TZ", "value": "UTC"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "podAnnotations": {"a": "b"}, "podLabels": {"team": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
    },
    "service": {"type": "ClusterIP", "port": 7171},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "serviceMonitor": {"enabled": True, "path": "/metrics", "interval": "15s",
                       "scrapeTimeout": "5s", "labels": {"release": "prometheus"}},
    "router": {"enabled": True, "replicas": 3, "port": 8081, "adminPort": 9091,
               "logLevel": "info", "service": {"type": "LoadBalancer", "port": 80,
                                               "annotations": {"x": "y"}},
               "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"}},
    "xds": {"enabled": True, "port": 18001, "envoyListener": "0.0.0.0:10001"},
    "security": {"tls": {"secretName": "signpost-tls", "clientAuth": True},
                 "tokensSecretName": "signpost-tokens"},
}
FULL["router"]["tokenSecretName"] = "signpost-router-token"

# TLS from cert-manager instead of a Secret made beforehand.
CERT_MANAGER = {"security": {"tls": {"certManager": {"enabled": True,
                                                     "issuerRef": {"name": "signpost-ca"}}}}}

# Routers with a token per pod (a StatefulSet) and with a certificate per pod
# (cert-manager's csi-driver).
ROUTER_TOKENS = {"security": {"tls": {"secretName": "signpost-tls"}, "tokensSecretName": "signpost-tokens"},
                 "router": {"enabled": True, "replicas": 3, "tokenSecretName": "signpost-router-tokens"}}
CSI = {"enabled": True, "issuerRef": {"name": "signpost-ca"}}
ROUTER_CSI = {"security": {"tls": {"secretName": "signpost-tls"}},
              "router": {"enabled": True, "certManagerCSI": CSI}}


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        files = chart.render(values, name="signpost", namespace="signpost")
    docs = []
    for name, text in sorted(files.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_chart_lints_clean():
    for values in (MINIMAL, FULL, CERT_MANAGER, ROUTER_TOKENS, ROUTER_CSI):
        result = helm.lint(str(CHART), values=values, strict=True, kube_version=KUBE_VERSION)
        assert not result["errors"], result
        # severity 1 is INFO ("icon is recommended"); WARNING and ERROR are 2 and up.
        assert all(m["severity"] <= 1 for m in result["messages"]), result


@pytest.mark.parametrize("values", [MINIMAL, FULL, ROUTER_CSI], ids=["defaults", "full", "router-csi"])
def test_every_manifest_is_valid_kubernetes(values):
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    if values is FULL:
        # Routers with tokens: a StatefulSet and its headless Service.
        assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget",
                         "PodDisruptionBudget", "Service", "Service", "Service", "ServiceAccount",
                         "ServiceMonitor", "StatefulSet"], kinds
    elif values is ROUTER_CSI:
        assert kinds == ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget",
                         "PodDisruptionBudget", "Service", "Service", "ServiceAccount"], kinds
    else:
        assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service",
                         "ServiceAccount"], kinds
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no schema ships for it
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["endpoints"][0]["path"] == "/metrics"
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_controller_runs_two_replicas_with_a_lease_spread_over_nodes():
    docs = render(MINIMAL)
    (deploy,) = by_kind(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        spec["selector"]["matchLabels"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["SIGNPOST_HA_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SIGNPOST_HA_ADVERTISE"]["value"] == "https://$(POD_IP):7070", "TLS by default"
    (pdb,) = [d for d in by_kind(docs, "PodDisruptionBudget")]
    assert pdb["spec"]["maxUnavailable"] == 1
    (cm,) = by_kind(docs, "ConfigMap")
    assert '[ha]\ntable = "signpost-lease"' in cm["data"]["controller.toml"]
    hard = render({**MINIMAL, "controller": {"antiAffinity": "hard"}})
    (deploy,) = by_kind(hard, "Deployment")
    assert "requiredDuringSchedulingIgnoredDuringExecution" in \
        deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]


def test_one_replica_without_a_lease_is_recreated_never_overlapped():
    values = {**MINIMAL, "controller": {"replicas": 1, "config": {"ha": {"table": ""}}}}
    docs = render(values)
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    (cm,) = by_kind(docs, "ConfigMap")
    assert "[ha]" not in cm["data"]["controller.toml"]
    env = [e["name"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "SIGNPOST_HA_ADVERTISE" not in env


def test_two_replicas_without_a_lease_are_refused():
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as e:
            chart.render({**MINIMAL, "controller": {"config": {"ha": {"table": ""}}}},
                         name="signpost", namespace="signpost")
    assert "controller.config.ha.table" in str(e.value), str(e.value)


def test_controller_pod_is_locked_down_and_probed():
    (deploy,) = [d for d in by_kind(render(MINIMAL), "Deployment")]
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_irsa_role_annotation_and_router_wiring():
    docs = render(FULL)
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        FULL["serviceAccount"]["roleArn"]
    (router,) = by_kind(docs, "StatefulSet")
    assert router["metadata"]["name"] == "sp-router"
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["router", "--controller"] and args[2] == "https://sp:7171"
    assert args[args.index("--controller-ca") + 1] == "/etc/signpost/tls/ca.crt"
    assert args[args.index("--token-file") + 1] == "/etc/signpost/token/$(POD_NAME)"
    pod = router["spec"]["template"]["spec"]
    (ca,) = [v for v in pod["volumes"] if v["name"] == "controller-ca"]
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "never the controller's key"
    assert {"--listen", "--admin-listen", "--cache", "--id"} <= set(args)
    controller = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "sp")
    assert controller["spec"]["template"]["spec"]["serviceAccountName"] == "signpost-controller"


@pytest.mark.parametrize("values,message", [
    ({"controller": {"replicas": -1}}, "replicas"),
    ({"controller": {"config": {"ha": {"lease_duration": "long"}}}}, "lease_duration"),
    ({"controller": {"config": {"resync_interval": "soon"}}}, "resync_interval"),
    ({"controller": {"config": {"health": {"healthy_threshold": 0}}}}, "healthy_threshold"),
    ({"controller": {"config": {"default_port": 70000}}}, "default_port"),
    ({"controller": {"config": {"aws": {"regoin": "eu-west-1"}}}}, "regoin"),
    ({"serviceAccount": {"roleArn": "signpost-role"}}, "roleArn"),
    ({"service": {"port": "http"}}, "port"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"security": {"tls": {"certManager": {"enabled": True, "issuer": "ca"}}}}, "issuer"),
    ({"security": {"tls": {"certManager": {"issuerRef": {"name": "ca", "knd": "Issuer"}}}}}, "knd"),
    ({"security": {"tls": {"certManager": {"duration": "90 days"}}}}, "duration"),
    ({"security": {"tls": {"certManager": {"dnsNames": ["Signpost_API"]}}}}, "dnsNames"),
    ({"security": {"tls": {"certManager": {"enabled": "yes"}}}}, "enabled"),
    ({"router": {"tokenSecretName": "t", "certManagerCSI": CSI}}, "certManagerCSI/enabled"),
    ({"router": {"certManagerCSI": {"enabled": True}}}, "issuerRef"),
    ({"router": {"certManagerCSI": {"enabled": True, "issuerRef": {"name": ""}}}}, "issuerRef/name"),
    ({"router": {"certManagerCSI": {**CSI, "commonName": "edge"}}}, "commonName"),
    ({"router": {"certManagerCSI": {**CSI, "duration": "30 days"}}}, "duration"),
    ({"router": {"tokenSecretName": ["a", "b"]}}, "tokenSecretName"),
], ids=["negative-replicas", "bad-lease-duration", "bad-duration", "zero-threshold", "bad-port", "typo-key",
        "bad-role-arn", "port-not-int", "bad-pull-policy", "cert-manager-unknown-key",
        "cert-manager-issuer-ref-typo", "cert-manager-bad-duration", "cert-manager-bad-dns-name",
        "cert-manager-enabled-not-bool", "router-tokens-and-certificates", "router-csi-without-issuer",
        "router-csi-empty-issuer", "router-csi-unknown-key", "router-csi-bad-duration",
        "router-token-secret-not-a-string"])
def test_bad_values_are_rejected_by_the_schema(values, message):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as e:
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError):
            chart.render(values, name="signpost", namespace="signpost")
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("values", [MINIMAL, FULL, CERT_MANAGER], ids=["defaults", "full", "cert-manager"])
def test_configmap_toml_is_accepted_by_the_controller(values, signpost_bin, tmp_path):
    (cm,) = by_kind(render(values), "ConfigMap")
    path = tmp_path / "controller.toml"
    path.write_text(cm["data"]["controller.toml"])
    # As the pod's environment gives them (the Deployment's env).
    env = {"PATH": "/usr/bin:/bin", "SIGNPOST_HA_REPLICA_ID": "signpost-0",
           "SIGNPOST_HA_ADVERTISE": f"http://10.0.0.7:{values.get('service', {}).get('port', 7070)}"}
    out = subprocess.run([str(signpost_bin), "controller", "--config", str(path), "--check-config"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr + path.read_text()
    effective = out.stdout
    port = values.get("service", {}).get("port", 7070)
    assert f'listen = "0.0.0.0:{port}"' in effective, effective
    assert 'cert = "/etc/signpost/tls/tls.crt"' in effective and 'client_ca = "/etc/signpost/tls/ca.crt"' in effective, effective
    assert "insecure_plaintext = true" not in effective.split("[")[0], effective
    if values is FULL:
        assert 'tokens_file = "/etc/signpost/tokens/tokens.toml"' in effective, effective
        assert 'region = "eu-west-1"' in effective and "calls_per_second = 7.5" in effective
        assert "default_port = 8080" in effective
        assert '[health.services.users]' in effective and '[health.services.billing-api]' in effective, effective
        assert 'listen = "0.0.0.0:18001"' in effective and 'envoy_listener = "0.0.0.0:10001"' in effective, effective
    else:
        assert 'table = "signpost-lease"' in effective and 'replica_id = "signpost-0"' in effective, effective
        # xDS is off: its section has no `listen`.
        assert "\nlisten" not in effective.split("[xds]")[1].split("\n[")[0], effective


def test_xds_is_off_by_default_and_without_tls_needs_plaintext_accepted():
    rendered = render(MINIMAL)
    (svc,) = [s for s in by_kind(rendered, "Service") if s["metadata"]["name"] == "signpost"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["api"]
    # With the API's TLS and identities, the xDS port has them too.
    rendered = render({**MINIMAL, "xds": {"enabled": True}})
    (cm,) = by_kind(rendered, "ConfigMap")
    xds = cm["data"]["controller.toml"].split("[xds]")[1].split("\n[")[0]
    assert "insecure_plaintext" not in xds, xds
    (svc,) = [s for s in by_kind(rendered, "Service") if s["metadata"]["name"] == "signpost"]
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("api", 7070), ("xds", 18000)]
    plain = {"security": {"insecurePlaintext": True}}
    with pytest.raises(helm.HelmError) as e:
        render({**plain, "xds": {"enabled": True}})
    assert "xds.insecurePlaintext" in str(e.value), str(e.value)
    (cm,) = by_kind(render({**plain, "xds": {"enabled": True, "insecurePlaintext": True}}), "ConfigMap")
    assert "insecure_plaintext = true" in cm["data"]["controller.toml"].split("[xds]")[1]


def test_the_api_off_loopback_needs_tls_unless_plaintext_is_accepted(signpost_bin, tmp_path):
    with pytest.raises(helm.HelmError) as e:
        render({})
    assert "security.tls.secretName" in str(e.value), str(e.value)
    with pytest.raises(helm.HelmError) as e:
        render({"security": {"tls": {"secretName": "s", "clientAuth": False}}})
    assert "tokensSecretName" in str(e.value), str(e.value)
    (cm,) = by_kind(render({"security": {"insecurePlaintext": True}}), "ConfigMap")
    assert "insecure_plaintext = true" in cm["data"]["controller.toml"]
    (deploy,) = by_kind(render(MINIMAL), "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_no_certificate_unless_cert_manager_is_enabled():
    for values in (MINIMAL, FULL, {"security": {"insecurePlaintext": True}}):
        assert not by_kind(render(values), "Certificate")


def _tls_volume(deploy, name):
    (volume,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return volume["secret"]["secretName"]


@pytest.mark.parametrize("values,secret", [
    (CERT_MANAGER, "signpost-tls"),
    ({**CERT_MANAGER, "fullnameOverride": "sp"}, "sp-tls"),
    ({"security": {"tls": {"secretName": "my-tls", "certManager": CERT_MANAGER["security"]["tls"]["certManager"]}}},
     "my-tls"),
], ids=["default-secret", "fullname-override", "named-secret"])
def test_cert_manager_certificate_goes_into_the_secret_the_pods_mount(values, secret):
    docs = render({**values, "router": {"enabled": True, "certManagerCSI": CSI}})
    (cert,) = by_kind(docs, "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    assert spec["secretName"] == secret
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
                   for d in by_kind(docs, "Deployment")}
    assert _tls_volume(deployments["controller"], "tls") == secret
    # Routers verify the controller with the same Secret's ca.crt (and only that).
    assert _tls_volume(deployments["router"], "controller-ca") == secret
    assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
    assert "server auth" in spec["usages"]
    assert spec["issuerRef"] == {"name": "signpost-ca", "kind": "Issuer", "group": "cert-manager.io"}
    # Empty: cert-manager's own defaults, not an empty string it would refuse.
    assert "duration" not in spec and "renewBefore" not in spec
    # Everything else is still plain, valid Kubernetes.
    for doc in docs:
        if doc["kind"] != "Certificate":
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_cert_manager_certificate_names_the_controller_service():
    values = {"security": {"tls": {"certManager": {
        "enabled": True,
        "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
        "duration": "2160h", "renewBefore": "720h",
        "dnsNames": ["signpost.example.com", "signpost"]}}}}
    docs = render(values)
    (svc,) = [s for s in by_kind(docs, "Service")
              if s["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"]
    name, ns = svc["metadata"]["name"], "signpost"  # render()'s namespace
    (cert,) = by_kind(docs, "Certificate")
    spec = cert["spec"]
    assert spec["dnsNames"] == [name, f"{name}.{ns}", f"{name}.{ns}.svc",
                                f"{name}.{ns}.svc.cluster.local", "signpost.example.com"], \
        "the Service's four names, then the extra ones, without duplicates"
    assert spec["duration"] == "2160h" and spec["renewBefore"] == "720h"
    assert spec["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render({**values, "fullnameOverride": "edge-sd"}, name="r", namespace="infra")
    (cert,) = [d for n, t in files.items() if not n.endswith("NOTES.txt")
               for d in yaml.safe_load_all(t) if d and d["kind"] == "Certificate"]
    assert cert["spec"]["dnsNames"][:4] == ["edge-sd", "edge-sd.infra", "edge-sd.infra.svc",
                                            "edge-sd.infra.svc.cluster.local"]


def test_without_tls_the_chart_refuses_unless_cert_manager_issues_it():
    with pytest.raises(helm.HelmError) as e:
        render({"security": {"tls": {"certManager": {"enabled": False, "issuerRef": {"name": "ca"}}}}})
    assert "security.tls.secretName" in str(e.value) and "certManager" in str(e.value), str(e.value)
    # Enabled without an issuer: refused, naming the key.
    with pytest.raises(helm.HelmError) as e:
        render({"security": {"tls": {"certManager": {"enabled": True}}}})
    assert "security.tls.certManager.issuerRef.name" in str(e.value), str(e.value)
    docs = render(CERT_MANAGER)
    (cm,) = by_kind(docs, "ConfigMap")
    toml = cm["data"]["controller.toml"]
    assert 'cert = "/etc/signpost/tls/tls.crt"' in toml and 'client_ca = "/etc/signpost/tls/ca.crt"' in toml
    assert "insecure_plaintext" not in toml
    (deploy,) = by_kind(docs, "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    env = {e["name"]: e for e in c["env"]}
    assert env["SIGNPOST_HA_ADVERTISE"]["value"] == "https://$(POD_IP):7070"
    assert {"name": "tls", "mountPath": "/etc/signpost/tls", "readOnly": True} in c["volumeMounts"]


# Router identities (chart README, "Router identities"): a router subscribes
# as its pod name and the controller serves it only under the identity its
# credential names, so each pod's credential must name that pod.

def router_workload(docs):
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and d["metadata"]["labels"]["app.kubernetes.io/component"] == "router"]
    return workload


def router_container(workload):
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def arg(args, flag):
    return args[args.index(flag) + 1]


def pod_name_env(container):
    """The env var Kubernetes sets to the pod's own name (downward API)."""
    (name,) = [e["name"] for e in container["env"]
               if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"]
    return name


def test_router_tokens_make_a_stateful_set_whose_pods_read_their_own_token():
    docs = render(ROUTER_TOKENS)
    assert not [d for d in by_kind(docs, "Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "router"]
    sts = router_workload(docs)
    assert sts["kind"] == "StatefulSet" and sts["metadata"]["name"] == "signpost-router"
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    # The governing Service: headless, selecting exactly the router pods.
    (headless,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in headless["spec"]["selector"].items())
    # The traffic Service is still there, and the PDB covers the StatefulSet's pods.
    assert {s["metadata"]["name"] for s in by_kind(docs, "Service")} == \
        {"signpost", "signpost-router", "signpost-router-headless"}
    (pdb,) = [p for p in by_kind(docs, "PodDisruptionBudget") if p["metadata"]["name"] == "signpost-router"]
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]

    c = router_container(sts)
    var = pod_name_env(c)
    assert arg(c["args"], "--id") == f"$({var})"
    assert arg(c["args"], "--token-file") == f"/etc/signpost/token/$({var})"
    assert "--client-cert" not in c["args"]
    pod = spec["template"]["spec"]
    (token,) = [v for v in pod["volumes"] if v["name"] == "token"]
    assert token["secret"] == {"secretName": "signpost-router-tokens"}, "every key: rotations show up"
    assert {"name": "token", "mountPath": "/etc/signpost/token", "readOnly": True} in c["volumeMounts"]
    # Pod i of the StatefulSet reads the Secret's key named like itself and
    # subscribes under that same name: the identity its token has in tokens.toml.
    for i in range(3):
        pod_name = f"{sts['metadata']['name']}-{i}"
        expand = lambda a: a.replace(f"$({var})", pod_name)
        assert expand(arg(c["args"], "--id")) == pod_name
        assert expand(arg(c["args"], "--token-file")) == f"/etc/signpost/token/{pod_name}"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_router_tokens_notes_name_the_keys_the_secrets_need():
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(ROUTER_TOKENS, name="signpost", namespace="signpost")
    (notes,) = [t for n, t in files.items() if n.endswith("NOTES.txt")]
    assert "signpost-router-0\n  signpost-router-1\n  signpost-router-2\n" in notes, notes
    assert '"signpost-router-tokens"' in notes and '"signpost-tokens"' in notes, notes


def test_router_csi_certificate_names_the_pod_the_router_subscribes_as():
    values = {**ROUTER_CSI, "router": {"enabled": True, "certManagerCSI": {
        "enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
        "duration": "48h", "renewBefore": "16h"}}}
    docs = render(values)
    assert not by_kind(docs, "StatefulSet")
    deploy = router_workload(docs)
    assert deploy["kind"] == "Deployment"
    pod = deploy["spec"]["template"]["spec"]
    c = router_container(deploy)
    var = pod_name_env(c)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "client-cert"]
    assert volume["csi"] == {"driver": "csi.cert-manager.io", "readOnly": True, "volumeAttributes": {
        "csi.cert-manager.io/issuer-name": "corp-ca",
        "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
        "csi.cert-manager.io/issuer-group": "cert-manager.io",
        "csi.cert-manager.io/common-name": "${POD_NAME}",
        "csi.cert-manager.io/key-usages": "client auth,digital signature",
        "csi.cert-manager.io/fs-group": "65532",
        "csi.cert-manager.io/duration": "48h",
        "csi.cert-manager.io/renew-before": "16h",
    }}
    # The driver expands ${POD_NAME} to the pod's name (not Kubernetes: it
    # is not a $(VAR) of the container); the router's --id is the same name.
    assert arg(c["args"], "--id") == f"$({var})"
    # The key's group is the one the router runs as.
    assert volume["csi"]["volumeAttributes"]["csi.cert-manager.io/fs-group"] == \
        str(pod["securityContext"]["runAsGroup"])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "client-cert"]
    assert mount["readOnly"] is True
    # The driver's default file names, in the mounted volume.
    assert arg(c["args"], "--client-cert") == f"{mount['mountPath']}/tls.crt"
    assert arg(c["args"], "--client-key") == f"{mount['mountPath']}/tls.key"
    assert arg(c["args"], "--controller-ca") == "/etc/signpost/tls/ca.crt"
    assert "--token-file" not in c["args"]
    (cm,) = by_kind(docs, "ConfigMap")
    assert 'client_ca = "/etc/signpost/tls/ca.crt"' in cm["data"]["controller.toml"]
    # Defaults: the driver's own duration and renewal.
    (volume,) = [v for v in router_workload(render(ROUTER_CSI))["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "client-cert"]
    attrs = volume["csi"]["volumeAttributes"]
    assert "csi.cert-manager.io/duration" not in attrs and "csi.cert-manager.io/renew-before" not in attrs
    assert attrs["csi.cert-manager.io/issuer-kind"] == "Issuer"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_plaintext_routers_need_no_credential_and_stay_a_deployment():
    docs = render({"security": {"insecurePlaintext": True}, "router": {"enabled": True}})
    deploy = router_workload(docs)
    assert deploy["kind"] == "Deployment"
    args = router_container(deploy)["args"]
    assert arg(args, "--controller") == "http://signpost:7070"
    assert not {"--token-file", "--client-cert", "--controller-ca"} & set(args)


TLS = {"tls": {"secretName": "signpost-tls"}}


@pytest.mark.parametrize("values,message", [
    ({"security": TLS, "router": {"enabled": True}},
     "router.enabled with TLS needs a credential for each router pod"),
    ({"security": {"insecurePlaintext": True}, "router": {"enabled": True, "tokenSecretName": "rt"}},
     "need TLS to the controller"),
    ({"security": {"insecurePlaintext": True}, "router": {"enabled": True, "certManagerCSI": CSI}},
     "need TLS to the controller"),
    ({"security": TLS, "router": {"enabled": True, "tokenSecretName": "rt"}},
     "router.tokenSecretName needs security.tokensSecretName"),
    ({"security": {"tls": {"secretName": "s", "clientAuth": False}, "tokensSecretName": "t"},
      "router": {"enabled": True, "certManagerCSI": CSI}},
     "router.certManagerCSI needs security.tls.clientAuth"),
    ({"fullnameOverride": "signpost-edge-discovery-eu-west-1-production-x", "security": {**TLS, "tokensSecretName": "t"},
      "router": {"enabled": True, "tokenSecretName": "rt"}},
     "must be at most 52 characters"),
    ({"security": TLS, "podSecurityContext": {"runAsGroup": None, "fsGroup": None},
      "router": {"enabled": True, "certManagerCSI": CSI}},
     "needs podSecurityContext.runAsGroup or fsGroup"),
], ids=["tls-without-credential", "tokens-without-tls", "certificates-without-tls",
        "tokens-without-controller-tokens", "certificates-without-client-auth", "stateful-set-name-too-long",
        "certificates-without-group"])
def test_router_identity_combinations_that_cannot_work_are_refused(values, message):
    with pytest.raises(helm.HelmError) as e:
        with helm.Chart.load(str(CHART)) as chart:
            chart.render(values, name="signpost", namespace="signpost")
    assert message in str(e.value), str(e.value)


def test_routers_of_another_controller_are_not_held_to_this_ones_config():
    # An https:// controller elsewhere: its tokens and client CAs are not ours to check.
    values = {"security": {"tls": {"secretName": "s", "clientAuth": False}, "tokensSecretName": "t"},
              "router": {"enabled": True, "controllerUrl": "https://signpost.infra:7070",
                         "certManagerCSI": CSI}}
    assert router_workload(render(values))["kind"] == "Deployment"
    values = {"security": TLS, "router": {"enabled": True, "controllerUrl": "https://signpost.infra:7070",
                                          "tokenSecretName": "rt"}}
    assert router_workload(render(values))["kind"] == "StatefulSet"
