#!/usr/bin/env bash
# Runs an image unpacked by hack/build-image.sh the way the chart's pod runs it, without a container
# engine: its entrypoint and environment, as its USER (10001:10001), with a read-only root
# filesystem, a fresh /tmp (the chart's emptyDir), no capabilities and no_new_privs, in its own
# mount and PID namespaces; host network (the test stack listens on loopback).
#
#   hack/run-image.sh [-v SRC:DST[:ro]]... [-e NAME=VALUE]... [--entrypoint PATH] IMAGE_DIR [ARG...]
#
# -v bind-mounts a host file or directory (the chart's Secret and archive volumes), -e adds to the
# image's environment, ARGs replace the image's CMD, --entrypoint its ENTRYPOINT (and CMD), as with
# docker run. Needs root (namespaces, mounts, chroot).
# SIGTERM or SIGINT to the process that runs this script (after setup, the pid namespace's init) is
# passed on to the entrypoint; the script exits with its status. If this process is killed, the
# kernel kills everything in the namespace. The root's writable layer is a tmpfs, used only for
# mount points and thrown away.
set -euo pipefail

if [ "${1:-}" != "--in-namespace" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "hack/run-image.sh needs root" >&2; exit 1; }
  exec unshare --mount --pid --fork --kill-child --propagation private -- bash "$0" --in-namespace "$@"
fi
shift

volumes=() extra_env=() entrypoint=""
while [ $# -gt 0 ]; do
  case "$1" in
    -v) volumes+=("$2"); shift 2 ;;
    -e) extra_env+=("$2"); shift 2 ;;
    --entrypoint) entrypoint=$2; shift 2 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
image_dir=$(cd "${1:?usage: run-image.sh [-v SRC:DST[:ro]]... [-e NAME=VALUE]... [--entrypoint PATH] IMAGE_DIR [ARG...]}" && pwd)
shift
args=("$@")

# The OCI config: one value per line (user, workdir, entrypoint+cmd count, env...).
mapfile -t spec < <(python3 - "$image_dir/config.json" "${#args[@]}" "$entrypoint" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
user = c.get("User") or "0:0"
uid, _, gid = user.partition(":")
if not uid.isdigit() or not (gid or uid).isdigit():
    sys.exit(f"image USER {user!r} is not numeric: a runAsNonRoot pod needs a numeric uid")
if sys.argv[3]:
    c["Entrypoint"], c["Cmd"] = [sys.argv[3]], []
argv = (c.get("Entrypoint") or []) + ([] if int(sys.argv[2]) else (c.get("Cmd") or []))
print(uid); print(gid or uid); print(c.get("WorkingDir") or "/")
print(len(argv)); print(*argv, sep="\n")
print(*(c.get("Env") or []), sep="\n")
EOF
)
uid=${spec[0]} gid=${spec[1]} workdir=${spec[2]} n=${spec[3]}
argv=("${spec[@]:4:n}" "${args[@]}")
env=("${spec[@]:4+n}" "${extra_env[@]}")
[ "${#argv[@]}" -gt 0 ] || { echo "the image has no entrypoint and no arguments were given" >&2; exit 2; }

# The root: an overlay of the unpacked image under a tmpfs layer (for mount points), remounted
# read-only once everything is mounted.
scratch=$(mktemp -d)
mount -t tmpfs -o mode=0755 tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
root="$scratch/root"
mount -t overlay overlay -o "lowerdir=$image_dir/rootfs,upperdir=$scratch/upper,workdir=$scratch/work" "$root"

# A path inside the root, refusing symlinks (resolved on the host they would point outside it).
inside() {
  local path="$root" part
  IFS=/ read -ra parts <<<"${1#/}"
  for part in "${parts[@]}"; do
    path="$path/$part"
    [ ! -L "$path" ] || { echo "mount point $1 goes through the symlink $path" >&2; exit 2; }
  done
  printf '%s' "$path"
}

mount -t proc -o nosuid,nodev,noexec proc "$(inside /proc)"
dev=$(inside /dev)
mount -t tmpfs -o nosuid,noexec,mode=0755 tmpfs "$dev"
for node in null zero full random urandom tty; do
  touch "$dev/$node" && mount --bind "/dev/$node" "$dev/$node"
done
ln -s /proc/self/fd "$dev/fd"; ln -s /proc/self/fd/0 "$dev/stdin"
ln -s /proc/self/fd/1 "$dev/stdout"; ln -s /proc/self/fd/2 "$dev/stderr"
mkdir "$dev/shm" && mount -t tmpfs -o nosuid,nodev,noexec,mode=1777 tmpfs "$dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$(inside /tmp)"
for f in /etc/hosts /etc/resolv.conf; do  # what kubelet mounts
  [ -f "$f" ] && touch "$(inside "$f")" && mount --bind -o ro "$f" "$(inside "$f")"
done

for v in "${volumes[@]}"; do
  IFS=: read -r src dst mode <<<"$v"
  target=$(inside "$dst")
  if [ -d "$src" ]; then mkdir -p "$target"; else mkdir -p "$(dirname "$target")"; touch "$target"; fi
  mount --bind "$src" "$target"
  [ "$mode" != ro ] || mount -o remount,bind,ro "$target"
done
mount -o remount,ro "$root"

# The entrypoint: capabilities gone with the switch to the image's uid (the bounding set keeps only
# what that switch needs, and no_new_privs means nothing can be gained back), chrooted by unshare.
env -i "${env[@]}" setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,+sys_chroot,+setuid,+setgid -- \
  unshare --root="$root" --wd="$workdir" --setgid="$gid" --setuid="$uid" -- "${argv[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
while :; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break  # wait was interrupted by a signal: the child still runs
done
# The namespace's mounts go with it; the (host-visible) scratch directory is removed here.
umount -R "$scratch" 2>/dev/null && rmdir "$scratch" 2>/dev/null || true
exit "$status"
