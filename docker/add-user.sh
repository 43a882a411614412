#!/bin/sh
# Run once, as root, by both runtime stages of docker/Dockerfile: creates the unprivileged user segq
# (uid/gid 10001, home /home/segq, no login shell) that the images run as, the mount points /engines
# (read-only engines) and /data (the producer's folders, writable by segq).
set -eu
groupadd --system --gid 10001 segq
useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/segq --shell /usr/sbin/nologin segq
mkdir -p /engines /data
chown segq:segq /data
