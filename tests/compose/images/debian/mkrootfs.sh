#!/bin/sh
# The root file system of the stand-ins' base image: Debian bookworm, minbase variant.
#   mkrootfs.sh DIR      (as root; the builder then runs `docker import` on DIR)
set -eu
dir=$1
debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian
# Leaner installs inside the images: no recommended packages, no documentation.
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$dir/etc/apt/apt.conf.d/90standin"
printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n' \
  >"$dir/etc/dpkg/dpkg.cfg.d/90standin"
# Nothing of the machine that ran debootstrap stays in the image.
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/* "$dir"/tmp/*
: >"$dir/etc/resolv.conf"
: >"$dir/etc/hostname"
