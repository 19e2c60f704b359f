#!/usr/bin/env bash
# Make sure a Docker engine is reachable for the sandbox tier.
#
#   scripts/engine.sh            quiet when an engine answers; otherwise, as root on Debian:
#                                install docker.io + runsc (only what is missing), register runsc
#                                (gVisor) in /etc/docker/daemon.json, start dockerd, wait for it.
#
# Idempotent. Exits non-zero, saying what to do, when no engine can be had. The engine is the
# one DOCKER_HOST names, else unix:///var/run/docker.sock.
set -euo pipefail

SOCKET_URL="${DOCKER_HOST:-unix:///var/run/docker.sock}"
SOCKET="${SOCKET_URL#unix://}"
DAEMON_JSON=/etc/docker/daemon.json
LOG=/var/log/tierkernel-dockerd.log
WAIT="${TIERKERNEL_ENGINE_WAIT:-60}"

say() { echo "==> engine: $*"; }
die() { echo "engine: $*" >&2; exit 1; }

# An engine "is there" when GET /_ping on its socket answers OK. Plain python3 (always present:
# tierkernel needs it) instead of the docker CLI, which may be missing or newer than the daemon.
ping() {
    [ -S "$SOCKET" ] || return 1
    python3 - "$SOCKET" <<'EOF' >/dev/null 2>&1
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
sys.exit(0 if s.recv(64).split(b"\r\n")[0].endswith(b"200 OK") else 1)
EOF
}

# gVisor as a registered runtime. --network=none: runsc refuses to start containers otherwise on
# these machines (see shared/notes/container-tier.md); sandbox containers have no network anyway.
# --host-uds=open: the sandbox agent may connect to the kernel's unix socket, which is mounted
# read-only into its container (the only host socket it can see); without it the tier falls
# back to the slower exec stream. No --platform=kvm: the host's paravirtual KVM makes the
# sandbox spin forever. Returns 0 when the file was changed.
register_runsc() {
    [ -x /usr/bin/runsc ] || return 1
    mkdir -p "$(dirname "$DAEMON_JSON")"
    python3 - "$DAEMON_JSON" <<'EOF'
import json, os, sys
path = sys.argv[1]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
want = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=open"]}
if config.get("runtimes", {}).get("runsc") == want:
    sys.exit(1)
config.setdefault("runtimes", {})["runsc"] = want
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
print(f"==> engine: registered runsc (gVisor) in {path}")
EOF
}

if ping; then
    # A running engine whose runsc registration is out of date: rewrite it and let dockerd
    # reload its runtimes (SIGHUP; running containers keep theirs).
    if [ "$(id -u)" = 0 ] && register_runsc && pgrep -x dockerd >/dev/null; then
        pkill -HUP -x dockerd && sleep 1 && say "dockerd reloaded its runtimes"
    fi
    exit 0
fi

case "$SOCKET_URL" in
    unix:///var/run/docker.sock|unix:///run/docker.sock) ;;
    *) die "no Docker engine answers at $SOCKET_URL (DOCKER_HOST); start it, or unset DOCKER_HOST \
to let this script start a local one" ;;
esac

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "no Docker engine answers at $SOCKET_URL. Start one (e.g. 'sudo systemctl start docker'), \
or run this script as root on Debian to install docker.io and runsc and start dockerd."
fi

# Packages: only the missing ones, so a machine that has them never touches apt.
missing=()
for pkg in docker.io runsc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    apt-get update -qq >"$apt_log" 2>&1 || true
    # runsc is optional: without it the sandbox tier runs on runc only.
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1; then
        apt-get install -y -qq --no-install-recommends docker.io >>"$apt_log" 2>&1 \
            || die "apt-get install docker.io failed: $(tail -n 5 "$apt_log")"
        say "runsc (gVisor) could not be installed; the sandbox tier will use runc only"
    fi
    rm -f "$apt_log"
fi
register_runsc || true

# dockerd may already be starting (a previous run, the package's postinst): then just wait.
if ! pgrep -x dockerd >/dev/null; then
    command -v dockerd >/dev/null || die "dockerd not found after installing docker.io"
    say "starting dockerd (log: $LOG)"
    # setsid + nohup: the daemon outlives this script and the test run that called it.
    setsid nohup dockerd >>"$LOG" 2>&1 </dev/null &
fi

for _ in $(seq "$((WAIT * 5))"); do
    if ping; then
        say "dockerd is up at $SOCKET_URL"
        exit 0
    fi
    sleep 0.2
done
die "dockerd did not answer at $SOCKET_URL within ${WAIT}s; see the end of $LOG:
$(tail -n 15 "$LOG" 2>/dev/null)"
