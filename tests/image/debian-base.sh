#!/bin/sh
# Make a Docker base image from Debian packages, for machines where no registry answers:
#   tests/image/debian-base.sh NAME [EXTRA_PACKAGE...]
# Debian bookworm (minbase) with python3 and its venv module, plus any extra packages; the
# image's name is the cache: an existing NAME is kept. Needs root, debootstrap and a Docker engine.
set -eu
name=$1
shift
docker=${DOCKER:-docker}
if "$docker" image inspect "$name" >/dev/null 2>&1; then
    exit 0
fi
packages=python3,python3-venv,ca-certificates
for extra in "$@"; do packages="$packages,$extra"; done
rootfs=$(mktemp -d /var/tmp/hermes-rootfs.XXXXXX)
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
trap 'exit 1' INT TERM
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$name" >/dev/null
