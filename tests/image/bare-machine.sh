#!/bin/sh
# The README's two commands on a bare Debian machine: a container of Debian bookworm with only
# python3, python3-venv, git and make, on the host's network, as root, without stdin. In it, a
# fresh clone of this repository's HEAD runs `make run` (checked: /readyz answers on both ports,
# no test tool installed, then stopped) and then `make test`.
#   tests/image/bare-machine.sh          (make test-bare; needs root, debootstrap and Docker)
# When the environment names a CA bundle (PIP_CERT or SSL_CERT_FILE, as on a machine behind a
# TLS-inspecting proxy), it is mounted read-only and named the same way inside.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
docker=${DOCKER:-docker}
image=hermes-media-bare:bookworm
"$root/tests/image/debian-base.sh" "$image" git make

work=$(mktemp -d /var/tmp/hermes-bare.XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM
git -C "$root" bundle create "$work/repo.bundle" HEAD 2>/dev/null

set -- --rm --network host --shm-size 1g -e CI=true -v "$work:/src:ro"
bundle=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$bundle" ]; then
    set -- "$@" -v "$bundle:/etc/hermes-ca.pem:ro" \
        -e PIP_CERT=/etc/hermes-ca.pem -e SSL_CERT_FILE=/etc/hermes-ca.pem
fi

# shellcheck disable=SC2016 # expanded inside the container
"$docker" run "$@" "$image" sh -euc '
    git clone -q -c advice.detachedHead=false /src/repo.bundle /root/hermes-media && cd /root/hermes-media
    start=$(date +%s)
    setsid make run >/tmp/run.log 2>&1 &
    for port in 8001 8002; do
        until python3 -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:$port/readyz\")" 2>/dev/null; do
            if ! kill -0 $! 2>/dev/null || [ $(( $(date +%s) - start )) -gt 600 ]; then
                cat /tmp/run.log; echo "make run: no answer on $port" >&2; exit 1
            fi
            sleep 1
        done
    done
    echo "bare machine: make run answered /readyz on 8001 and 8002 after $(( $(date +%s) - start )) s"
    # setsid made make the leader of a process group: stop it and the server it started.
    python3 -c "import os, signal, sys; os.killpg(int(sys.argv[1]), signal.SIGTERM)" $!
    wait || true
    if .venv/bin/python -c "import pytest" 2>/dev/null; then
        echo "make run installed the test tools" >&2; exit 1
    fi
    start=$(date +%s)
    make test
    echo "bare machine: make test passed in $(( $(date +%s) - start )) s"
'
