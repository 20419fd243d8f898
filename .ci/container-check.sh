#!/usr/bin/env bash
# The container check (.ci/run runs it after the test suite): docker/Dockerfile, unmodified, built with
# podman and run as a cluster runs it.
#
#   1. a stand-in for the PyTorch base (.ci/standin-base.Containerfile: Debian 12, Python at /opt/conda,
#      CPU torch), built once per machine and kept, keyed by a hash of its inputs;
#   2. `podman build --from STAND-IN -f docker/Dockerfile` in the default (OCI) format, its pip steps given
#      the host's CA bundle as the `pip-ca` build secret; no warning, no VOLUME, no build leftovers;
#   3. `--help`; the demo's assets made by root inside the image; as the image's user (uid 1000) with the
#      image's mount points (/data and /models read-only, /cache/hf, /output): a model file of mode 0600
#      is refused with "permission denied", and the demo runs to exit 0;
#   4. with a read-only root file system (`--read-only`, /tmp a tmpfs, only the mounts writable): a run
#      stopped with `podman stop` checkpoints and exits 75, and the same command resumes to exit 0;
#   5. every file the runs wrote belongs to uid 1000 and is readable by group and others (umask 022),
#      and no podman volume was left behind.
# It ends with a summary: build times, image sizes, each run's exit code and time.
#
# What the stand-in does not prove: the real base (Ubuntu, conda, the CUDA build of torch) and a GPU.
# Needs root (podman's storage, uid 1000's output directory) and apt, PyPI and Debian's mirror.
# FTJOB_CONTAINER_WORK (default /var/tmp/ftjob-container-check) holds podman's storage, so the stand-in
# and the image's layers are reused by the next run on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${FTJOB_CONTAINER_WORK:-/var/tmp/ftjob-container-check}
IMAGE=localhost/ftjob:ci
DEBIAN_IMAGE=localhost/ftjob-ci/debian-minbase:bookworm   # the name .ci/standin-base.Containerfile uses
STOP_NAME=ftjob-ci-stop
CHECK_START=$SECONDS

say() { echo "container-check: $*"; }
fail() { say "FAILED: $*"; exit 1; }
# `timed NAME CMD...`: run CMD and print how long it took.
timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    say "$name: done in $((SECONDS - start)) s"
}

# ------------------------------------------------------------------ podman and its settings

install_tools() {
    local missing=()
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends podman buildah runc debootstrap uidmap >/dev/null
}

# What this machine's kernel and sandbox need (each was an error first): runc (crun refuses hybrid
# cgroups); open files at most what this process may have and processes at 32768 (podman's defaults
# raise both, which needs CAP_SYS_RESOURCE; here even nproc at this process's own hard limit is
# refused); cgroupfs and file events (no systemd); storage of the check's own.
configure_podman() {
    mkdir -p "$WORK/conf"
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    cat >"$WORK/conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    cat >"$WORK/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
    export CONTAINERS_CONF=$WORK/conf/containers.conf CONTAINERS_STORAGE_CONF=$WORK/conf/storage.conf
}

# ------------------------------------------------------------------ the stand-in base

torch_pin() {
    sed -n 's/^TORCH[[:space:]]*?=[[:space:]]*torch==\([^[:space:]]*\).*/\1/p' Makefile
}

build_standin() {
    local torch key
    torch=$(torch_pin)
    [ -n "$torch" ] || fail "no torch pin (TORCH ?= torch==X) in the Makefile"
    key=$( { cat .ci/standin-base.Containerfile; echo "torch==$torch"; } | sha256sum | cut -c1-16)
    STANDIN=localhost/ftjob-ci/torch-standin:$key
    if podman image exists "$STANDIN"; then
        STANDIN_HOW="kept from an earlier run (torch $torch)"
        return
    fi
    if ! podman image exists "$DEBIAN_IMAGE"; then
        say "debootstrap Debian 12 (minbase) for the stand-in base"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
        tar -C "$WORK/rootfs" -c . | podman import --quiet - "$DEBIAN_IMAGE" >/dev/null
        rm -rf "$WORK/rootfs"
    fi
    say "building the stand-in base (log: $WORK/standin-build.log)"
    rm -rf "$WORK/standin-ctx"
    mkdir -p "$WORK/standin-ctx/wheels"
    # The torch CI installs (`make test`: pip install torch==X) and its dependencies, by the same pip
    # configuration (on this machine, the CPU build).
    if ! python3 -m pip download --quiet --dest "$WORK/standin-ctx/wheels" "torch==$torch" 2>"$WORK/pip.log"; then
        cat "$WORK/pip.log"
        fail "pip download torch==$torch failed"
    fi
    if ! podman build --network host --layers=false --build-arg "TORCH_VERSION=$torch" -t "$STANDIN" \
            -f .ci/standin-base.Containerfile "$WORK/standin-ctx" >"$WORK/standin-build.log" 2>&1; then
        tail -40 "$WORK/standin-build.log"
        fail "podman build of the stand-in base failed (log above)"
    fi
    rm -rf "$WORK/standin-ctx"
    # Stand-ins of other inputs (an older torch pin) are not needed again.
    local old
    for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter reference='localhost/ftjob-ci/torch-standin'); do
        [ "$old" = "$STANDIN" ] || podman rmi "$old" >/dev/null
    done
    STANDIN_HOW="built (torch $torch)"
}

# ------------------------------------------------------------------ the image

build_image() {
    local args=(--network host --from "$STANDIN" -f docker/Dockerfile -t "$IMAGE")
    # The host's CA bundle as the build secret: this machine reaches PyPI through a TLS-intercepting
    # proxy, as some sites do. A mirror, where the environment names one.
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        args+=(--secret "id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt")
    fi
    if [ -n "${PIP_INDEX_URL:-}" ]; then
        args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
    fi
    say "building docker/Dockerfile on $STANDIN (log: $WORK/build.log)"
    if ! podman build "${args[@]}" . >"$WORK/build.log" 2>&1; then
        tail -40 "$WORK/build.log"
        fail "podman build of docker/Dockerfile failed (log above)"
    fi
    # Anything podman ignored or did not support (SHELL under the OCI format was one) fails the check.
    if grep -i -E "not supported|will be ignored|^WARN" "$WORK/build.log"; then
        fail "podman build warned (lines above)"
    fi
    podman image prune -f >/dev/null  # the previous run's image, now untagged
}

check_image_contents() {
    local volumes leftovers
    volumes=$(podman image inspect --format '{{.Config.Volumes}}' "$IMAGE")
    [ "$volumes" = "map[]" ] || fail "the image declares volumes ($volumes): anonymous volumes would leak"
    leftovers=$(podman run --rm --network none --user 0 --entrypoint sh "$IMAGE" -c \
        'ls -A /tmp; find / -xdev \( -name "ftjob.egg-info" -o -path "*/ftjob-src" -o -path /opt/ftjob \) -print')
    [ -z "$leftovers" ] || fail "build leftovers in the image: $leftovers"
    SUMMARY+=("image: no VOLUME, no build leftovers (/tmp empty, no ftjob-src, build/ or ftjob.egg-info)")
}

# ------------------------------------------------------------------ running it

# The host side of the image's mount points: assets (made by root in the image) for /data and /models,
# a Hugging Face cache and the runs (owned by uid 1000, as a cluster's volume would be for this user).
prepare_volumes() {
    rm -rf "$WORK/assets" "$WORK/hf-cache" "$WORK/runs"
    mkdir -p "$WORK/assets" "$WORK/hf-cache" "$WORK/runs"
    chown 1000:1000 "$WORK/hf-cache" "$WORK/runs"
    podman run --rm --network none --user 0 -v "$WORK/assets:/assets" "$IMAGE" demo-assets /assets
}

# The flags every run of the job shares: no network (the job is offline), /dev/shm for the workers,
# the image's mount points, and the demo spec with its paths set to them.
job_flags=()
job_args=()
set_job_command() {
    job_flags=(--network none --ipc=host
               -v "$WORK/assets:/data:ro" -v "$WORK/assets:/models:ro" -v "$WORK/runs:/output"
               -v "$REPO/examples/demo.yaml:/etc/ftjob/spec.yaml:ro")
    job_args=(run /etc/ftjob/spec.yaml --set data.database=/data/wikibooks-demo.sqlite
              --set model.path=/models/tiny-gpt2 --set output_dir=/output)
}

# The way a model saved by another uid used to fail (transformers writes model.safetensors 0600): as uid
# 1000, a root-owned copy with that mode is refused in one line that says so.
check_unreadable_model() {
    local rc=0 out
    cp -a "$WORK/assets/tiny-gpt2" "$WORK/assets/private-gpt2"
    chmod 0600 "$WORK/assets/private-gpt2/model.safetensors"
    out=$(podman run --rm "${job_flags[@]}" "$IMAGE" validate /etc/ftjob/spec.yaml \
        --set data.database=/data/wikibooks-demo.sqlite --set model.path=/models/private-gpt2 \
        --set output_dir=/output 2>&1) || rc=$?
    rm -rf "$WORK/assets/private-gpt2"
    echo "$out"
    [ "$rc" -eq 2 ] || fail "an unreadable model: exit $rc, expected 2"
    case $out in
        *"permission denied: cannot read /models/private-gpt2/model.safetensors"*"as uid 1000"*) ;;
        *) fail "an unreadable model: the message does not say permission denied, the file and uid 1000" ;;
    esac
    SUMMARY+=("unreadable model: exit 2, \"permission denied\" naming the file and uid 1000")
}

run_demo() {
    local rc=0 start=$SECONDS
    podman run --rm "${job_flags[@]}" -v "$WORK/hf-cache:/cache/hf" "$IMAGE" "${job_args[@]}" \
        >"$WORK/demo.log" 2>&1 || rc=$?
    cat "$WORK/demo.log"
    [ "$rc" -eq 0 ] || fail "the demo exited $rc"
    SUMMARY+=("demo: exit 0 in $((SECONDS - start)) s; $(grep -o 'at step 0: validation loss [0-9.]*' "$WORK/demo.log" \
        | sed 's/.*loss //') -> $(grep -o 'eval at step [0-9]*: validation loss [0-9.]*' "$WORK/demo.log" | tail -1 \
        | sed 's/.*loss //') validation loss")
}

# `podman stop` = SIGTERM, then SIGKILL after -t seconds: the job must checkpoint and exit 75 in time.
# Both runs with a read-only root file system: only the mounts and a tmpfs at /tmp are writable.
stop_and_resume() {
    local readonly_flags=(--read-only --read-only-tmpfs=false --tmpfs "/tmp:rw,size=512m")
    local args=("${job_args[@]}" --set name=stopped --set train.epochs=4)
    local metrics=$WORK/runs/stopped/metrics.jsonl rc start=$SECONDS
    podman run -d --name "$STOP_NAME" "${readonly_flags[@]}" "${job_flags[@]}" "$IMAGE" "${args[@]}" >/dev/null
    # Stop once training is under way: a metrics record at step 10 or later.
    until [ -s "$metrics" ] && grep -q -E '"step": [1-9][0-9]+' "$metrics"; do
        if [ "$(podman inspect --format '{{.State.Running}}' "$STOP_NAME")" != true ]; then
            podman logs "$STOP_NAME" 2>&1 | tail -30
            fail "the run to be stopped ended before training"
        fi
        [ $((SECONDS - start)) -lt 300 ] || fail "no training step after 300 s"
        sleep 1
    done
    podman stop -t 60 "$STOP_NAME" >/dev/null
    rc=$(podman inspect --format '{{.State.ExitCode}}' "$STOP_NAME")
    podman logs "$STOP_NAME" >"$WORK/stopped.log" 2>&1
    podman rm "$STOP_NAME" >/dev/null
    tail -3 "$WORK/stopped.log"
    [ "$rc" -eq 75 ] || fail "podman stop: exit $rc, expected 75 (checkpoint, resumable)"
    SUMMARY+=("podman stop -t 60: exit 75 after $((SECONDS - start)) s, $(grep -o 'preempted at step [0-9]*' "$WORK/stopped.log" \
        | head -1); read-only root")
    rc=0
    start=$SECONDS
    podman run --rm "${readonly_flags[@]}" "${job_flags[@]}" "$IMAGE" "${args[@]}" >"$WORK/resumed.log" 2>&1 || rc=$?
    cat "$WORK/resumed.log"
    [ "$rc" -eq 0 ] || fail "the resumed run exited $rc"
    grep -q "resumed from" "$WORK/resumed.log" || fail "the second run did not say it resumed from the checkpoint"
    SUMMARY+=("the same command again: exit 0 in $((SECONDS - start)) s, $(grep -o 'resumed from [^ ]*' \
        "$WORK/resumed.log" | head -1 | sed 's|/output/||'); read-only root")
}

# Everything the runs wrote: owned by the image's user, readable by the team (group and others: the
# container's umask is 022). A write the read-only root refused would be in the runs' logs.
check_outputs() {
    find "$WORK/runs" -mindepth 1 \( ! -uid 1000 -o ! -gid 1000 \) -printf '%u:%g %p\n' >"$WORK/wrong.txt"
    [ ! -s "$WORK/wrong.txt" ] || { head -5 "$WORK/wrong.txt"; fail "not owned by uid 1000 (above)"; }
    find "$WORK/runs" -mindepth 1 \( -type f ! -perm -044 -o -type d ! -perm -055 \) -printf '%m %p\n' >"$WORK/wrong.txt"
    [ ! -s "$WORK/wrong.txt" ] || { head -5 "$WORK/wrong.txt"; fail "not readable by group and others (above)"; }
    if grep -l -i "read-only file system" "$WORK"/runs/*/logs/*.log; then
        fail "a write to the read-only root file system (log above)"
    fi
    SUMMARY+=("outputs: $(find "$WORK/runs" -type f | wc -l) files, all uid 1000, all group- and world-readable")
}

cleanup() {
    podman rm -f "$STOP_NAME" >/dev/null 2>&1 || true
}

SUMMARY=()
main() {
    install_tools
    configure_podman
    trap cleanup EXIT
    cleanup
    say "podman $(podman version --format '{{.Client.Version}}'), runc, storage in $WORK"
    local start=$SECONDS
    build_standin
    SUMMARY+=("stand-in base: $STANDIN_HOW in $((SECONDS - start)) s, $(gigabytes "$STANDIN")")
    start=$SECONDS
    build_image
    SUMMARY+=("image: $IMAGE built in $((SECONDS - start)) s, $(gigabytes "$IMAGE")")
    check_image_contents
    local volumes_before help
    volumes_before=$(podman volume ls -q | wc -l)
    help=$(podman run --rm --network none "$IMAGE" --help)
    case $help in usage:\ ftjob*) ;; *) fail "--help printed no usage: $help" ;; esac
    SUMMARY+=("--help: exit 0")
    timed "demo assets (made by root in the image)" prepare_volumes
    set_job_command
    check_unreadable_model
    run_demo
    stop_and_resume
    check_outputs
    [ "$(podman volume ls -q | wc -l)" -eq "$volumes_before" ] || fail "the runs left podman volumes behind"
    say "summary"
    printf '  %s\n' "${SUMMARY[@]}"
    say "passed in $((SECONDS - CHECK_START)) s"
}

gigabytes() {
    podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'
}

main "$@"
