#!/usr/bin/env bash
# docker/smoke.sh: a real container run of segqueue on one machine, with podman (no Docker engine needed).
#
# It builds the CPU image from docker/Dockerfile (on a locally built Debian bookworm base, so no image
# registry is needed), then does by hand what docker/compose.yaml does with the "cpu" profile:
#   - Redis with AOF on, a password from a secret file, data on a host folder: Debian bookworm's
#     redis-server 7.0, in an image built locally with mmdebstrap, the major.minor that compose and
#     Kubernetes deploy (redis:7.0); the run fails on any other version,
#   - two CPU workers (worker run --device cpu --metrics-port P) with the demo engine mounted read-only,
#     waited for through the compose health check (GET /readyz inside the container),
#   - the producer container: producer enqueue /data/in --out /data/out on N synthetic images,
# then checks that every image has its mask (and its Dice against the exact synthetic masks), scrapes
# /metrics and /livez from the workers, stops the workers with SIGTERM (exit status 0 expected), and
# removes every container and temporary file on exit (trap). Takes a few minutes; not part of pytest.
#
#   sudo bash docker/smoke.sh 2>&1 | tee docker/smoke_last_run.txt
#
# Needs root. Installs what it lacks of podman, runc, mmdebstrap and curl from Debian's packages.
# Environment: SMOKE_IMAGES (24), SMOKE_REDIS_PORT (16379), SMOKE_METRICS_PORT (19100: workers get +1, +2),
# SMOKE_CONTEXT (head: build from `git archive HEAD`, so other people's uncommitted edits stay out;
# worktree: build from the working tree as it is), SMOKE_WHEELS (a local wheel folder bind-mounted into the build as PIP_FIND_LINKS; default /opt/wheels
# if it exists), SMOKE_TORCH_INDEX (where the +cpu torch wheel is; default: PyTorch's CPU index, or PyPI
# when SMOKE_WHEELS has the wheel), SMOKE_KEEP=1 keeps the work folder, SMOKE_RMI=1 removes the image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${SMOKE_IMAGES:-24}
REDIS_PORT=${SMOKE_REDIS_PORT:-16379}
METRICS_BASE=${SMOKE_METRICS_PORT:-19100}
IMAGE=${SMOKE_IMAGE:-localhost/segq-cpu:smoke}
BASE_IMAGE=${SMOKE_BASE_IMAGE:-localhost/segq-base}
REDIS_IMAGE=${SMOKE_REDIS_IMAGE:-localhost/segq-redis7}
REDIS_SERIES=7.0   # what docker/compose.yaml and deploy/k8s/redis.yaml deploy
WHEELS=${SMOKE_WHEELS:-/opt/wheels}
CA=/etc/ssl/certs/ca-certificates.crt
PREFIX=segq-smoke-$$
WORK=$(mktemp -d /tmp/segq-smoke.XXXXXX)
CONTAINERS=()

export CONTAINERS_CONF=$WORK/containers.conf
printf '[containers]\ndefault_ulimits = []\n' > "$CONTAINERS_CONF"
P=(podman --storage-driver vfs --runtime runc --cgroup-manager cgroupfs)

log() { echo "[smoke $(date -u +%H:%M:%S)] $*"; }
fail() { echo "RESULT: FAIL $*"; exit 1; }

cleanup() {
    local status=$?
    for c in "${CONTAINERS[@]}"; do "${P[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
    [ "${SMOKE_RMI:-0}" = 1 ] && "${P[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    log "cleaned up: containers ${CONTAINERS[*]:-none} removed (exit status $status)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

missing=()
for tool in podman runc mmdebstrap curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (Debian packages)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" uidmap >/dev/null \
        || fail "could not install ${missing[*]}"
fi

log "podman $("${P[@]}" version --format '{{.Client.Version}}'), runc $(runc --version | head -n 1 | awk '{print $3}'), host $(uname -m), $(nproc) CPUs"

# 1. Base image: Debian bookworm minbase with python3, built locally (no registry needed).
if ! "${P[@]}" image exists "$BASE_IMAGE"; then
    log "building $BASE_IMAGE with mmdebstrap"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/base.tar" \
        > "$WORK/mmdebstrap.log" 2>&1 || { tail -n 30 "$WORK/mmdebstrap.log"; fail "mmdebstrap"; }
    "${P[@]}" import "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$WORK/base.tar"
fi
log "base image $BASE_IMAGE: $("${P[@]}" image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# 1b. The Redis image: Debian bookworm's redis-server (7.0) and python3-redis for the checks below.
if ! "${P[@]}" image exists "$REDIS_IMAGE"; then
    log "building $REDIS_IMAGE with mmdebstrap (Debian's redis-server)"
    mmdebstrap --variant=minbase --include=redis-server,python3,python3-redis bookworm "$WORK/redis.tar" \
        > "$WORK/mmdebstrap-redis.log" 2>&1 || { tail -n 30 "$WORK/mmdebstrap-redis.log"; fail "mmdebstrap redis"; }
    "${P[@]}" import "$WORK/redis.tar" "$REDIS_IMAGE" >/dev/null
    rm -f "$WORK/redis.tar"
fi

# 2. The CPU image (target cpu), package registries reached through the host network and CA bundle.
build_args=(--build-arg "BASE=$BASE_IMAGE" --build-arg "PIP_CERT=$CA" -v "$CA:$CA:ro")
if [ -d "$WHEELS" ]; then
    build_args+=(-v "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
    ls "$WHEELS" | grep -q '^torch-.*+cpu' && build_args+=(--build-arg "TORCH_CPU_INDEX_URL=${SMOKE_TORCH_INDEX:-https://pypi.org/simple}")
fi
[ -n "${SMOKE_TORCH_INDEX:-}" ] && build_args+=(--build-arg "TORCH_CPU_INDEX_URL=$SMOKE_TORCH_INDEX")
if [ "${SMOKE_CONTEXT:-head}" = head ]; then
    CONTEXT=$WORK/context; mkdir -p "$CONTEXT"
    git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$CONTEXT"
    log "build context: git HEAD $(git -C "$ROOT" rev-parse --short HEAD) ($(git -C "$ROOT" log -1 --format=%s HEAD | cut -c1-90))"
else
    CONTEXT=$ROOT
    log "build context: the working tree of $ROOT (uncommitted changes included)"
fi
log "building $IMAGE (docker/Dockerfile --target cpu)"
started=$(date +%s)
"${P[@]}" build -f "$CONTEXT/docker/Dockerfile" --target cpu --network host "${build_args[@]}" -t "$IMAGE" "$CONTEXT" \
    > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; fail "image build"; }
log "built in $(( $(date +%s) - started )) s: $("${P[@]}" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'), user $("${P[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")"
mkdir -p "$WORK/data" && chown 10001:10001 "$WORK/data"
CONTAINERS+=("$PREFIX-tools")   # one container for the one-off commands: with vfs each new container copies the image
"${P[@]}" run -d --name "$PREFIX-tools" --network none -v "$WORK/data:/data" --entrypoint sleep "$IMAGE" infinity >/dev/null
TOOLS=("${P[@]}" exec "$PREFIX-tools")
versions=$("${TOOLS[@]}" python3 -c \
    "import sys, torch, onnxruntime, os; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, uid {os.getuid()}')")
log "in the image: $versions"
case "$versions" in *+cpu*) ;; *) fail "the CPU image has no CPU torch build: $versions" ;; esac
case "$versions" in *"uid 0"*) fail "the image runs as root" ;; esac

# 3. Secret and folders. The password exists only in this file; containers get it read-only.
mkdir -p "$WORK/secrets" "$WORK/redis-data" "$WORK/data"
python3 -c 'import secrets; print(secrets.token_hex(24))' > "$WORK/secrets/redis_password"
chmod 0644 "$WORK/secrets/redis_password"
chown 10001:10001 "$WORK/redis-data" "$WORK/data"
SECRET=(-v "$WORK/secrets/redis_password:/run/secrets/redis_password:ro")
SEGQ_ENV=(-e "REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0" -e REDIS_PASSWORD_FILE=/run/secrets/redis_password)

# 4. Redis: AOF on, password, data on a host folder.
CONTAINERS+=("$PREFIX-redis")
"${P[@]}" run -d --name "$PREFIX-redis" --network host --user 10001:10001 "${SECRET[@]}" -v "$WORK/redis-data:/data" \
    --entrypoint /bin/sh "$REDIS_IMAGE" -c '
        umask 077
        printf "requirepass %s\n" "$(head -n 1 /run/secrets/redis_password)" > /tmp/auth.conf
        exec redis-server /tmp/auth.conf \
            --bind 127.0.0.1 --port '"$REDIS_PORT"' --appendonly yes --appendfsync everysec --dir /data --save "" \
            --maxmemory 1gb --maxmemory-policy noeviction' >/dev/null
redis_ping() {  # the compose health check's equivalent: PING with the password
    "${P[@]}" exec "$PREFIX-redis" python3 -c "
import redis
pw = open('/run/secrets/redis_password').readline().strip()
assert redis.Redis(port=$REDIS_PORT, password=pw, socket_timeout=2).ping()" 2>/dev/null
}
for _ in $(seq 60); do redis_ping && break; sleep 1; done
redis_ping || { "${P[@]}" logs "$PREFIX-redis" | tail -n 20; fail "redis did not answer PING"; }
"${P[@]}" exec "$PREFIX-redis" python3 -c "
import redis
try:
    redis.Redis(port=$REDIS_PORT, socket_timeout=2).ping(); print('NO AUTH NEEDED')
except redis.AuthenticationError: pass
except redis.ResponseError as e: assert 'NOAUTH' in str(e) or 'auth' in str(e).lower(), e
" | grep -q 'NO AUTH NEEDED' && fail "redis accepts commands without the password"
redis_version=$("${P[@]}" exec "$PREFIX-redis" python3 -c "
import redis
pw = open('/run/secrets/redis_password').readline().strip()
r = redis.Redis(port=$REDIS_PORT, password=pw)
print(r.info('server')['redis_version'], 'appendonly', r.config_get('appendonly')['appendonly'])")
log "redis $redis_version on 127.0.0.1:$REDIS_PORT: PING with the password ok, refused without it"
case "$redis_version" in "$REDIS_SERIES".*) ;; *) fail "redis $redis_version is not the $REDIS_SERIES that the manifests deploy" ;; esac

# 5. Two CPU workers, as the compose file's worker-cpu service, each with its metrics port.
worker_help=$("${TOOLS[@]}" env COLUMNS=200 worker run --help 2>&1 || true)  # not piped into grep -q: SIGPIPE + pipefail
if grep -q -- '--metrics-port' <<< "$worker_help"; then
    HAS_METRICS=1
else
    HAS_METRICS=0
    log "WARNING: this worker has no --metrics-port yet: /readyz, /livez and /metrics cannot be checked"
fi
for i in 1 2; do
    port=$((METRICS_BASE + i))
    metrics=(); [ "$HAS_METRICS" = 1 ] && metrics=(--metrics-port "$port")
    CONTAINERS+=("$PREFIX-worker-$i")
    "${P[@]}" run -d --name "$PREFIX-worker-$i" --network host "${SEGQ_ENV[@]}" "${SECRET[@]}" \
        -v "$ROOT/engines/demo:/engines:ro" "$IMAGE" \
        worker run --engine /engines/unet_w16.onnx --device cpu --name "smoke-worker-$i" "${metrics[@]}" >/dev/null
done
worker_ready() {  # $1: worker number. The compose health check: GET /readyz from inside the container.
    if [ "$HAS_METRICS" = 1 ]; then
        "${P[@]}" exec "$PREFIX-worker-$1" python3 -c \
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$((METRICS_BASE + $1))/readyz', timeout=3)" 2>/dev/null
    else
        "${P[@]}" logs "$PREFIX-worker-$1" 2>&1 | grep -q worker_ready
    fi
}
started=$(date +%s)
for i in 1 2; do
    until worker_ready "$i"; do
        [ "$("${P[@]}" inspect -f '{{.State.Running}}' "$PREFIX-worker-$i")" = true ] \
            || { "${P[@]}" logs "$PREFIX-worker-$i" 2>&1 | tail -n 30; fail "worker $i exited before it was ready"; }
        [ $(( $(date +%s) - started )) -lt 300 ] || { "${P[@]}" logs "$PREFIX-worker-$i" 2>&1 | tail -n 30; fail "worker $i not ready in 300 s"; }
        sleep 2
    done
done
log "2 workers ready (/readyz 200 via the compose health check) after $(( $(date +%s) - started )) s"

# 6. Synthetic images (with exact masks), then the producer container, as the compose producer service.
"${TOOLS[@]}" engines synth /data/synth --n "$N" >/dev/null 2>&1
mv "$WORK/data/synth/images" "$WORK/data/in"
log "producer: enqueue /data/in --out /data/out ($N synthetic 512x512 images)"
started=$(date +%s)
CONTAINERS+=("$PREFIX-producer")
set +e
timeout 900 "${P[@]}" run --name "$PREFIX-producer" --network host "${SEGQ_ENV[@]}" "${SECRET[@]}" \
    -v "$WORK/data:/data" "$IMAGE" producer enqueue /data/in --out /data/out --timeout 600 > "$WORK/producer.log" 2>&1
producer_status=$?
set -e
tr '\r' '\n' < "$WORK/producer.log" | grep -v -e 'img/s' -e '^\s*$' | sed 's/^/  producer| /' | tail -n 15
[ "$producer_status" = 0 ] || fail "producer exited with status $producer_status"
log "producer exited 0 after $(( $(date +%s) - started )) s"

# 7. Every mask back, same names, and correct (Dice against the exact synthetic masks).
check=$("${TOOLS[@]}" python3 -c "
import pathlib, numpy as np
from PIL import Image
ins = sorted(p.relative_to('/data/in').with_suffix('.png') for p in pathlib.Path('/data/in').rglob('*') if p.is_file())
outs = sorted(p.relative_to('/data/out') for p in pathlib.Path('/data/out').rglob('*.png'))
missing = sorted(set(ins) - set(outs))
dice = []
for rel in outs:
    pred = np.asarray(Image.open('/data/out' / rel)) > 127
    truth = np.asarray(Image.open('/data/synth/truth' / rel)) > 127
    dice.append(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
print(len(ins), len(outs), len(missing), f'{np.mean(dice):.4f}' if dice else 'nan', f'{np.min(dice):.4f}' if dice else 'nan')
")
read -r n_in n_out n_missing dice_mean dice_min <<< "$check"
log "masks: $n_out of $n_in images, $n_missing missing, Dice vs exact masks mean $dice_mean min $dice_min"
[ "$n_in" = "$N" ] && [ "$n_out" = "$N" ] && [ "$n_missing" = 0 ] || fail "masks missing: $check"
python3 -c "import sys; sys.exit(0 if float('$dice_mean') > 0.9 else 1)" || fail "masks are wrong: mean Dice $dice_mean"

# 8. Metrics and liveness from each worker (host network: scraped like Prometheus would).
if [ "$HAS_METRICS" = 1 ]; then
    total_ok=0
    for i in 1 2; do
        port=$((METRICS_BASE + i))
        live=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/livez")
        started_code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/startupz")
        head_code=$(curl -s -I -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/metrics")
        [ "$started_code" = 200 ] && [ "$head_code" = 200 ] || fail "worker $i /startupz $started_code, HEAD /metrics $head_code"
        ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")
        curl -sf "http://127.0.0.1:$port/metrics" > "$WORK/metrics-$i.txt" || fail "GET /metrics on worker $i"
        grep -q '^# TYPE ' "$WORK/metrics-$i.txt" || fail "worker $i /metrics is not Prometheus text"
        for series in process_resident_memory_bytes segqueue_backlog_images segqueue_engine_compute_seconds_count; do
            grep -q "^$series " "$WORK/metrics-$i.txt" || fail "worker $i /metrics has no $series"
        done
        ok=$(awk '/^segqueue_images_total\{outcome="ok"\}/ {printf "%d", $2}' "$WORK/metrics-$i.txt")
        batches=$(awk '/^segqueue_batches_total / {printf "%d", $2}' "$WORK/metrics-$i.txt")
        log "worker $i :$port /livez $live /readyz $ready /metrics $(wc -l < "$WORK/metrics-$i.txt") lines: ${ok:-?} images ok in ${batches:-?} batches"
        [ "$live" = 200 ] && [ "$ready" = 200 ] || fail "worker $i /livez $live /readyz $ready"
        total_ok=$((total_ok + ${ok:-0}))
    done
    [ "$total_ok" = "$N" ] || fail "the workers' segqueue_images_total{outcome=\"ok\"} add up to $total_ok, not $N"
    log "segqueue_images_total{outcome=\"ok\"} over both workers: $total_ok = $N images"
    log "/metrics of worker 1 (segqueue series; buckets and _created left out):"
    grep -e '^segqueue_' -e '^process_' "$WORK/metrics-1.txt" | grep -v -e '_bucket{' -e '_created' | sed 's/^/  metrics| /'
fi

# 9. SIGTERM drains and exits 0; Redis kept its AOF.
for i in 1 2; do "${P[@]}" stop -t 60 "$PREFIX-worker-$i" >/dev/null; done
for i in 1 2; do
    code=$("${P[@]}" inspect -f '{{.State.ExitCode}}' "$PREFIX-worker-$i")
    [ "$code" = 0 ] || { "${P[@]}" logs "$PREFIX-worker-$i" 2>&1 | tail -n 20; fail "worker $i exited $code after SIGTERM"; }
done
log "workers stopped by SIGTERM, exit status 0 and 0"
aof=$(du -sk "$WORK/redis-data" | cut -f1)
[ "$aof" -gt 0 ] && ls "$WORK/redis-data" | grep -q appendonly || fail "no AOF in the redis data folder"
log "redis AOF: $(ls "$WORK/redis-data" | tr '\n' ' ')($aof KB)"

if [ "$HAS_METRICS" = 1 ]; then
    echo "RESULT: PASS $N/$N masks (mean Dice $dice_mean), 2 CPU workers + producer + Redis (AOF, password) in containers, /readyz /livez /metrics ok"
else
    echo "RESULT: PASS (partial) $N/$N masks (mean Dice $dice_mean), 2 CPU workers + producer + Redis (AOF, password) in containers; /metrics NOT checked (worker has no --metrics-port yet)"
    exit 3
fi
