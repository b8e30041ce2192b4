#!/usr/bin/env bash
# vmswarm's one entry point: `bash run.sh demo` runs the local demo, `bash run.sh test` runs every check.
# Each command installs what it needs first (apt packages, .venv, pip dependencies); re-runs skip what is done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
APT_PACKAGES=(
    python3-venv python3-dev gcc iproute2 qemu-utils
    # libvirt-python builds against libvirt-dev; the real VM tests and the demo boot under libvirtd + qemu.
    libvirt-dev pkg-config libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
    # The tiny bootable test disk (daemon/bootdisk.py): partition, FAT16, syslinux, initramfs.
    syslinux syslinux-common mtools dosfstools fdisk cpio
    # The cluster benchmark's baselines: aria2 downloads from lighttpd mirrors (byte ranges).
    aria2 lighttpd
    # A real Prometheus scrapes a test cluster's /metrics (tests/e2e/test_prometheus_scrape.py).
    prometheus
    # systemd-analyze verifies the units in systemd/ (tests/e2e/test_systemd_units.py).
    systemd
    # A silently dead link (DROP, no RST) in tests/e2e/test_faults_dead_link.py.
    iptables
)
LIBVIRT_URI="qemu:///system"

log() { printf '[run.sh] %s\n' "$*" >&2; }

install_apt() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            log "missing apt packages (${missing[*]}); run as root or install them"; exit 1
        fi
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

install_venv() {
    local stamp="$VENV/.installed" want
    want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    log "creating $VENV and installing vmswarm with its dependencies"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e "$ROOT[dev,bench]"
    # mypy cannot follow setuptools' editable import hook, so it reads the code through this view.
    mkdir -p "$VENV/typecheck/vmswarm"
    for pkg in swarm daemon cli; do ln -sfn "$ROOT/$pkg" "$VENV/typecheck/vmswarm/$pkg"; done
    echo "$want" >"$stamp"
}

bootstrap() {
    install_apt
    install_venv
}

libvirt_answers() {
    command -v virsh >/dev/null && timeout 10 virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1
}

# qemu runs as libvirt-qemu, and a root-only /dev/kvm makes every domain start re-probe for ~56 s.
fix_kvm_device() {
    if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
        chgrp kvm /dev/kvm && chmod 660 /dev/kvm || log "could not open /dev/kvm to the kvm group"
    fi
}

# Real VM tests and the demo need libvirtd; there is no systemd in the sandbox, so start it by hand.
start_libvirtd() {
    if [[ $(id -u) -ne 0 ]]; then
        libvirt_answers || log "libvirtd is not answering on $LIBVIRT_URI and only root can start it"
        return 0
    fi
    fix_kvm_device
    libvirt_answers && return 0
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        log "starting virtlogd and libvirtd with systemctl"
        systemctl start virtlogd.socket libvirtd.socket libvirtd.service || true
    else
        log "starting virtlogd and libvirtd"
        pgrep -x virtlogd >/dev/null || virtlogd -d || log "virtlogd did not start"
        pgrep -x libvirtd >/dev/null || libvirtd -d || log "libvirtd did not start"
    fi
    for _ in $(seq 1 60); do
        libvirt_answers && return 0
        sleep 0.5
    done
    log "libvirtd does not answer on $LIBVIRT_URI; the real VM boot test and the demo's launch cannot run"
}

cmd_test() {
    bootstrap
    start_libvirtd
    cd "$ROOT"
    log "ruff"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    log "mypy"
    "$VENV/bin/mypy"
    log "pytest"
    # pytest exits 5 when it collected nothing; that is a failure here like any other non-zero code.
    "$VENV/bin/pytest" "$@"
}

cmd_demo() {
    bootstrap
    start_libvirtd
    cd "$ROOT"
    "$PY" -m vmswarm.cli.demo "$@"
}

case "${1:-}" in
    test) shift; cmd_test "$@" ;;
    demo) shift; cmd_demo "$@" ;;
    setup) bootstrap ;;
    *) echo "usage: bash run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
