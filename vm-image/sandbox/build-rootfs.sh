#!/bin/sh
# Build the sandbox image's root filesystem into ROOTFS (run as root; needs debootstrap).
#   build-rootfs.sh ROOTFS MIRROR SUITE PACKAGES_FILE
# Called by `tierkernel image build`, which hashes this folder into the image tag: any change
# here makes a new tag, so the image is rebuilt exactly when the recipe changes.
set -eu
rootfs=$1 mirror=$2 suite=$3 packages_file=$4

packages=$(grep -v '^[[:space:]]*#' "$packages_file" | tr -s ' \n' ' ')

echo "--> debootstrap --variant=minbase $suite from $mirror"
# minbase: dpkg, apt and the Essential set only. The recipe's packages are installed by apt in
# a second step: debootstrap's own resolver follows every alternative and dragged compilers and
# Boost headers in (1.2 GB); apt with --no-install-recommends takes what they need (~400 MB).
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

echo "--> apt-get install --no-install-recommends $packages"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends $packages
chroot "$rootfs" apt-get clean
umount "$rootfs/proc"
trap - EXIT
: >"$rootfs/etc/resolv.conf"

echo "--> trimming the root filesystem"
# Package lists, caches and docs are of no use in a read-only container without network.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
# Mount points: /workspace is where cells run (a tmpfs at run time). The engine gives a tmpfs
# the mode of the directory it covers, so it is made writable for the (non-root) cell user here.
mkdir -p "$rootfs/workspace"
chmod 1777 "$rootfs/workspace"

echo "--> building matplotlib's font cache"
# Prebuilt so the first plot in a fresh container does not spend seconds scanning fonts; the
# container copies it into its writable /tmp at start (MPLCONFIGDIR must be writable).
mkdir -p "$rootfs/opt/tierkernel/mplconfig"
chroot "$rootfs" env MPLCONFIGDIR=/opt/tierkernel/mplconfig HOME=/tmp MPLBACKEND=Agg \
    python3 -c "import matplotlib.font_manager, matplotlib.pyplot"
chmod -R a+rX "$rootfs/opt/tierkernel"

echo "--> python: $(chroot "$rootfs" python3 -c 'import sys, numpy, pandas, matplotlib; print(sys.version.split()[0], "numpy", numpy.__version__, "pandas", pandas.__version__, "matplotlib", matplotlib.__version__)')"
