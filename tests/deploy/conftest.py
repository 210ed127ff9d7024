"""Shared helpers for the deploy tests: paths, the signpost binary, a private
moto_server or LocalStack per test module, policy rendering, real HTTP
backends, and a controller process with its API."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IAM = REPO / "iam"
CHART = REPO / "helm" / "signpost"
ACCOUNT_ID = "123456789012"  # moto's
REGION = "us-east-1"

# What the operator fills in; the emulator's account and region for the tests.
PLACEHOLDERS = {
    "__REGION__": REGION,
    "__ACCOUNT_ID__": ACCOUNT_ID,
    "__QUEUE_NAME__": "signpost-events",
    "__OIDC_PROVIDER__": "oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE",
    "__NAMESPACE__": "signpost",
    "__SERVICE_ACCOUNT__": "signpost",
    "__CLUSTER__": "prod",
    "__ROLE_NAME__": "signpost-controller",
    "__LEASE_TABLE__": "signpost-lease",
}


def render_policy(name, **overrides):
    """iam/NAME with its __PLACEHOLDERS__ filled, as a dict."""
    text = (IAM / name).read_text()
    for key, value in {**PLACEHOLDERS, **overrides}.items():
        text = text.replace(key, value)
    assert "__" not in text, f"{name}: unfilled placeholder in {text}"
    return json.loads(text)


def wait_for(what, check, timeout=20.0, interval=0.1):
    """Polls check() until it returns something truthy; fails after timeout
    with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def signpost_bin():
    """The controller binary: $SIGNPOST_BIN, else target/debug/signpost
    (under $CARGO_TARGET_DIR if set), built with `cargo build` if missing."""
    if os.environ.get("SIGNPOST_BIN"):
        path = Path(os.environ["SIGNPOST_BIN"])
        assert path.is_file(), f"SIGNPOST_BIN={path} does not exist"
        return path
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target / "debug" / "signpost"
    if not path.is_file():
        subprocess.run(["cargo", "build", "--quiet", "--bin", "signpost"], cwd=REPO, check=True)
    return path


@pytest.fixture(scope="session")
def moto_server_bin():
    out = subprocess.run([str(REPO / "localstack" / "emulator.sh"), "bin"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1]


class Moto:
    """A private moto_server on a free loopback port (never the shared one
    that emulator.sh manages, so IAM enforcement here affects nobody else)."""

    def __init__(self, binary, log_path, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     env={**os.environ, **(env or {})})

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"moto_server exited: {Path(log_path).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        wait_for("moto_server to answer", up, timeout=30)

    def make_admin(self):
        """With INITIAL_NO_AUTH_ACTION_COUNT=3: spends the three unchecked
        calls on an admin user (Allow */*) and returns its key; every later
        call is checked."""
        iam = self.client("iam")
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="admin", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def client(self, service, key_id="test", secret="test"):
        import boto3
        from botocore.config import Config
        return boto3.client(service, endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=key_id, aws_secret_access_key=secret,
                            config=Config(retries={"max_attempts": 1}))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def localstack_server_bin():
    out = subprocess.run([str(REPO / "localstack" / "localstack.sh"), "bin"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1]


class LocalStack(Moto):
    """LocalStack's free edition on a free loopback port (SQS, EventBridge,
    IAM, STS; no Auto Scaling). IAM is not enforced; the account is
    000000000000."""
    ACCOUNT_ID = "000000000000"

    def __init__(self, binary, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files = tempfile.mkdtemp(prefix="signpost-localstack-")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([binary, "-p", str(self.port), "-d", self.files],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"LocalStack exited: {Path(log_path).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/_localstack/health", timeout=1)
                return True
            except OSError:
                return False

        wait_for("LocalStack to answer", up, timeout=60)

    def stop(self):
        # Nothing of it is kept, so no need to wait out its graceful stop.
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.files, ignore_errors=True)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Backends:
    """A real HTTP server at each (ip, port): the emulated instances' app."""

    def __init__(self, addresses):
        ThreadingHTTPServer.allow_reuse_address = True
        self.servers = []
        for ip, port in addresses:
            server = ThreadingHTTPServer((ip, port), _Health)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                             daemon=True).start()
            self.servers.append(server)

    def stop(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


def http_json(url, timeout=2):
    """(status, parsed JSON body) of a GET; (None, error) if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except OSError as e:
        return None, str(e)


class Controller:
    """`signpost controller` with the given AWS credentials and a small,
    fast config; stderr goes to a file for the assertions on its log."""

    def __init__(self, binary, endpoint, key_id, secret, workdir, name="controller", extra=""):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.config = Path(workdir) / f"{name}.toml"
        self.config.write_text(f"""\
listen = "127.0.0.1:{self.port}"
resync_interval = "1s"

[aws]
max_attempts = 1
attempt_timeout = "1s"
operation_timeout = "3s"

[health]
interval = "300ms"
timeout = "250ms"
{extra}
""")
        self.stderr_path = Path(workdir) / f"{name}.stderr"
        self.stderr = open(self.stderr_path, "w")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "SIGNPOST_"))}
        env.update({
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": REGION,
            # Nothing but the keys above may be used: no profile, no IMDS.
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        self.proc = subprocess.Popen([str(binary), "controller", "--config", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr, env=env)

    def get(self, path):
        if self.proc.poll() is not None:
            pytest.fail(f"controller exited {self.proc.returncode}: {self.log()[-3000:]}")
        return http_json(self.api + path)

    def log(self):
        return self.stderr_path.read_text()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
