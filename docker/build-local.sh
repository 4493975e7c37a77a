#!/usr/bin/env bash
# Build the qlorax images without a Docker daemon: buildah (Debian package `buildah`) with chroot
# isolation, so it works as root on a plain host or inside a container (no daemon, no cgroups, no
# user namespaces needed). `make docker-test` runs it, then runs the image (tests/test_docker_image.py).
#
#   docker/build-local.sh                            python:3.11-slim-bookworm from the registry, torch
#                                                    from the CPU wheel index (as `docker build` does)
#   docker/build-local.sh --local-base               base built here from Debian packages by mmdebstrap
#                                                    (bookworm + python3 + pip): no image registry needed
#   docker/build-local.sh --local-base --wheels DIR  torch from the CPU wheel in DIR (bind-mounted into
#                                                    the build), its dependencies and qlorax's from PyPI
#   docker/build-local.sh --no-k8s                   the standalone image only
#   docker/build-local.sh --ca-bundle FILE           pip in the build trusts FILE (a TLS-intercepting proxy's
#                                                    CA); default: this machine's PIP_CERT when set
#
# Environment: STORAGE_DRIVER (default vfs: works on any file system, overlay is faster where the
# kernel allows it), TAG (default qlorax:latest), K8S_TAG (default qlorax-k8s:latest),
# BASE_TAG (default localhost/qlorax-base:bookworm, reused when present), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."

STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
TAG=${TAG:-qlorax:latest}
K8S_TAG=${K8S_TAG:-qlorax-k8s:latest}
BASE_TAG=${BASE_TAG:-localhost/qlorax-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
local_base=0 wheels="" k8s_image=1 ca_bundle=${PIP_CERT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --local-base) local_base=1 ;;
        --wheels) wheels=$(cd "$2" && pwd); shift ;;
        --no-k8s) k8s_image=0 ;;
        --ca-bundle) ca_bundle=$(realpath "$2"); shift ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build-local.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for tool in buildah $([ "$local_base" = 1 ] && echo mmdebstrap); do
    command -v "$tool" >/dev/null || { echo "build-local.sh: $tool is missing: apt-get install $tool" >&2; exit 2; }
done

bah() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
say() { echo "build-local.sh: $*" >&2; }
build_args=()

if [ "$local_base" = 1 ]; then
    if bah inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
        say "base $BASE_TAG is already built"
    else
        # The same OS as python:3.11-slim-bookworm: Debian 12 with its python3.11. Debian marks its
        # python externally managed; an image is its own environment, so pip may install system-wide.
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        say "building base $BASE_TAG from Debian packages (mmdebstrap, 2-4 min)"
        mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
            --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
            --customize-hook='ln -sf python3 "$1"/usr/bin/python; ln -sf pip3 "$1"/usr/bin/pip' \
            bookworm "$rootfs/rootfs.tar" "$DEBIAN_MIRROR"
        container=$(bah from scratch)
        bah add "$container" "$rootfs/rootfs.tar" / >/dev/null
        bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
            --cmd python3 "$container"
        bah commit --rm "$container" "$BASE_TAG" >/dev/null
    fi
    build_args+=(--build-arg "BASE_IMAGE=$BASE_TAG")
fi
if [ -n "$ca_bundle" ]; then
    build_args+=(--volume "$ca_bundle:/run/qlorax-ca-bundle.crt:ro" --build-arg PIP_CERT=/run/qlorax-ca-bundle.crt)
fi
if [ -n "$wheels" ]; then
    build_args+=(--volume "$wheels:/opt/qlorax-wheels:ro" --build-arg TORCH_WHEELS=/opt/qlorax-wheels
                 --build-arg TORCH_INDEX=)
fi

# The images these tags name now: removed once rebuilt, so that rebuilding does not pile up full copies.
previous=$(for tag in "$TAG" "$K8S_TAG"; do bah images --quiet --no-trunc "$tag" 2>/dev/null || true; done)

# Docker reads <Dockerfile>.dockerignore; buildah 1.28 reads only the context's .dockerignore,
# so each build gets its own ignore file explicitly.
say "building $TAG"
bah bud --isolation chroot --layers=false --pull=false --ignorefile docker/Dockerfile.dockerignore "${build_args[@]}" \
    -f docker/Dockerfile -t "$TAG" .
if [ "$k8s_image" = 1 ]; then
    say "building $K8S_TAG"
    bah bud --isolation chroot --layers=false --pull=false --ignorefile docker/Dockerfile.k8s.dockerignore \
        --build-arg "BASE_IMAGE=$TAG" -f docker/Dockerfile.k8s -t "$K8S_TAG" .
fi
for image in $previous; do
    bah rmi "$image" >/dev/null 2>&1 || true      # still tagged or used: kept
done
say "done: $(bah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "qlorax(-k8s)?:" | tr '\n' ' ')"
