"""The chart's two router identities, run rather than read: the controller
runs the config the chart renders, and each router pod's process runs the
args the chart renders for it, the way the kubelet would start it ($(VAR)
expanded from the container's env, the pod's name from the downward API,
every path under a volume mount mapped to a local folder holding what that
volume would hold). Each pod must then subscribe under its own name.

Tokens are made by the recipe in the chart README ("Router identities"),
run as written. Certificates are made with openssl as cert-manager's
csi-driver would make them from the rendered volume attributes (its default
key, RSA 2048 in PKCS#1; the attributes' common name with ${POD_NAME}
expanded, and key usages; its default file names), signed by the CA whose
ca.crt the controller verifies clients with. Not covered: no kubelet, no
cert-manager and no csi-driver run here; the controller has no AWS to reach
(it serves routers regardless)."""
import itertools
import json
import os
import re
import socket
import string
import subprocess
from pathlib import Path

import pytest

from conftest import CHART, free_port, http_json, wait_for
from test_chart import by_kind, render

# The README recipe's release: `signpost` (full name `signpost`), 2 routers.
PODS = ["signpost-router-0", "signpost-router-1"]

# No AWS to reach: the controller keeps serving its (empty) registry.
CONTROLLER = {"replicas": 1, "config": {
    "ha": {"table": ""},
    "aws": {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:1", "max_attempts": 1,
            "attempt_timeout": "1s", "operation_timeout": "2s"}}}


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_controller_cert(tls_dir):
    """The controller's Secret as cert-manager writes it: tls.crt, tls.key
    (for 127.0.0.1, where the routers dial it here) and ca.crt."""
    tls_dir.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", "/CN=signpost-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=tls_dir)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=signpost",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", "tls.key", "-out", "tls.csr", cwd=tls_dir)
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "1",
            "-copy_extensions", "copy", "-out", "tls.crt", cwd=tls_dir)


# cert-manager's usage names (the csi-driver's key-usages) as openssl's.
EXTENDED_USAGES = {"client auth": "clientAuth", "server auth": "serverAuth"}
KEY_USAGES = {"digital signature": "digitalSignature", "key encipherment": "keyEncipherment"}


def csi_driver_volume(attrs, pod_name, ca_dir, out):
    """What the csi-driver writes for a pod mounting a volume with `attrs`,
    signed by the CA in ca_dir."""
    out.mkdir(parents=True)
    # The driver expands ${VAR} (Go's os.Expand) with the pod's facts; the
    # router pods run under the namespace's default service account.
    cn = string.Template(attrs["csi.cert-manager.io/common-name"]).substitute(
        POD_NAME=pod_name, POD_NAMESPACE="signpost", POD_UID="0d1c3c52-8a5e-4c1b-9a51-3f2b3c0e7a11",
        SERVICE_ACCOUNT_NAME="default")
    usages = [u.strip() for u in attrs["csi.cert-manager.io/key-usages"].split(",")]
    ext = out / "ext.cnf"
    ext.write_text(
        f"keyUsage = critical, {', '.join(KEY_USAGES[u] for u in usages if u in KEY_USAGES)}\n"
        f"extendedKeyUsage = {', '.join(EXTENDED_USAGES[u] for u in usages if u in EXTENDED_USAGES)}\n")
    cert = attrs.get("csi.cert-manager.io/certificate-file", "tls.crt")
    key = attrs.get("csi.cert-manager.io/privatekey-file", "tls.key")
    # The driver's default key: RSA 2048, PKCS#1 ("RSA PRIVATE KEY").
    openssl("genrsa", "-traditional", "-out", key, "2048", cwd=out)
    openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", "req.csr", cwd=out)
    openssl("x509", "-req", "-in", "req.csr", "-CA", str(ca_dir / "ca.crt"), "-CAkey", str(ca_dir / "ca.key"),
            "-days", "1", "-extfile", "ext.cnf", "-out", cert, cwd=out)
    (out / attrs.get("csi.cert-manager.io/ca-file", "ca.crt")).write_bytes((ca_dir / "ca.crt").read_bytes())


def mounts(workload, volumes):
    """{mount path in the container: local folder} for a rendered workload's
    container; `volumes` maps each volume name to the folder standing for it."""
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return {m["mountPath"]: Path(volumes[m["name"]]) for m in c["volumeMounts"]}


def local(path, mounted):
    """path inside the container -> the local file standing for it."""
    for mount in sorted(mounted, key=len, reverse=True):
        if path == mount or path.startswith(mount + "/"):
            return str(mounted[mount]) + path[len(mount):]
    return path


def refused_as(log, router_id, identity):
    return f'router id "{router_id}" does not match identity "{identity}"' in log


STARTS = itertools.count()


class Pod:
    """A container of a rendered workload, started as the kubelet would."""

    def __init__(self, binary, workload, pod_name, volumes, workdir, rewrite_args=lambda a: a,
                 extra_env=None):
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        mounted = mounts(workload, volumes)
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name":
                env[e["name"]] = pod_name
        # The kubelet expands $(VAR) in args with the container's env.
        args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m[1]], a) for a in c["args"]]
        args = rewrite_args([local(a, mounted) for a in args])
        self.log_path = Path(workdir) / f"{pod_name}-{next(STARTS)}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(binary), *args], stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=self.log_file,
                                     env={"PATH": os.environ["PATH"], **env, **(extra_env or {})})

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


# What IRSA would give the controller; nothing else of this machine's.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "AWS_EC2_METADATA_DISABLED": "true"}


def with_flag(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.fixture
def cluster(signpost_bin, tmp_path):
    """Starts the chart's controller and router pods; stops them all after."""
    pods = []

    class Cluster:
        controller_url = None

        def start_controller(self, docs, volumes):
            (deploy,) = [d for d in by_kind(docs, "Deployment")
                         if d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"]
            (cm,) = by_kind(docs, "ConfigMap")
            volumes = {"config": tmp_path / "config", **volumes}
            volumes["config"].mkdir()
            port = free_port()
            toml = cm["data"]["controller.toml"].replace('listen = "0.0.0.0:7070"', f'listen = "127.0.0.1:{port}"')
            assert f"127.0.0.1:{port}" in toml, toml
            # Paths in the config are the container's: point them at the local files.
            mounted = mounts(deploy, volumes)
            toml = re.sub(r'"(/[^"]*)"', lambda m: json.dumps(local(m[1], mounted)), toml)
            assert "/etc/signpost" not in toml, toml
            (volumes["config"] / "controller.toml").write_text(toml)
            pod = Pod(signpost_bin, deploy, "signpost-0", volumes, tmp_path, extra_env=AWS_ENV)
            pods.append(pod)
            self.controller_url = f"https://127.0.0.1:{port}"

            def listening():
                if pod.proc.poll() is not None:
                    pytest.fail(f"controller exited {pod.proc.returncode}: {pod.log()[-3000:]}")
                with socket.socket() as sock:
                    return sock.connect_ex(("127.0.0.1", port)) == 0

            wait_for("the controller to listen", listening)
            return pod

        def start_router(self, workload, pod_name, volumes, rewrite=lambda a: a):
            admin = free_port()

            def local_args(args):
                args = with_flag(args, "--controller", self.controller_url)
                args = with_flag(args, "--listen", f"127.0.0.1:{free_port()}")
                args = with_flag(args, "--admin-listen", f"127.0.0.1:{admin}")
                return rewrite(args)

            cache = tmp_path / f"cache-{pod_name}-{next(STARTS)}"
            cache.mkdir()
            pod = Pod(signpost_bin, workload, pod_name, {"cache": cache, **volumes}, tmp_path, local_args)
            pod.admin = admin
            pods.append(pod)
            return pod

    yield Cluster()
    for p in pods:
        p.stop()


def connected(router):
    if router.proc.poll() is not None:
        pytest.fail(f"router exited {router.proc.returncode}: {router.log()[-2000:]}")
    status, body = http_json(f"http://127.0.0.1:{router.admin}/readyz")
    return isinstance(body, dict) and body.get("connected")


def readme_token_recipe():
    """The ```sh block of the chart README that makes the router tokens."""
    readme = (CHART / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    (recipe,) = [b for b in blocks if "router-tokens/" in b]
    return recipe


def test_router_pods_with_the_readme_tokens_subscribe_as_themselves(cluster, tmp_path):
    work = tmp_path / "operator"
    work.mkdir()
    # As written, with kubectl only noting what it was asked to create.
    script = 'kubectl() { printf "%s\\n" "$*" >> kubectl.log; }\n' + readme_token_recipe()
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, check=True)
    created = (work / "kubectl.log").read_text().splitlines()
    secret_of = {}
    for line in created:
        m = re.match(r"-n signpost create secret generic (\S+) --from-file=(\S+)$", line)
        assert m, line
        secret_of[m[2]] = m[1]
    assert set(secret_of) == {"router-tokens/", "tokens.toml"}, created

    docs = render({"controller": CONTROLLER,
                   "security": {"tls": {"secretName": "signpost-tls"}, "tokensSecretName": secret_of["tokens.toml"]},
                   "router": {"enabled": True, "tokenSecretName": secret_of["router-tokens/"]}})
    (sts,) = by_kind(docs, "StatefulSet")
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    assert pods == PODS
    # One key per pod, named like it: the Secret the StatefulSet mounts.
    assert sorted(os.listdir(work / "router-tokens")) == pods

    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    (tokens_dir / "tokens.toml").write_bytes((work / "tokens.toml").read_bytes())
    make_ca_and_controller_cert(tmp_path / "tls")
    controller = cluster.start_controller(docs, {"tls": tmp_path / "tls", "tokens": tokens_dir})
    volumes = {"controller-ca": tmp_path / "tls", "token": work / "router-tokens"}
    routers = [cluster.start_router(sts, pod, volumes) for pod in pods]
    for pod, router in zip(pods, routers):
        wait_for(f"{pod} to subscribe", lambda: connected(router))
        assert f"router subscribed router={pod} " in controller.log(), controller.log()
    assert "not_itself" not in controller.log(), controller.log()

    # The control: a pod reading a sibling's key (what one shared token
    # amounted to) is refused, so the run above could have failed.
    wrong = cluster.start_router(sts, pods[1], volumes, lambda a: with_flag(
        a, "--token-file", str(work / "router-tokens" / pods[0])))
    wait_for("the sibling's token to be refused", lambda: refused_as(controller.log(), pods[1], pods[0]))
    assert not connected(wrong)


def test_router_pods_with_csi_driver_certificates_subscribe_as_themselves(cluster, tmp_path):
    docs = render({"controller": CONTROLLER, "security": {"tls": {"secretName": "signpost-tls"}},
                   "router": {"enabled": True, "certManagerCSI": {"enabled": True,
                                                                  "issuerRef": {"name": "signpost-ca"}}}})
    (deploy,) = [d for d in by_kind(docs, "Deployment")
                 if d["metadata"]["labels"]["app.kubernetes.io/component"] == "router"]
    (volume,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "client-cert"]
    attrs = volume["csi"]["volumeAttributes"]
    make_ca_and_controller_cert(tmp_path / "tls")
    controller = cluster.start_controller(docs, {"tls": tmp_path / "tls"})
    # A Deployment's pods have generated names; any will do.
    pods = ["signpost-router-6d4cf9b7c-x2x9q", "signpost-router-6d4cf9b7c-7kqzm"]
    routers = []
    for pod in pods:
        csi_driver_volume(attrs, pod, tmp_path / "tls", tmp_path / "csi" / pod)
        routers.append(cluster.start_router(deploy, pod, {"controller-ca": tmp_path / "tls",
                                                          "client-cert": tmp_path / "csi" / pod}))
    for pod, router in zip(pods, routers):
        wait_for(f"{pod} to subscribe", lambda: connected(router))
        assert f"router subscribed router={pod} " in controller.log(), controller.log()
    assert "not_itself" not in controller.log(), controller.log()

    # The control: a pod presenting another pod's certificate is refused.
    wrong = cluster.start_router(deploy, "signpost-router-6d4cf9b7c-zzzzz",
                                 {"controller-ca": tmp_path / "tls", "client-cert": tmp_path / "csi" / pods[0]})
    wait_for("another pod's certificate to be refused",
             lambda: refused_as(controller.log(), "signpost-router-6d4cf9b7c-zzzzz", pods[0]))
    assert not connected(wrong)
