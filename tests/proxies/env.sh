#!/usr/bin/env bash
# Real HAProxy and nginx for the agent tests: Debian's `haproxy` and
# `nginx-light`, installed once if missing. The tests run them as child
# processes with their own configs on loopback ports, never as the system
# services, so the install does not start those (RUNLEVEL=1 makes
# invoke-rc.d skip them).
#
#   env.sh haproxy   print HAProxy's path (installs if needed)
#   env.sh nginx     print nginx's path (installs if needed)
set -euo pipefail

log() { echo "proxies env: $*" >&2; }
die() { log "$*"; exit 1; }

install() {
    local bin="$1" pkg="$2"
    [[ -x "$bin" ]] && return 0
    # Test binaries may ask at once: one installs, the others wait.
    exec 9>/tmp/signpost-proxies-install.lock
    flock 9
    if [[ ! -x "$bin" ]]; then
        log "installing Debian $pkg"
        apt-get update -q >&2
        RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >&2
    fi
    exec 9>&-
    [[ -x "$bin" ]] || die "no $bin after installing $pkg"
}

case "${1:-}" in
    haproxy)
        install /usr/sbin/haproxy haproxy
        echo /usr/sbin/haproxy
        ;;
    nginx)
        install /usr/sbin/nginx nginx-light
        echo /usr/sbin/nginx
        ;;
    *)
        die "usage: env.sh haproxy|nginx"
        ;;
esac
