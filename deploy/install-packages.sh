#!/usr/bin/env bash
# Installs the Debian packages behind the commands a script needs, when a command is missing.
#
# Usage: deploy/install-packages.sh COMMAND=PACKAGE[,PACKAGE...] ...
#   e.g. deploy/install-packages.sh protoc=protobuf-compiler etcd=etcd-server,etcd-client
# As root it runs apt-get update and apt-get install; otherwise it prints the exact command and
# exits 1, installing nothing.
set -euo pipefail

packages=()
for requirement in "$@"; do
    command_name=${requirement%%=*}
    if ! command -v "$command_name" >/dev/null 2>&1; then
        IFS=, read -r -a wanted <<<"${requirement#*=}"
        packages+=("${wanted[@]}")
    fi
done
if [ "${#packages[@]}" -eq 0 ]; then
    exit 0
fi
cmd="apt-get update && apt-get install -y ${packages[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${packages[*]}. Install them as root first:" >&2
    echo "    sudo sh -c '$cmd'" >&2
    exit 1
fi
printf '==> installing %s\n' "${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "${packages[@]}"
