"""A real Apache Kafka broker on demand: single-node KRaft, run from Maven Central jars.

Used by the test harness (one throwaway broker per test session) and by `calm-stream kafka
start|stop|status` (a named broker that outlives the CLI process). The steps:

1. fetch_jars(): `mvn copy-dependencies` on pipeline/kafka/broker/pom.xml, once, into
   ${XDG_CACHE_HOME:-~/.cache}/calm-stream/kafka/<version>/libs (reused afterwards);
2. LocalKafka.start(): render server.properties on free loopback ports, format a fresh
   KRaft log dir (static quorum), launch `java ... kafka.Kafka`, wait until an admin
   client lists topics;
3. LocalKafka.stop(): SIGTERM, wait, SIGKILL; remove the work dir.

A second SASL_PLAINTEXT listener (PLAIN and/or SCRAM-SHA-256, one user) is opened when a
SaslUser is given, so tests can show that a client without credentials is refused. Its password
never appears in a command line (which every user of the machine can read): PLAIN reads it from
the 0600 server.properties, SCRAM gets it through the admin API once the broker serves.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from string import Template
from typing import Self

from kafka.admin import UserScramCredentialUpsertion
from kafka.errors import KafkaError

from pipeline.kafka.clients import admin_client

KAFKA_DIR = Path(__file__).resolve().parent / "broker"
POM = KAFKA_DIR / "pom.xml"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
# TieredStopAtLevel=1 (C1 only) halves the CPU a start costs (about 7 -> 3.7 CPU-seconds) and
# trims ~45 MiB of RSS; a local single-node broker is never CPU bound after that.
JVM_FLAGS = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256")
LOOPBACK = "127.0.0.1"


class KafkaBrokerError(RuntimeError):
    """The local broker could not be fetched, started, reached or stopped."""


@dataclass(frozen=True)
class SaslUser:
    """The one user of the SASL_PLAINTEXT listener, accepted by each of `mechanisms`."""

    username: str
    password: str = field(repr=False)
    mechanisms: tuple[str, ...] = SASL_MECHANISMS

    def __post_init__(self) -> None:
        # The values go verbatim into a JAAS line.
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.username):
            raise ValueError("SASL username must be non-empty ASCII letters, digits, '.', '_', '-'")
        if not re.fullmatch(r"[\x21-\x7e]+", self.password) or set(self.password) & set('"\\,=[]'):
            raise ValueError(
                "SASL password must be non-empty printable ASCII without spaces, "
                "quotes, backslashes, commas, '=' or brackets"
            )
        unknown = set(self.mechanisms) - set(SASL_MECHANISMS)
        if not self.mechanisms or unknown:
            raise ValueError(
                f"SASL mechanisms must be a non-empty subset of {SASL_MECHANISMS}, "
                f"got {self.mechanisms}"
            )


# ---------------------------------------------------------------- jars


@cache
def kafka_version() -> str:
    """The broker version, read from the one place it is written: the pom's kafka.version."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not node.text:
        raise KafkaBrokerError(f"{POM} has no <kafka.version> property")
    return node.text.strip()


def cache_dir() -> Path:
    """Root of everything this module keeps between runs (jars, named brokers)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "calm-stream" / "kafka"


def fetch_jars() -> Path:
    """The folder of broker jars, fetched with Maven the first time and reused afterwards."""
    libs = cache_dir() / kafka_version() / "libs"
    if (libs / f"kafka_2.13-{kafka_version()}.jar").is_file():
        return libs
    if shutil.which("mvn") is None:
        raise KafkaBrokerError(
            "Maven (mvn) is not on PATH. It is needed once to fetch the Kafka broker jars from "
            f"Maven Central into {libs} (e.g. `apt-get install maven`)."
        )
    # Fetch into a private folder and rename it into place, so that an interrupted or
    # concurrent fetch never leaves a half-filled libs/ that looks complete.
    libs.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    cmd = [
        "mvn",
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(POM),
        DEPENDENCY_PLUGIN,
        "-DincludeScope=runtime",
        f"-DoutputDirectory={partial}",
    ]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise KafkaBrokerError(
            f"Could not fetch the Kafka {kafka_version()} jars with `{' '.join(cmd)}` "
            f"(exit {result.returncode}). Is Maven Central reachable?\n"
            + _tail(result.stdout + result.stderr)
        )
    try:
        partial.rename(libs)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    if not (libs / f"kafka_2.13-{kafka_version()}.jar").is_file():
        raise KafkaBrokerError(
            f"{libs} exists but holds no Kafka {kafka_version()} jar: delete it and fetch again"
        )
    return libs


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KafkaBrokerError(
            "Java (17 or newer) is not on PATH; the Kafka broker runs on "
            "the JVM (e.g. `apt-get install openjdk-17-jre-headless`)."
        )
    return java


# ---------------------------------------------------------------- one broker


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: bind port 0 on all of them at once, then release."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _cluster_id() -> str:
    """A KRaft cluster id: 22 chars of URL-safe base64 of a random UUID (what random-uuid prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class LocalKafka:
    """One single-node KRaft broker on free loopback ports; a context manager.

    workdir holds server.properties, the log dir and broker.log; by default it is a fresh
    temporary folder. Either way it is removed by stop(): every start is a fresh cluster.
    detach=True starts the JVM in its own session and does not stop it when this Python
    process exits (the named broker of the CLI); otherwise it is stopped at exit at the latest.
    """

    def __init__(
        self,
        sasl: SaslUser | None = None,
        workdir: Path | None = None,
        detach: bool = False,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.sasl = sasl
        self.workdir = Path(workdir) if workdir else None
        self.detach = detach
        self.startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None

    # -- addresses

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.ports['plaintext']}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        if "sasl" not in self.ports:
            raise KafkaBrokerError("this broker was started without a SASL listener")
        return f"{LOOPBACK}:{self.ports['sasl']}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "broker.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise KafkaBrokerError("the broker is not running")
        return self._proc.pid

    @property
    def _workdir(self) -> Path:
        if self.workdir is None:
            raise KafkaBrokerError("the broker has not been started")
        return self.workdir

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- life cycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        if self._proc is not None:
            raise KafkaBrokerError(f"the broker is already running (pid {self._proc.pid})")
        libs, java = fetch_jars(), _java()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="calm-stream-kafka-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            # A port picked free can be taken by someone else before the JVM binds it.
            for attempt in range(3):
                self._write_config()
                self._format(java, libs)
                self._launch(java, libs)
                try:
                    self._wait_until_serving()
                    self._add_scram_user()
                    break
                except KafkaBrokerError:
                    if attempt == 2 or "Address already in use" not in self.log_text():
                        raise
                    self._terminate()
        except BaseException:
            self.stop()
            raise
        if not self.detach:
            atexit.register(self.stop)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the JVM (SIGTERM, then SIGKILL after timeout_s) and remove the work dir."""
        atexit.unregister(self.stop)
        self._terminate(timeout_s)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def halt(self, timeout_s: float = 30.0) -> None:
        """Stop the JVM but keep its data and listeners: the broker goes away as a restarted or
        rescheduled one does, and `resume` brings it back where its clients look for it."""
        self._terminate(timeout_s)

    def resume(self) -> Self:
        """Start a halted broker again: the same ports, the same logs and committed offsets."""
        if self._proc is not None:
            raise KafkaBrokerError(f"the broker is running (pid {self._proc.pid})")
        self._launch(_java(), fetch_jars())
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _terminate(self, timeout_s: float = 30.0) -> None:
        if self._proc is not None:
            terminate_pid(self._proc.pid, timeout_s)
            self._proc.wait()
            self._proc = None

    # -- steps of start()

    def _write_config(self) -> None:
        names = ["plaintext", "controller"] + (["sasl"] if self.sasl else [])
        self.ports = dict(zip(names, free_ports(len(names))))
        listeners = {"PLAINTEXT": self.ports["plaintext"]}
        if self.sasl:
            listeners["SASL_PLAINTEXT"] = self.ports["sasl"]
        advertised = ",".join(f"{name}://{LOOPBACK}:{port}" for name, port in listeners.items())
        protocols = ["CONTROLLER:PLAINTEXT"] + [f"{name}:{name}" for name in listeners]
        data = self._workdir / "data"
        shutil.rmtree(data, ignore_errors=True)  # a fresh cluster on every (re)try
        text = Template((KAFKA_DIR / "server.properties.template").read_text()).substitute(
            controller_port=self.ports["controller"],
            listeners=f"{advertised},CONTROLLER://{LOOPBACK}:{self.ports['controller']}",
            advertised_listeners=advertised,
            security_protocol_map=",".join(protocols),
            log_dir=data,
        )
        if self.sasl:
            text += Template((KAFKA_DIR / "sasl.properties.template").read_text()).substitute(
                mechanisms=",".join(self.sasl.mechanisms),
                username=self.sasl.username,
                password=self.sasl.password,
            )
        self._config.write_text(text)
        self._config.chmod(0o600)  # it may hold a password

    @property
    def _config(self) -> Path:
        return self._workdir / "server.properties"

    def _jvm(self, java: str, libs: Path, main: str, *args: str) -> list[str]:
        return [
            java,
            *JVM_FLAGS,
            f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def _format(self, java: str, libs: Path) -> None:
        # "=": a base64url id may start with "-", which a separate argument would read as a flag.
        args = ["format", f"--cluster-id={_cluster_id()}", "-c", str(self._config)]
        result = subprocess.run(
            self._jvm(java, libs, "kafka.tools.StorageTool", *args),
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting the KRaft log dir failed (exit {result.returncode})"
                f":\n{_tail(result.stdout + result.stderr)}"
            )

    def _launch(self, java: str, libs: Path) -> None:
        with self.log_path.open("w") as log:
            self._proc = subprocess.Popen(
                self._jvm(java, libs, "kafka.Kafka", str(self._config)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )

    def _add_scram_user(self) -> None:
        """The SCRAM-SHA-256 credentials of the SASL user, set through the PLAINTEXT listener's
        admin API; returns once the SASL listener accepts them."""
        if self.sasl is None or "SCRAM-SHA-256" not in self.sasl.mechanisms:
            return
        user, timeout_ms = self.sasl, round(self.startup_timeout_s * 1000)
        admin = admin_client({"bootstrap_servers": self.bootstrap_servers})
        try:
            errors = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(user.username, "SCRAM-SHA-256", user.password)]
            )
        finally:
            admin.close()
        if errors.get(user.username):
            raise KafkaBrokerError(f"adding the SCRAM user failed: {errors[user.username]}")
        try:  # the broker learns the credentials from the metadata log, a moment later
            admin_client(
                {
                    "bootstrap_servers": self.sasl_bootstrap_servers,
                    "security_protocol": "SASL_PLAINTEXT",
                    "sasl_mechanism": "SCRAM-SHA-256",
                    "sasl_plain_username": user.username,
                    "sasl_plain_password": user.password,
                    "bootstrap_timeout_ms": timeout_ms,
                }
            ).close()
        except KafkaError as error:
            raise KafkaBrokerError(f"the SASL listener refused the SCRAM user: {error}") from None

    def _wait_until_serving(self) -> None:
        """Return once an admin client lists topics; raise with the log tail otherwise."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KafkaBrokerError(
                    f"the Kafka broker exited with code {self._proc.returncode}"
                    f" during start-up; {self.log_path}:\n{_tail(self.log_text())}"
                )
            if all(_port_open(port) for port in self.ports.values()):
                try:
                    admin = admin_client(
                        {
                            "bootstrap_servers": self.bootstrap_servers,
                            "bootstrap_timeout_ms": 5000,
                            "request_timeout_ms": 5000,
                        }
                    )
                    try:
                        admin.list_topics()
                        return
                    finally:
                        admin.close()
                except KafkaError:
                    pass
            time.sleep(0.2)
        raise KafkaBrokerError(
            f"the Kafka broker did not serve within {self.startup_timeout_s:.0f}"
            f" s; {self.log_path}:\n{_tail(self.log_text())}"
        )


# ---------------------------------------------------------------- process helpers


def pid_alive(pid: int) -> bool:
    """True while pid runs; reaps it first if it is our own exited child (a zombie)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall through to the signal-0 probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # running (PermissionError would also mean: it exists, owned by another user)


def terminate_pid(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM (Kafka's clean shutdown), wait up to timeout_s, then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if not pid_alive(pid):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)
    raise KafkaBrokerError(f"the Kafka broker (pid {pid}) survived SIGKILL")


# ---------------------------------------------------------------- named brokers (the CLI)


@dataclass(frozen=True)
class BrokerState:
    """What `start` records about a named broker so that later processes can find it."""

    name: str
    pid: int
    bootstrap_servers: str
    sasl_bootstrap_servers: str | None
    sasl_username: str | None
    ports: dict[str, int]
    workdir: str
    log_path: str
    kafka_version: str
    started_at: float


@dataclass(frozen=True)
class BrokerStatus:
    state: BrokerState
    process_alive: bool
    port_open: bool

    @property
    def running(self) -> bool:
        return self.process_alive and self.port_open


def _named_paths(name: str) -> tuple[Path, Path]:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"broker name {name!r}: use 1-64 letters, digits, '-' or '_'")
    root = cache_dir() / "brokers"
    return root / name, root / f"{name}.json"


def read_state(name: str = "default") -> BrokerState | None:
    """The recorded state of the named broker, or None when none was started."""
    state_file = _named_paths(name)[1]
    if not state_file.exists():
        return None
    try:
        return BrokerState(**json.loads(state_file.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise KafkaBrokerError(
            f"unreadable broker state file {state_file}: {exc}; "
            "delete it and stop any leftover broker by hand"
        ) from exc


def _is_broker_process(state: BrokerState) -> bool:
    """pid_alive, and the pid still belongs to this broker (pids get reused)."""
    if not pid_alive(state.pid):
        return False
    cmdline = Path(f"/proc/{state.pid}/cmdline")
    if not cmdline.parent.exists():  # no procfs: trust the pid
        return True
    try:
        return state.workdir in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return False


def status(name: str = "default") -> BrokerStatus | None:
    """Whether the named broker's process is alive and its port accepts connections."""
    state = read_state(name)
    if state is None:
        return None
    return BrokerStatus(state, _is_broker_process(state), _port_open(state.ports["plaintext"]))


def start(
    name: str = "default", sasl: SaslUser | None = None, startup_timeout_s: float = 120.0
) -> BrokerState:
    """Start the named broker detached from this process and record it in a state file."""
    current = status(name)
    if current is not None and current.process_alive:
        raise KafkaBrokerError(
            f"broker {name!r} is already running at "
            f"{current.state.bootstrap_servers} (pid {current.state.pid})"
        )
    workdir, state_file = _named_paths(name)
    broker = LocalKafka(
        sasl=sasl, workdir=workdir, detach=True, startup_timeout_s=startup_timeout_s
    ).start()
    state = BrokerState(
        name=name,
        pid=broker.pid,
        bootstrap_servers=broker.bootstrap_servers,
        sasl_bootstrap_servers=broker.sasl_bootstrap_servers if sasl else None,
        sasl_username=sasl.username if sasl else None,
        ports=broker.ports,
        workdir=str(workdir),
        log_path=str(broker.log_path),
        kafka_version=kafka_version(),
        started_at=time.time(),
    )
    state_file.write_text(json.dumps(asdict(state), indent=2))
    return state


def stop(name: str = "default", timeout_s: float = 30.0) -> BrokerState | None:
    """Stop the named broker, remove its work dir and state file; None if none was recorded."""
    state = read_state(name)
    if state is None:
        return None
    if _is_broker_process(state):
        terminate_pid(state.pid, timeout_s)
    shutil.rmtree(state.workdir, ignore_errors=True)
    _named_paths(name)[1].unlink(missing_ok=True)
    return state
