#!/bin/sh
# Writes a docker-archive (`docker save`'s format) of a busybox image built from this machine's
# busybox (Debian package `busybox`) and the shared libraries `ldd` names for it, for the
# embedded cluster's `images_from` (`--images-from DIR`) or `POST /keel/v1/images`. Nothing is
# downloaded. The image has every busybox applet in /bin, /etc/passwd and /etc/group with root
# and nobody, and `sh` as its command.
#
# usage: busybox-archive.sh OUT.tar [NAME:TAG]   (default name: keel-examples/busybox:latest)
set -eu
out=$1
name=${2:-keel-examples/busybox:latest}
busybox=$(command -v busybox)
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/home"
cp "$busybox" "$root/bin/busybox"
for lib in $(ldd "$busybox" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chmod 700 "$root/root"

# One layer, reproducible: sorted, owned by root, a fixed time.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$arch" "$diff_id" >"$work/config.json"
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)

archive=$work/archive
mkdir -p "$archive/$diff_id"
mv "$work/layer.tar" "$archive/$diff_id/layer.tar"
mv "$work/config.json" "$archive/$config.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]\n' "$config" "$name" "$diff_id" \
    >"$archive/manifest.json"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$archive" -cf "$out" \
    manifest.json "$config.json" "$diff_id/layer.tar"
echo "$out: $name (image ID sha256:$config)"
