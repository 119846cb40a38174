"""Real servers for the deployment test, each in its own process group, stopped by process id.

PostgreSQL comes from Debian's packages (installed when ``initdb`` is absent and ``apt-get`` is
there); its cluster lives in a temporary folder owned by the ``postgres`` user (``initdb``
refuses root). MLflow and Prefect run from this interpreter's environment.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false"}


class Unavailable(RuntimeError):
    """A server cannot run on this machine; the message says what is missing."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path:
    """The folder holding ``initdb``/``postgres``, installing Debian's ``postgresql`` if needed."""
    found = _find_postgres()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise Unavailable("PostgreSQL is not installed (no initdb) and cannot be installed here: "
                          "needs apt-get as root (apt-get install postgresql)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise Unavailable(f"`{' '.join(argv)}` failed: {(result.stdout + result.stderr)[-1500:]}")
    found = _find_postgres()
    if not found:
        raise Unavailable("apt-get install postgresql succeeded but no initdb was found")
    return found


def _find_postgres() -> Path | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "postgres").is_file():
        return Path(initdb).resolve().parent
    return None


def _service_user() -> pwd.struct_passwd | None:
    """initdb and postgres refuse to run as root: the Debian package's ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "postgres"], check=True)
        return pwd.getpwnam("postgres")


@dataclass
class Servers:
    """Everything started, for teardown: process groups in start order."""

    base: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    cleanup: list[Path] = field(default_factory=list)  # folders outside ``base`` to remove at the end

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, user: str | None = None
              ) -> subprocess.Popen:
        log_path = self.base / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, user=user)
        self.procs.append((name, proc))
        self.logs[name] = log_path
        return proc

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""

    def wait_http(self, name: str, url: str, timeout_s: float = 180) -> None:
        wait_http(dict(self.procs)[name], url, timeout_s, lambda: self.tail(name))

    def stop_all(self) -> None:
        """Stop in reverse order: each process group, plus any descendant that left it (a worker's
        flow-run subprocess may sit in a session of its own)."""
        for name, proc in reversed(self.procs):
            family = _descendants(proc.pid)
            # postgres: SIGINT is its "fast" shutdown (SIGTERM waits for clients to leave)
            sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
            _signal_group(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            for pid in family:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.procs.clear()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def wait_http(proc: subprocess.Popen, url: str, timeout_s: float, tail: Callable[[], str]) -> None:
    """Until ``url`` answers 200; fails early when ``proc`` exits, with ``tail()`` of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited ({proc.returncode}):\n{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s:\n{tail()}")
        time.sleep(0.5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    database: str

    def uri(self, with_password: bool = False) -> str:
        """Without the password: psycopg2 reads it from ``PGPASSWORD``, so no command line or
        log line ever shows it."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql+psycopg2://{self.user}{secret}@127.0.0.1:{self.port}/{self.database}"


def start_postgres(servers: Servers, database: str = "mlflow") -> Postgres:
    bindir = postgres_bin()
    owner = _service_user()
    # Not under pytest's tmp_path: its parents are root-only (0700), and postgres must reach it.
    home = Path(tempfile.mkdtemp(prefix="wanda-pg-"))
    servers.cleanup.append(home)
    password = secrets.token_urlsafe(18)
    (home / "pwfile").write_text(password + "\n")
    if owner is not None:
        for path in (home, home / "pwfile"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    user = owner.pw_name if owner else None
    init = subprocess.run([str(bindir / "initdb"), "-D", str(home / "data"), "-U", "wanda", "--auth=scram-sha-256",
                           f"--pwfile={home / 'pwfile'}", "-E", "UTF8", "--no-sync"],
                          capture_output=True, text=True, user=user, cwd=home)
    (home / "pwfile").unlink()
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stdout[-1500:]}{init.stderr[-1500:]}")
    port = free_port()
    servers.start("postgres", [str(bindir / "postgres"), "-D", str(home / "data"), "-h", "127.0.0.1",
                               "-p", str(port), "-k", str(home), "-c", "fsync=off"],
                  env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}, cwd=home, user=user)
    pg = Postgres(port, "wanda", password, database)
    _create_database(servers, pg)
    return pg


def _create_database(servers: Servers, pg: Postgres, timeout_s: float = 60) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password,
                                    dbname="postgres", connect_timeout=3)
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres not accepting connections:\n{servers.tail('postgres')}") from None
            time.sleep(0.5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {pg.database}")
    conn.close()


def start_mlflow(servers: Servers, pg: Postgres) -> str:
    port = free_port()
    artifacts = servers.base / "mlflow-artifacts"
    env = {**os.environ, **OFFLINE, "PGPASSWORD": pg.password}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    servers.start("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", pg.uri(),
                             "--artifacts-destination", str(artifacts)], env=env, cwd=servers.base)
    url = f"http://127.0.0.1:{port}"
    servers.wait_http("mlflow", f"{url}/health", timeout_s=240)
    return url


def prefect_env(servers: Servers, api_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE, "PREFECT_HOME": str(servers.base / "prefect-home"),
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "WANDA_DVC_REMOTE"):
        env.pop(key, None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect(servers: Servers) -> str:
    port = free_port()
    servers.start("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                     "--port", str(port)],
                  env=prefect_env(servers), cwd=servers.base)
    api = f"http://127.0.0.1:{port}/api"
    servers.wait_http("prefect-server", f"{api}/health", timeout_s=240)
    return api
