"""The container engine: containerd (the node's CRI runtime) and dockerd on top of it.

Both run as detached host processes (no systemd here), logging to the state dir's
``engine/logs``. containerd's config is ours (``/etc/containerd/config.toml``): the settings
this machine kind needs for pod sandboxes (see tools/cluster/README.md). dockerd uses that
containerd, so images built with ``docker build`` and the node's images share one daemon.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import (
    CONTAINERD_SOCKET,
    ENGINE_PACKAGES,
    PAUSE_IMAGE,
    Layout,
)
from cake_devtools.cluster.system import (
    apt_install,
    cmdline,
    daemon_env,
    pids_named,
    run,
    succeeds,
    wait_until,
    which,
)
from cake_devtools.stack import process

CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
CNI_BIN_DIR = "/usr/lib/cni"
CNI_CONF_DIR = "/etc/cni/net.d"
START_TIMEOUT = 60.0


def containerd_config(
    *,
    sandbox_image: str = PAUSE_IMAGE,
    cni_bin_dir: str = CNI_BIN_DIR,
    cni_conf_dir: str = CNI_CONF_DIR,
) -> str:
    """containerd 1.6 configuration (version 2) for a kubelet without systemd.

    - ``restrict_oom_score_adj``: the sandbox may not lower ``oom_score_adj`` here, and runc
      fails pod sandboxes ("can't get final child's PID from pipe") unless containerd caps
      the value it asks for at its own.
    - ``sandbox_image``: the locally built pause image (nothing can be pulled).
    - ``SystemdCgroup = false``: cgroupfs, as the kubelet is configured.
    """
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
# Written by cake-cluster engine (tools/devtools/src/cake_devtools/cluster/engine.py).
version = 2

[plugins]
  [{cri}]
    sandbox_image = "{sandbox_image}"
    restrict_oom_score_adj = true
    [{cri}.containerd]
      default_runtime_name = "runc"
      [{cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [{cri}.containerd.runtimes.runc.options]
          SystemdCgroup = false
    [{cri}.cni]
      bin_dir = "{cni_bin_dir}"
      conf_dir = "{cni_conf_dir}"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def containerd_argv(config: Path = CONTAINERD_CONFIG) -> list[str]:
    return [which("containerd"), "--config", str(config)]


def dockerd_argv() -> list[str]:
    return [which("dockerd"), f"--containerd={CONTAINERD_SOCKET}"]


def docker_binary() -> str:
    """Debian's docker CLI (matches dockerd 20.10) before any other on PATH."""
    debian = Path("/usr/bin/docker")
    return str(debian) if debian.is_file() else which("docker")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def containerd_ready() -> bool:
    return Path(CONTAINERD_SOCKET).is_socket() and succeeds(
        [which("ctr"), "--address", CONTAINERD_SOCKET, "version"]
    )


def docker_ready() -> bool:
    return succeeds([docker_binary(), "info", "--format", "{{.ID}}"], timeout=15)


class Engine:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.stamp = layout.engine_dir / "containerd-config.sha256"

    def status(self) -> dict[str, list[int]]:
        return {name: pids_named(name) for name in ("containerd", "dockerd")}

    def up(self) -> str:
        """Install, configure and start what is missing; return a summary for the progress line."""
        apt_install(ENGINE_PACKAGES)
        wanted = containerd_config()
        current = CONTAINERD_CONFIG.read_text() if CONTAINERD_CONFIG.exists() else None
        actions = []
        if current != wanted:
            CONTAINERD_CONFIG.parent.mkdir(parents=True, exist_ok=True)
            if current is not None and not Path(f"{CONTAINERD_CONFIG}.orig").exists():
                Path(f"{CONTAINERD_CONFIG}.orig").write_text(current)
            CONTAINERD_CONFIG.write_text(wanted)
            actions.append("wrote config.toml")
        running = pids_named("containerd")
        stamp = self.stamp.read_text().strip() if self.stamp.exists() else None
        if running and (current != wanted or (stamp is not None and stamp != _digest(wanted))):
            # A containerd started with another config: restart it (shims and their
            # containers survive a containerd restart; dockerd reconnects).
            self._stop_pids("containerd", running)
            running = []
            actions.append("restarted containerd for the new config")
        if not running or not containerd_ready():
            if not running:
                self._start("containerd", containerd_argv())
                actions.append("started containerd")
            wait_until(
                "containerd",
                containerd_ready,
                timeout=START_TIMEOUT,
                log=self.layout.engine_log("containerd"),
            )
        self.stamp.parent.mkdir(parents=True, exist_ok=True)
        self.stamp.write_text(_digest(wanted) + "\n")
        if not pids_named("dockerd"):
            self._start("dockerd", dockerd_argv())
            actions.append("started dockerd")
        wait_until(
            "dockerd", docker_ready, timeout=START_TIMEOUT, log=self.layout.engine_log("dockerd")
        )
        return ", ".join(actions) if actions else "containerd and dockerd already running"

    def down(self) -> str:
        """Stop dockerd, then containerd (their data under /var/lib stays)."""
        stopped = []
        for name in ("dockerd", "containerd"):
            pids = pids_named(name)
            if pids:
                self._stop_pids(name, pids)
                stopped.append(name)
            self.layout.engine_pid(name).unlink(missing_ok=True)
        if "dockerd" in stopped:
            # dockerd set the FORWARD policy to DROP when it started; give it back.
            run([which("iptables"), "-w", "-P", "FORWARD", "ACCEPT"], check=False)
        return f"stopped {' and '.join(stopped)}" if stopped else "not running"

    def _start(self, name: str, argv: list[str]) -> None:
        process.spawn(
            argv,
            log_path=self.layout.engine_log(name),
            env=daemon_env(),
            pid_file=self.layout.engine_pid(name),
        )

    @staticmethod
    def _stop_pids(name: str, pids: list[int], grace: float = 30) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pids_named(name):
            time.sleep(0.2)
        for pid in pids_named(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pids_named(name):
            time.sleep(0.1)
        if pids_named(name):
            raise ClusterError(f"{name} did not stop")


def dockerd_uses_our_containerd() -> bool:
    return any(f"--containerd={CONTAINERD_SOCKET}" in cmdline(pid) for pid in pids_named("dockerd"))


def run_ctr(*args: str, input: str | None = None) -> str:
    return run([which("ctr"), "--address", CONTAINERD_SOCKET, *args], input=input).stdout
