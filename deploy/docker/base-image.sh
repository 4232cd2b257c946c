#!/usr/bin/env bash
# Base images for the router image and the compose file's Redis, built from a Debian mirror: for a Docker host
# that reaches a Debian mirror (and a package index or ./wheelhouse) but not Docker Hub.
#
#   deploy/docker/base-image.sh            # builds moe-router/python:3.11-bookworm and moe-router/redis:7-bookworm
#   MOE_PYTHON_IMAGE=moe-router/python:3.11-bookworm MOE_REDIS_IMAGE=moe-router/redis:7-bookworm \
#     docker compose -f docker-compose.cpu.yml up --build
#
# Needs root, debootstrap and a running Docker engine. DEBIAN_MIRROR picks the mirror (default deb.debian.org);
# the images are Debian bookworm minbase with Debian's own Python 3.11 (python3-venv) or redis-server.
set -euo pipefail

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
PYTHON_TAG="${PYTHON_TAG:-moe-router/python:3.11-bookworm}"
REDIS_TAG="${REDIS_TAG:-moe-router/redis:7-bookworm}"

for tool in debootstrap docker tar; do
  command -v "$tool" >/dev/null || { echo "base-image.sh: $tool is not installed" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "base-image.sh: no Docker engine answers (is dockerd running?)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# build TAG CMD PACKAGES: a minbase root with PACKAGES, imported as TAG with CMD as its default command.
build() {
  local tag="$1" cmd="$2" packages="$3" root="$work/$1"
  echo "base-image.sh: $tag: debootstrap $SUITE ($packages) from $MIRROR" >&2
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # The package lists and caches are only needed to build; an image is the smaller without them.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import --change "CMD $cmd" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >/dev/null
  echo "base-image.sh: $tag: $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')" >&2
}

build "$PYTHON_TAG" '["python3"]' python3,python3-venv,ca-certificates
build "$REDIS_TAG" '["redis-server"]' redis-server
