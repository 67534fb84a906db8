#!/bin/sh
# Makes the base image of the lungburden images, debian:bookworm-slim, from Debian's packages,
# for Docker hosts that cannot pull from a registry (an air-gapped network with a Debian mirror):
# debootstrap --variant=minbase, trimmed like Debian's -slim images, then `docker import`.
# A host that reaches Docker Hub does not need this (`docker pull debian:bookworm-slim`).
#
#   sudo docker/make-base-image.sh [TAG [MIRROR [SECURITY_MIRROR]]]
#
# TAG defaults to debian:bookworm-slim. The mirrors default to the ones of this host's apt
# sources (bookworm and bookworm-security), else deb.debian.org; the image's apt uses them too.
# Needs root, debootstrap and docker.
set -eu
TAG=${1:-debian:bookworm-slim}
MIRROR=${2:-}
SECURITY=${3:-}

# "URI SUITE" for each enabled deb source of this host (one-line and deb822 formats).
host_sources() {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                           print $i, $(i + 1) }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'function flush() { if (deb && enabled) for (u in uris) for (s in suites) print uris[u], suites[s]
                                deb = 0; enabled = 1; delete uris; delete suites }
             BEGIN { enabled = 1 }
             /^[ \t]*$/ { flush(); next }
             /^#/ { next }
             tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
             tolower($1) == "uris:" { for (i = 2; i <= NF; i++) uris[i] = $i }
             tolower($1) == "suites:" { for (i = 2; i <= NF; i++) suites[i] = $i }
             tolower($1) == "enabled:" { enabled = (tolower($2) != "no") }
             END { flush() }' "$f"
    done
}
if [ -z "$MIRROR" ]; then
    MIRROR=$(host_sources | awk '$2 == "bookworm" { print $1; exit }')
fi
if [ -z "$SECURITY" ]; then
    SECURITY=$(host_sources | awk '$2 == "bookworm-security" { print $1; exit }')
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/lungburden-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT INT TERM
echo "make-base-image: debootstrap bookworm from $MIRROR" >&2
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

# As Debian's -slim images: no documentation, manual pages or translations, now or later.
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/groff/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/lintian/* "$ROOTFS"/usr/share/locale/*
# No downloaded packages or lists in any layer.
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
Acquire::Languages "none";
EOF
rm -f "$ROOTFS/etc/apt/sources.list"
cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/log/* \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old
: >"$ROOTFS/etc/machine-id"
echo "make-base-image: importing as $TAG" >&2
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --message "debootstrap --variant=minbase bookworm $MIRROR" - "$TAG" >/dev/null
docker run --rm "$TAG" cat /etc/debian_version
