"""Boot a real systemd (PID 1 of fresh PID/mount/UTS/IPC/cgroup namespaces) and run the shipped unit in it.

The harness proves `deploy/systemd/binner.service` for real: `systemctl start` waits for READY=1 through the
actual notify socket, the sandbox (User=binner, ProtectSystem=strict, ReadWritePaths, DevicePolicy=closed,
the system call filter) is applied by the real manager, and `systemctl stop` must end with Result=success.

Isolation from the host is the first concern (a PID 1 systemd runs tmpfiles, sysctl, sysusers and the like
against whatever file system it sees). So the booted manager
- sees only the units of this test: SYSTEMD_UNIT_PATH names one directory, SYSTEMD_GENERATOR_PATH an empty one;
- has fresh tmpfs on /run, /tmp, /var/tmp, /var/lib, /var/cache, /var/log and /srv, its own hostname (UTS
  namespace) and a cgroup subtree of its own, removed afterwards;
- is killed with SIGKILL (the whole PID namespace dies with it) on teardown, whatever happened.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "binner.service"
SYSTEMD = Path("/lib/systemd/systemd")
BINNER = REPO / ".venv" / "bin" / "binner"
SHARED = REPO.parent / "shared"
SERVICE_USER = "binner"
SERVICE_UID = 64_123  # only inside the namespace (a private /etc/passwd); chosen far from real accounts

# Units that stand in for the distribution's targets: empty, so nothing of the host's boot runs.
_STUB_UNITS = {
    "harness.target": "[Unit]\nDescription=binner test harness\n",
    "sysinit.target": "[Unit]\nDescription=stub sysinit\n",
    "basic.target": "[Unit]\nDescription=stub basic\n",
    "shutdown.target": "[Unit]\nDescription=stub shutdown\nDefaultDependencies=no\n",
    "network-online.target": "[Unit]\nDescription=stub network-online\n",
    "local-fs.target": "[Unit]\nDescription=stub local-fs\n",
    "remote-fs.target": "[Unit]\nDescription=stub remote-fs\n",
    "multi-user.target": "[Unit]\nDescription=stub multi-user\n",
    "system.slice": "[Unit]\nDescription=System Slice\nDefaultDependencies=no\n",
}

_BOOT_SCRIPT = """\
#!/bin/sh
# Runs as PID 1 of new namespaces, sets up a private file system view, then becomes systemd.
set -eu
[ "$$" = 1 ] || { echo "refusing: not PID 1 of a new PID namespace" >&2; exit 97; }
W="$1"
# K: the folder holding the checkout and ../shared; kept visible wherever it is (a CI clone may live in /tmp).
K="$4"
mount -t tmpfs -o mode=0755 harness-run /run
mkdir -p /run/harness
mount --bind "$W" /run/harness
if [ "$K" != / ]; then mkdir -p /run/harness-keep && mount --rbind "$K" /run/harness-keep; fi
for d in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 harness-tmp "$d"; done
for d in /var/lib /var/cache /var/log /srv; do mount -t tmpfs -o mode=0755 harness-var "$d"; done
if [ "$K" != / ]; then mkdir -p "$K" && mount --rbind /run/harness-keep "$K"; fi
mkdir -p /srv/binner
mount --bind /run/harness/srv /srv/binner
mount --bind /run/harness/etc/passwd /etc/passwd
mount --bind /run/harness/etc/group /etc/group
# systemd logs to /dev/console only when it is a terminal: a pseudo-terminal whose other end the test reads.
mount --bind "$3" /dev/console
mount -t cgroup2 cgroup2 /sys/fs/cgroup
hostname binner-harness
export container=binner-test
export SYSTEMD_UNIT_PATH=/run/harness/units
export SYSTEMD_GENERATOR_PATH=/run/harness/empty
export SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/harness/empty
exec "$2" --system --unit=harness.target --log-target=console --log-level=info --show-status=no
"""


def _why_not_bootable() -> str | None:
    """The reason this host cannot run the harness, or None."""
    if os.geteuid() != 0:
        return "needs root to create PID/mount/cgroup namespaces and boot systemd"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` (util-linux) is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is missing (install the `systemd` package)"
    if _cgroup2_dir() is None:
        return "no cgroup2 (unified) hierarchy is mounted"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--mount-proc", "true"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


def _cgroup2_dir() -> Path | None:
    """This process's own cgroup in the cgroup2 hierarchy (unified or hybrid layout)."""
    mount_point = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            mount_point = left.split()[4]
            break
    if mount_point is None:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path(mount_point) / line[3:].lstrip("/")
    return None


class BootedSystemd:
    """A systemd PID 1 in throwaway namespaces; drive it with :meth:`systemctl`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.units = work / "units"
        self.srv = work / "srv"  # /srv/binner inside
        self.logs = work / "logs"  # /run/harness/logs inside
        self.console = work / "console.log"
        self.cgroup: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self._console_master: int | None = None
        self._console_slave: int | None = None
        self._console_reader: threading.Thread | None = None
        for directory in (self.units, work / "empty", work / "etc", self.srv, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self.console.touch()
        for name, text in _STUB_UNITS.items():
            (self.units / name).write_text(text)
        self._write_accounts()
        (work / "boot.sh").write_text(_BOOT_SCRIPT)
        # The service user must reach /run/harness (bind of work) and its log files.
        os.chmod(work, 0o755)
        os.chmod(self.logs, 0o755)

    def _write_accounts(self) -> None:
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if not passwd.endswith("\n"):
            passwd += "\n"
        if not group.endswith("\n"):
            group += "\n"
        passwd += f"{SERVICE_USER}:x:{SERVICE_UID}:{SERVICE_UID}:binner:/var/lib/binner:/usr/sbin/nologin\n"
        group += f"{SERVICE_USER}:x:{SERVICE_UID}:\n"
        (self.work / "etc" / "passwd").write_text(passwd)
        (self.work / "etc" / "group").write_text(group)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        parent = _cgroup2_dir()
        assert parent is not None
        self.cgroup = parent / f"binner-harness-{os.getpid()}-{time.monotonic_ns()}"
        self.cgroup.mkdir()
        procs = self.cgroup / "cgroup.procs"
        self._console_master, self._console_slave = os.openpty()
        self._console_reader = threading.Thread(target=self._copy_console, daemon=True)
        self._console_reader.start()

        def join_cgroup() -> None:  # runs in the child before exec: the namespace's cgroup root is ours
            procs.write_text("0")

        self.process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--mount-proc",
             "--propagation", "private", "/bin/sh", str(self.work / "boot.sh"), str(self.work), str(SYSTEMD),
             os.ttyname(self._console_slave), str(REPO.resolve().parent)],
            stdin=subprocess.DEVNULL, stdout=(self.work / "unshare.log").open("wb"), stderr=subprocess.STDOUT,
            preexec_fn=join_cgroup, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            try:
                listed = children.read_text().split()
            except OSError:
                listed = []
            if listed:
                self.pid1 = int(listed[0])
            elif self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"namespace did not start (rc={self.process.poll()})\n{self.diagnostics()}")
            else:
                time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            result = self.systemctl("is-system-running", check=False, timeout=10)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"systemd did not come up (state {state!r})\n{self.diagnostics()}")

    def _copy_console(self) -> None:
        with self.console.open("ab", buffering=0) as sink:
            while True:
                try:
                    chunk = os.read(self._console_master, 65536)
                except OSError:  # EIO once every slave end is closed, EBADF after close()
                    return
                if not chunk:
                    return
                sink.write(chunk)

    def close(self) -> None:
        """Kill the namespace (SIGKILL to its PID 1 takes every process in it) and remove its cgroups."""
        if self.process is not None:
            for target in (self.pid1, self.process.pid):
                if target is not None:
                    try:
                        os.kill(target, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for fd in (self._console_slave, self._console_master):
            if fd is not None:
                os.close(fd)
        if self._console_reader is not None:
            self._console_reader.join(timeout=5)
        if self.cgroup is not None and self.cgroup.exists():
            deadline = time.monotonic() + 30
            for directory in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), reverse=True) + [self.cgroup]:
                while True:
                    try:
                        directory.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        (directory / "cgroup.kill").write_text("1") if (directory / "cgroup.kill").exists() else None
                        time.sleep(0.1)

    # -- driving ------------------------------------------------------------------------------------------
    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self.pid1 is not None
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "--", "systemctl", "--no-pager", *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} failed (rc={result.returncode}): {result.stderr.strip()}\n"
                + self.diagnostics()
            )
        return result

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", "-p", ",".join(properties), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, predicate: Callable[[dict[str, str]], bool], timeout: float,
                 properties: tuple[str, ...] = ("ActiveState", "SubState", "StatusText", "Result")) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.show(unit, *properties)
            if predicate(state):
                return state
            time.sleep(0.2)
        raise AssertionError(f"{unit}: condition not met in {timeout} s; last state {state}\n{self.diagnostics(unit)}")

    def install_unit(self, text: str, name: str = "binner.service", dropin: str | None = None) -> None:
        (self.units / name).write_text(text)
        if dropin is not None:
            directory = self.units / f"{name}.d"
            directory.mkdir(exist_ok=True)
            (directory / "50-harness.conf").write_text(dropin)
        if self.pid1 is not None:
            self.systemctl("daemon-reload")

    def diagnostics(self, unit: str | None = None) -> str:
        parts = [f"--- console (systemd) ---\n{_tail(self.console)}",
                 f"--- unshare ---\n{_tail(self.work / 'unshare.log')}"]
        for log in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{_tail(log)}")
        if unit and self.pid1 is not None:
            try:
                status = self.systemctl("status", unit, check=False, timeout=10)
                parts.append(f"--- systemctl status {unit} ---\n{status.stdout}{status.stderr}")
            except (subprocess.TimeoutExpired, OSError) as error:
                parts.append(f"(systemctl status failed: {error})")
        return "\n".join(parts)


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(none)"


pytestmark = pytest.mark.system


@pytest.fixture
def booted() -> Iterator[BootedSystemd]:
    reason = _why_not_bootable()
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="binner-sd-", dir="/tmp"))
    harness = BootedSystemd(work)
    try:
        harness.start()
        yield harness
    finally:
        harness.close()
        shutil.rmtree(work, ignore_errors=True)


def _own_for_service(path: Path, uid: int) -> None:
    for entry in [path, *path.rglob("*")]:
        os.chown(entry, uid, uid)


# A stand-in daemon for the harness test: the same notify protocol as `binner run`, through app/service/notify.py.
_HELLO = """\
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from app.service.notify import SystemdNotifier

notifier = SystemdNotifier()
reloads = 0
stop = False

def on_hup(*_):
    global reloads
    notifier.reloading()
    reloads += 1
    notifier.ready(status=f"reloaded {reloads}")

def on_term(*_):
    global stop
    stop = True

signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_term)
report = [f"uid={os.getuid()}", f"watchdog={notifier.watchdog_interval_s()}"]
for path in ("/srv/binner/bins/probe", "/srv/binner/inbox/probe", "/etc/binner-probe", "/var/lib/binner/probe"):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        report.append(f"write:{path}=ok")
    except OSError as error:
        report.append(f"write:{path}={error.errno}")
try:  # inbox -> bins must be one mount, else rename() fails with EXDEV (18) and `move` has to copy
    os.rename("/srv/binner/inbox/probe", "/srv/binner/bins/moved")
    report.append("rename=ok")
except OSError as error:
    report.append(f"rename={error.errno}")
print(" ".join(report), flush=True)
notifier.ready(status="hello ready")
while not stop:
    notifier.watchdog()
    time.sleep(0.2)
notifier.stopping(status="draining")
print("drained", flush=True)
sys.exit(0)
"""


def _stage_notify_module(work: Path) -> str:
    """Copy app/service/notify.py (stdlib only) where User=binner can read it; returns its path inside the namespace.

    A checkout below a 0700 directory (``tempfile.mkdtemp``, many CI workspaces) is closed to the service user,
    so importing ``app`` from the checkout itself fails there with "No module named 'app'". The service package's
    face is left out (it imports the whole daemon): an empty ``__init__.py`` stands for it.
    """
    package = work / "lib" / "app"
    (package / "service").mkdir(parents=True)
    shutil.copyfile(REPO / "app" / "__init__.py", package / "__init__.py")
    shutil.copyfile(REPO / "app" / "service" / "notify.py", package / "service" / "notify.py")
    (package / "service" / "__init__.py").write_text("")
    for path in (package / "__init__.py", package / "service" / "notify.py", package / "service" / "__init__.py"):
        os.chmod(path, 0o644)
    for directory in (work / "lib", package, package / "service"):
        os.chmod(directory, 0o755)
    return "/run/harness/lib"


def test_harness_runs_the_shipped_unit_with_a_notify_stand_in(booted: BootedSystemd) -> None:
    """The real unit, only ExecStart replaced: READY, reload, watchdog, sandbox, clean stop."""
    (booted.work / "hello.py").write_text(_HELLO)
    library = _stage_notify_module(booted.work)
    for sub in ("inbox", "bins"):
        (booted.srv / sub).mkdir()
    _own_for_service(booted.srv, SERVICE_UID)
    booted.install_unit(
        UNIT.read_text(),
        dropin=textwrap.dedent(f"""\
            [Service]
            ExecStart=
            ExecStart=/usr/bin/python3 /run/harness/hello.py {library}
            StandardOutput=append:/run/harness/logs/binner.log
            StandardError=inherit
            """) + _checkout_binds(),
    )
    booted.systemctl("start", "binner.service", timeout=120)  # returns only after READY=1 (Type=notify)
    state = booted.show("binner.service", "ActiveState", "SubState", "StatusText", "MainPID", "User", "NRestarts")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), booted.diagnostics("binner.service")
    assert state["StatusText"] == "hello ready"

    booted.systemctl("reload", "binner.service", timeout=60)
    booted.wait_for("binner.service", lambda s: s["StatusText"] == "reloaded 1" and s["ActiveState"] == "active",
                    timeout=30)

    booted.systemctl("stop", "binner.service", timeout=120)
    final = booted.show("binner.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    assert final["ActiveState"] == "inactive", booted.diagnostics("binner.service")
    assert final["Result"] == "success"
    assert final["ExecMainStatus"] == "0"
    assert final["NRestarts"] == "0"

    output = (booted.logs / "binner.log").read_text()
    first = output.splitlines()[0].split()
    report = dict(part.split("=", 1) for part in first)
    assert report["uid"] == str(SERVICE_UID), "User=binner was not applied"
    assert report["watchdog"] == "60.0", "WatchdogSec=60 did not reach the service"
    assert report["write:/srv/binner/bins/probe"] == "ok"
    assert report["write:/srv/binner/inbox/probe"] == "ok"
    assert report["write:/var/lib/binner/probe"] == "ok", "StateDirectory= is not writable"
    assert report["write:/etc/binner-probe"] == "30", "ProtectSystem=strict must make /etc read-only (EROFS)"
    assert report["rename"] == "ok", "inbox -> bins rename failed (18 = EXDEV: ReadWritePaths= split the mounts)"
    assert "drained" in output


def test_harness_kills_a_service_that_never_becomes_ready(booted: BootedSystemd) -> None:
    """The harness can tell failure from success: a notify service that never sends READY=1 times out."""
    booted.install_unit(
        "[Service]\nType=notify\nExecStart=/bin/sleep 600\nTimeoutStartSec=2\n", name="never-ready.service"
    )
    result = booted.systemctl("start", "never-ready.service", check=False, timeout=60)
    assert result.returncode != 0
    state = booted.show("never-ready.service", "ActiveState", "Result")
    assert state["Result"] == "timeout"
    assert state["ActiveState"] in ("failed", "inactive")


# -- the daemon itself ------------------------------------------------------------------------------------
def _interpreter_reachable_by_others(binner: Path) -> bool:
    """Whether an unprivileged user can run the venv (pyenv under /root is not)."""
    first_line = binner.read_text(errors="replace").splitlines()[0] if binner.exists() else ""
    interpreter = Path(first_line[2:].strip().split()[0]) if first_line.startswith("#!") else binner
    for target in (interpreter.resolve(), binner.resolve()):
        for parent in [*reversed(target.parents), target]:
            mode = parent.stat().st_mode
            if parent != target and not mode & 0o001:
                return False
        if any(str(target).startswith(p) for p in ("/root/", "/home/")):
            return False
    return True


def _venv_dropin(exec_start: str, log_name: str) -> tuple[str, bool]:
    """A drop-in running ``exec_start`` from the repo's venv; (text, confined as User=binner)."""
    confined = _interpreter_reachable_by_others(BINNER)
    text = textwrap.dedent(f"""\
        [Service]
        ExecStart=
        ExecStart={exec_start}
        StandardOutput=append:/run/harness/logs/{log_name}
        StandardError=inherit
        Environment=YOLO_OFFLINE=1 HF_HUB_OFFLINE=1
        """)
    if not confined:
        # The venv's interpreter lives where an unprivileged user cannot go (e.g. pyenv under /root): run the
        # same sandbox as root with no capabilities, and with home directories visible.
        text += "User=root\nGroup=root\nProtectHome=no\n"
    return text + _checkout_binds(), confined


def _checkout_binds() -> str:
    """The unit's PrivateTmp= gives the service an empty /tmp; a checkout there (a CI clone) is bound back."""
    keep = REPO.resolve().parent
    if any(keep.is_relative_to(p) for p in (Path("/tmp"), Path("/var/tmp"))):
        return f"BindReadOnlyPaths={keep}\n"
    return ""


_TORCH_PROBE = """\
import signal, sys
sys.path.insert(0, sys.argv[1])
import torch
from app.service.notify import SystemdNotifier

x = torch.rand(4, 64, 96, 96)
y = torch.nn.Conv2d(64, 64, 3, padding=1)(x)  # oneDNN builds this kernel at run time (JIT)
print("conv ok", tuple(y.shape), flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
SystemdNotifier().ready(status="torch ok")
signal.pause()
"""


def test_torch_cpu_kernels_need_the_units_wx_memory(booted: BootedSystemd) -> None:
    """torch's CPU convolution runs inside the unit's sandbox, and fails once W^X is enforced.

    This is the measured reason binner.service keeps MemoryDenyWriteExecute=no.
    """
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} is missing: run `make test` (it creates the repo's .venv) first")
    if subprocess.run([str(python), "-c", "import torch"], capture_output=True, timeout=120).returncode != 0:
        pytest.skip(f"torch is not importable by {python}")
    (booted.work / "torch_probe.py").write_text(_TORCH_PROBE)
    for sub in ("inbox", "bins"):
        (booted.srv / sub).mkdir()
    dropin, confined = _venv_dropin(f"{python} /run/harness/torch_probe.py {REPO}", "binner.log")
    if confined:
        _own_for_service(booted.srv, SERVICE_UID)
    booted.install_unit(UNIT.read_text(), dropin=dropin)
    assert "MemoryDenyWriteExecute=no" in UNIT.read_text()
    booted.systemctl("start", "binner.service", timeout=300)
    assert booted.show("binner.service", "StatusText")["StatusText"] == "torch ok"
    booted.systemctl("stop", "binner.service", timeout=60)
    assert booted.show("binner.service", "Result")["Result"] == "success", booted.diagnostics("binner.service")

    wx_dropin = booted.units / "binner.service.d" / "60-wx.conf"
    wx_dropin.write_text("[Service]\nMemoryDenyWriteExecute=yes\nRestart=no\n")
    booted.systemctl("daemon-reload")
    result = booted.systemctl("start", "binner.service", check=False, timeout=300)
    state = booted.show("binner.service", "Result", "ExecMainStatus")
    assert result.returncode != 0 and state["Result"] == "exit-code", (
        "torch's CPU convolution now works under MemoryDenyWriteExecute=yes: consider enabling it in "
        f"binner.service (and update its comment); state {state}"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _test_config(base: Path | None, port: int) -> str:
    import yaml

    from app.config import read_config_file

    config: dict = read_config_file(base) if base and base.exists() else {}  # relative paths anchored at base
    config = config or {}
    config.update(
        input="/srv/binner/inbox", output="/srv/binner/bins", state_dir="/srv/binner/state",
        placement="move", settle_ms=200, rescan_interval_s=2.0, drain_timeout_s=30,
    )
    config["http"] = {**config.get("http", {}), "enabled": True, "host": "127.0.0.1", "port": port}
    config["log"] = {**config.get("log", {}), "format": "json"}
    # Relative model paths in the examples are relative to the repository; the service runs in /var/lib/binner.
    vision = config.get("vision") or {}
    for section, key in (("detector", "weights"), ("captioner", "model"), ("clip", "model")):
        value = (vision.get(section) or {}).get(key)
        if isinstance(value, str) and not value.startswith("/") and (REPO / value).exists():
            vision[section][key] = str((REPO / value).resolve())
    return yaml.safe_dump(config, sort_keys=False)


@pytest.mark.timeout(900)
def test_binner_daemon_under_systemd(booted: BootedSystemd) -> None:
    """`systemctl start binner` with the real daemon: READY, files sorted into bins, clean stop."""
    if not BINNER.exists():
        pytest.skip(f"{BINNER} is missing: run `make test` (it creates the repo's .venv) first")
    images = [
        image
        for category in sorted((SHARED / "data" / "images").glob("*/"))
        for image in sorted(p for p in category.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:2]
    ] if (SHARED / "data" / "images").is_dir() else []
    if not images:
        pytest.skip(f"no images under {SHARED / 'data' / 'images'} (shared data absent)")
    # The shipped defaults need downloadable weights; the offline example runs on what this machine has.
    base = Path(os.environ.get("BINNER_SYSTEMD_TEST_CONFIG") or REPO / "deploy" / "examples" / "offline-cpu.yaml")
    if not base.exists():
        pytest.skip(f"{base} is missing: the daemon test needs a configuration that runs offline")
    (booted.work / "binner.yaml").write_text(_test_config(base, _free_port()))
    for sub in ("inbox", "bins", "state"):
        (booted.srv / sub).mkdir()

    dropin, confined = _venv_dropin(f"{BINNER} run --config /run/harness/binner.yaml", "binner.log")
    if confined:
        _own_for_service(booted.srv, SERVICE_UID)
    booted.install_unit(UNIT.read_text(), dropin=dropin)

    booted.systemctl("start", "binner.service", timeout=660)
    state = booted.show("binner.service", "ActiveState", "SubState", "StatusText")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), booted.diagnostics("binner.service")

    inbox = booted.srv / "inbox"
    for image in images:
        staged = inbox / f".{image.name}.part"
        shutil.copyfile(image, staged)
        if confined:
            os.chown(staged, SERVICE_UID, SERVICE_UID)
        staged.rename(inbox / image.name)  # appears by rename: complete at once

    deadline = time.monotonic() + 300
    placed: list[Path] = []
    while time.monotonic() < deadline:
        placed = [p for p in (booted.srv / "bins").rglob("*") if p.is_file() and p.name in {i.name for i in images}]
        if len(placed) == len(images):
            break
        time.sleep(0.5)
    assert len(placed) == len(images), f"placed {placed}\n{booted.diagnostics('binner.service')}"
    for path in placed:
        assert path.relative_to(booted.srv / "bins").parts[0] in {"A", "B", "C", "_quarantine"}

    booted.systemctl("stop", "binner.service", timeout=180)
    final = booted.show("binner.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert final["Result"] == "success", booted.diagnostics("binner.service")
    assert final["ExecMainStatus"] == "0"
    assert final["NRestarts"] == "0"
    assert not [p for p in inbox.iterdir() if p.name in {i.name for i in images}], "placement=move left inputs behind"
    events = []
    for line in (booted.logs / "binner.log").read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # third-party libraries print plain lines
    assert any(isinstance(e, dict) and "event" in e for e in events), "log.format json: no JSON log lines on stdout"


def test_service_user_is_real_for_the_harness() -> None:
    """Guard: the harness's service uid must not collide with an account of this machine."""
    with pytest.raises(KeyError):
        pwd.getpwuid(SERVICE_UID)
