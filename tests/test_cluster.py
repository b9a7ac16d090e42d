"""dkmeans on a multi-node cluster: real `dask scheduler` / `dask worker` processes over TCP or TLS.

The scheduler and worker commands are the ones docker-compose.yml gives its
services (read from the file, with loopback addresses and free ports put in),
so what runs here is what the containers would run, minus the containers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_cli import run_cli  # pytest puts tests/ on sys.path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
MAKE_CERTS = REPO_ROOT / "deploy" / "make-certs.sh"
BIN = Path(sys.executable).parent
PROGRESS = re.compile(r"^\s*(\d+)\s+(\d+\.\d{2})\s+(\S+)\s+(\d+\.\d{3})\s*$", re.M)
FULL_FIT = ["--k", "10", "--init", "sample", "--seed", "5", "--max-iter", "8", "--tol", "0"]
SUBSAMPLE_FIT = ["--k", "10", "--init", "sample", "--seed", "72", "--train-per-digit", "100", "--test-size", "50"]


# --- the compose file ----------------------------------------------------------------------


def _defaults(value):
    """Resolve docker-compose's ${VAR:-default} the way compose would with VAR unset."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose():
    return _defaults(yaml.safe_load(COMPOSE_FILE.read_text()))["services"]


def service_command(compose, name: str, replace: dict[str, str], extra=()) -> list[str]:
    """A compose service's command line (entrypoint + command), with some arguments swapped for local ones."""
    service = compose[name]
    argv = list(service.get("entrypoint") or []) + list(service["command"])
    out = []
    for arg in argv:
        for old, new in replace.items():
            arg = arg.replace(old, new)
        out.append(arg)
    if out[0] in ("dask", "dkmeans"):
        out[0] = str(BIN / out[0])
    return out + list(extra)


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package when it runs as root)")
    env = dict(os.environ, DKMEANS_DATA_DIR=str(tmp_path))
    for profile in ([], ["--profile", "tls"]):
        proc = subprocess.run(
            [exe, "-f", str(COMPOSE_FILE), *profile, "config"], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert {"scheduler", "worker", "fit", "scheduler-tls", "worker-tls", "fit-tls"} <= set(services)
    ports = {str(p.get("target", p)) if isinstance(p, dict) else p for p in services["scheduler"]["ports"]}
    assert any("8786" in p for p in ports) and any("8787" in p for p in ports), ports
    assert services["worker"]["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert "--nthreads=1" in services["worker"]["command"]
    assert "--memory-limit=4g" in services["worker"]["command"]
    assert services["worker"].get("mem_limit") or services["worker"].get("deploy"), "worker needs a memory limit"
    assert "ports" not in services["worker"], "a fixed host port would stop --scale worker=N"
    for name in ("worker", "fit"):  # the shared store: every reader mounts it where the fit job writes it
        volumes = services[name]["volumes"]
        assert any(
            str(v).startswith("store:/store") or (isinstance(v, dict) and v.get("target") == "/store") for v in volumes
        )
    assert services["fit"]["environment"]["DKMEANS_CACHE_DIR"] == "/store"
    for name in ("scheduler-tls", "worker-tls", "fit-tls"):
        assert services[name]["profiles"] == ["tls"]
        assert any(
            "/certs:ro" in str(v) or (isinstance(v, dict) and v.get("target") == "/certs")
            for v in services[name]["volumes"]
        )
    assert "--tls-cert=/certs/node.crt" in services["fit-tls"]["entrypoint"]


# --- process helpers ----------------------------------------------------------------------------


class Processes:
    """Child processes, each in its own session so that stopping one stops its children too."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.procs, self.logs = folder, env, {}, []

    def start(self, name: str, argv: list[str], prefix=()) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        self.logs.append(log)
        proc = subprocess.Popen(
            [*prefix, *argv],
            env=self.env,
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass
        self.procs[name].wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in self.logs:
            log.close()


def wait_for_file(path: Path, proc: subprocess.Popen, what: str, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not start within {timeout} s"
        time.sleep(0.1)
    return json.loads(path.read_text())


def without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option` and its value, in either `--opt value` or `--opt=value` form."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def start_scheduler(
    procs: Processes, compose, name="scheduler", host="127.0.0.1", dashboard=False, replace=None
) -> dict:
    """The compose service's scheduler on `host`, a free port, and the dashboard on a free port or none."""
    sched_file = procs.folder / f"{name}.json"
    argv = service_command(compose, name, {"0.0.0.0": host, "8786": "0", ":8787": f"{host}:0", **(replace or {})})
    if not dashboard:
        argv = without_option(argv, "--dashboard-address") + ["--no-dashboard"]
    argv += ["--scheduler-file", str(sched_file)]
    return wait_for_file(sched_file, procs.start(name, argv), name)


def start_worker(procs: Processes, compose, address: str, i: int, name="worker", host="127.0.0.1", prefix=(), extra=()):
    target = "tls://scheduler-tls:8786" if name == "worker-tls" else "tcp://scheduler:8786"
    argv = service_command(
        compose,
        name,
        {target: address},
        ["--host", host, "--local-directory", str(procs.folder / f"{name}{i}"), *extra],
    )
    return procs.start(f"{name}{i}", argv, prefix)


def cli_env(tmp: Path, data_dir: Path) -> dict:
    env = dict(os.environ, DKMEANS_DATA_DIR=str(data_dir), DKMEANS_CACHE_DIR=str(tmp / "cli-cache"), MPLBACKEND="Agg")
    env.pop("DISPLAY", None)
    return env


def load_model(out: Path):
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "model.npz") as z:
        return metrics, z["cluster_centers"]


# --- a TCP cluster with the dashboard, and one full-MNIST fit through the CLI --------------------


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory, compose, mnist_dir):
    """A `dask scheduler` with its dashboard and two `dask worker` processes on loopback, as compose runs them."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("tcp-cluster")
    procs = Processes(tmp, cli_env(tmp, mnist_dir))
    try:
        info = start_scheduler(procs, compose, dashboard=True)
        address = info["address"]
        for i in range(2):
            start_worker(procs, compose, address, i)
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            yield procs, info, client
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def remote_cli_fit(tcp_cluster, tmp_path_factory, mnist_dir):
    """`dkmeans fit --scheduler` on full MNIST; the dashboard's task stream page is opened first, as a user would."""
    procs, info, client = tcp_cluster
    dashboard = f"http://127.0.0.1:{info['services']['dashboard']}"
    with urllib.request.urlopen(dashboard + "/individual-task-stream", timeout=60) as r:
        assert r.status == 200
    tmp = tmp_path_factory.mktemp("remote-fit")
    started = time.time()
    proc, elapsed = run_cli(
        ["fit", *FULL_FIT, "--scheduler", info["address"], "--out", str(tmp / "out")], cli_env(tmp, mnist_dir), 300
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, tmp / "out", started, dashboard


def test_full_mnist_fit_on_remote_scheduler_equals_local_cluster(remote_cli_fit, client, mnist):
    from dkmeans import KMeans

    proc, out, _, dashboard = remote_cli_fit
    metrics, centers = load_model(out)
    # The reference: the same fit on the test suite's LocalCluster, in process.
    ref = KMeans(10, init="sample", random_state=5, max_iter=8, tol=0, client=client).fit(mnist.train_images)
    assert metrics["n_train"] == 60000 and metrics["n_test"] == 10000
    assert metrics["n_iter"] == ref.n_iter_ == 8
    # Equal to the last digit: same chunks, same kernels, same reduction tree (model.npz and JSON keep every bit).
    np.testing.assert_array_equal(centers, ref.cluster_centers_)
    assert metrics["inertia"] == ref.inertia_
    assert metrics["loss_history"] == ref.loss_history_
    # The progress display works against the remote scheduler: one line per pass, and the dashboard link.
    assert proc.stdout.splitlines()[0] == f"Dask dashboard: {dashboard}/status"
    assert [int(m.group(1)) for m in PROGRESS.finditer(proc.stdout)] == list(range(9))
    assert "60000 training x 784 features in 10 chunks of <= 6000 rows, 2 workers with 2 threads" in proc.stdout


def test_dashboard_answers_and_task_names_are_readable(remote_cli_fit, tcp_cluster):
    from distributed.utils import key_split

    procs, info, client = tcp_cluster
    _, _, started, dashboard = remote_cli_fit
    for path in ("/status", "/individual-task-stream", "/individual-progress", "/info/main/workers.html"):
        with urllib.request.urlopen(dashboard + path, timeout=60) as r:
            assert r.status == 200, path
            assert b"<html" in r.read(4096).lower(), path
    with urllib.request.urlopen(dashboard + "/health", timeout=30) as r:
        assert r.read() == b"ok"
    with urllib.request.urlopen(dashboard + "/json/identity.json", timeout=30) as r:
        assert len(json.loads(r.read())["workers"]) == 2

    # The task stream (what the dashboard draws) names each task by key_split of its key.
    stream = client.get_task_stream(start=started)
    names = {key_split(record["key"]) for record in stream}
    # The passes and the final labels go through chunk hosts (one dkmeans-host actor per worker, called
    # as methods: not tasks; test_chunk_hosts checks the tasks they replace); the sample init reads its rows.
    assert {"dkmeans-host", "dkmeans-take"} <= names, names
    assert not any(re.search(r"[0-9a-f]{12}", name) for name in names), names

    def scheduler_records(dask_scheduler):
        spans = dask_scheduler.extensions["spans"].spans.values()
        return sorted(dask_scheduler.task_prefixes), [
            (s.name, sorted({g.prefix.name for g in s.groups})) for s in spans if s.name == ("dkmeans-fit",)
        ]

    prefixes, fit_spans = client.run_on_scheduler(scheduler_records)
    assert {"dkmeans-host", "dkmeans-take"} <= set(prefixes), prefixes
    # The CLI's fit is one named span holding its tasks.
    assert len(fit_spans) == 1, fit_spans
    assert {"dkmeans-host", "dkmeans-take"} <= set(fit_spans[0][1]), fit_spans


# --- workers in their own network namespaces, reading the store through an fsspec URL ---------


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def namespaces():
    """Two network namespaces on a bridge, each with its own address, as separate hosts would be."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"dkt{os.getpid() % 100000}"
    subnet = f"10.213.{os.getpid() % 200 + 20}"
    bridge, names, made = f"{tag}br", [f"{tag}n{i}" for i in range(2)], []
    try:
        if subnet + "." in _ip("-4", "addr").stdout:
            pytest.skip(f"{subnet}.0/24 is already in use here")
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create network devices here: {exc.stderr.strip()}")
        made.append(("link", bridge))
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        addresses = []
        for i, ns in enumerate(names):
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"`ip netns` is unavailable: {exc.stderr.strip()}")
            made.append(("netns", ns))
            host_end, ns_end = f"{tag}h{i}", f"{tag}v{i}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            made.append(("link", host_end))
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            address = f"{subnet}.{11 + i}"
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", ns_end)
            _ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            addresses.append(address)
        yield f"{subnet}.1", list(zip(names, addresses))
    finally:
        for kind, name in reversed(made):
            _ip(kind, "del", name, check=False)


def test_workers_in_their_own_network_namespaces(namespaces, tmp_path, compose, mnist_dir, client):
    from distributed import Client

    from dkmeans import KMeans
    from dkmeans.data import load_mnist

    host, workers = namespaces
    procs = Processes(tmp_path, cli_env(tmp_path, mnist_dir))
    store = f"file://{tmp_path}/object-store/mnist"  # any fsspec URL; the workers read it by ranged reads
    data = load_mnist(data_dir=mnist_dir, cache_dir=tmp_path / "cache", store=store, train_per_digit=100, seed=72)
    try:
        address = start_scheduler(procs, compose, host=host)["address"]
        for i, (ns, ns_address) in enumerate(workers):
            start_worker(procs, compose, address, i, host=ns_address, prefix=["ip", "netns", "exec", ns])
        with Client(address, timeout=30) as remote:
            remote.wait_for_workers(2, timeout=60)
            seen = sorted(w["host"] for w in remote.scheduler_info()["workers"].values())
            assert seen == sorted(a for _, a in workers), seen
            fitted = KMeans(10, init="sample", random_state=3, max_iter=20, client=remote).fit(data.train_images)
    finally:
        procs.stop_all()
    local = load_mnist(data_dir=mnist_dir, cache_dir=tmp_path / "cache", train_per_digit=100, seed=72)
    ref = KMeans(10, init="sample", random_state=3, max_iter=20, client=client).fit(local.train_images)
    assert fitted.n_iter_ == ref.n_iter_
    np.testing.assert_array_equal(fitted.cluster_centers_, ref.cluster_centers_)
    np.testing.assert_array_equal(fitted.labels_, ref.labels_)
    assert fitted.inertia_ == ref.inertia_


# --- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make temporary certificates")
    tmp = tmp_path_factory.mktemp("certs")
    for name in ("cluster", "stranger"):
        subprocess.run(["sh", str(MAKE_CERTS), str(tmp / name)], check=True, capture_output=True, timeout=60)
    return tmp


def _tls_flags(folder: Path) -> list[str]:
    return [
        "--tls-ca-file",
        str(folder / "ca.crt"),
        "--tls-cert",
        str(folder / "node.crt"),
        "--tls-key",
        str(folder / "node.key"),
    ]


def test_tls_cluster_serves_only_clients_with_its_certificate(certs, tmp_path, compose, mnist_dir):
    import socket
    import ssl

    procs = Processes(tmp_path, cli_env(tmp_path, mnist_dir))
    cluster_certs = {"/certs/": str(certs / "cluster") + "/"}
    try:
        address = start_scheduler(procs, compose, "scheduler-tls", replace=cluster_certs)["address"]
        assert address.startswith("tls://127.0.0.1:")
        argv = service_command(
            compose,
            "worker-tls",
            {"tls://scheduler-tls:8786": address, **cluster_certs},
            ["--host", "127.0.0.1", "--local-directory", str(tmp_path / "w")],
        )
        procs.start("worker-tls0", argv)

        # The CLI with the cluster's certificate fits, with progress, the workers reading a store given by URL.
        store = tmp_path / "object-store" / "mnist"
        flags = _tls_flags(certs / "cluster") + ["--store", f"file://{store}"]
        proc, _ = run_cli(
            ["fit", *SUBSAMPLE_FIT, "--scheduler", address, "--connect-timeout", "60", *flags], procs.env, 300
        )
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n{procs.log('worker-tls0')}"
        assert (store / "manifest.json").is_file() and not (tmp_path / "cli-cache" / "mnist-store-v1").exists()
        assert "1 workers with 1 threads" in proc.stdout
        assert len(PROGRESS.findall(proc.stdout)) >= 2

        # A raw TLS client that trusts the cluster is served with the cluster's certificate and refused
        # without one (an alert or a closed connection, depending on timing).
        hostname, port = address[len("tls://") :].rsplit(":", 1)

        def talk(with_certificate: bool) -> str:
            context = ssl.create_default_context(cafile=str(certs / "cluster" / "ca.crt"))
            context.check_hostname = False
            if with_certificate:
                context.load_cert_chain(certs / "cluster" / "node.crt", certs / "cluster" / "node.key")
            try:
                with (
                    socket.create_connection((hostname, int(port)), timeout=10) as raw,
                    context.wrap_socket(raw) as tls,
                ):
                    tls.settimeout(1.0)
                    try:
                        return "refused: closed" if tls.recv(8) == b"" else "served"
                    except TimeoutError:
                        return "served"  # the scheduler waits for our first message
            except (ssl.SSLError, ConnectionError) as exc:
                return f"refused: {exc}"

        assert talk(with_certificate=True) == "served"
        assert talk(with_certificate=False).startswith("refused")

        # The CLI without certificates, with another CA's certificate, or over plain TCP: clear, quick refusals.
        cases = [
            ([], address, "uses TLS: give --tls-ca-file, --tls-cert and --tls-key"),
            (_tls_flags(certs / "stranger"), address, f"Could not connect to the Dask scheduler at {address}"),
            ([], address.replace("tls://", "tcp://"), "if the scheduler uses TLS"),
            (_tls_flags(certs / "cluster")[:2], address, "missing --tls-cert, --tls-key"),
        ]
        for flags, target, message in cases:
            proc, elapsed = run_cli(
                ["fit", *SUBSAMPLE_FIT, "--scheduler", target, "--connect-timeout", "3", *flags], procs.env, 300
            )
            assert proc.returncode != 0, (flags, target)
            assert message in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
            assert elapsed < 30, elapsed
    finally:
        procs.stop_all()


# --- the scheduler goes away in the middle of a fit -----------------------------------------------


def test_scheduler_lost_mid_fit_is_a_clear_error_within_bounded_time(tmp_path, compose, mnist_dir):
    procs = Processes(tmp_path, cli_env(tmp_path, mnist_dir))
    out = tmp_path / "out"
    try:
        address = start_scheduler(procs, compose)["address"]
        start_worker(procs, compose, address, 0)
        args = ["fit", "--k", "32", "--init", "sample", "--max-iter", "300", "--tol", "0", "--scheduler", address]
        fit = subprocess.Popen(
            [str(BIN / "dkmeans"), *args, "--connect-timeout", "5", "--out", str(out)],
            env=procs.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            for line in fit.stdout:  # wait until the fit is iterating
                if PROGRESS.match(line):
                    break
            else:
                pytest.fail(f"no progress line; stderr:\n{fit.stderr.read()}")
            procs.kill("scheduler")
            killed = time.monotonic()
            stdout, stderr = fit.communicate(timeout=120)
            elapsed = time.monotonic() - killed
        finally:
            if fit.poll() is None:
                fit.kill()
                fit.wait()
    finally:
        procs.stop_all()
    print(f"dkmeans fit exited {elapsed:.1f} s after the scheduler was killed")
    assert fit.returncode != 0
    assert f"Lost the connection to the Dask scheduler at {address} during the fit" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert elapsed < 20, elapsed  # bounded by --connect-timeout (5 s), not a hang
    assert not out.exists() or not any(p.name in {"metrics.json", "model.npz"} for p in out.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "x.crt"], "--tls-ca-file, --tls-cert and --tls-key are for a remote --scheduler"),
        (
            [
                "--scheduler",
                "tls://127.0.0.1:1",
                "--tls-ca-file",
                "/no/ca.crt",
                "--tls-cert",
                "/no/c",
                "--tls-key",
                "/no/k",
            ],
            "--tls-ca-file /no/ca.crt: not a readable file",
        ),
        (["--scheduler", "tls://127.0.0.1:1", "--tls-key", "k.pem"], "missing --tls-ca-file, --tls-cert"),
    ],
)
def test_bad_tls_flags_fail_before_connecting(args, message, tmp_path):
    from click.testing import CliRunner

    from dkmeans.cli import main

    start = time.perf_counter()
    result = CliRunner().invoke(main, ["fit", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert time.perf_counter() - start < 5
