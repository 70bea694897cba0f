#!/usr/bin/env bash
# The CPU image, built and used as the README's Docker section says, on a machine with a Docker
# engine (CI: .ci/lanes/40-docker.sh):
#   1. build it with the README's command (the torch wheel, CA bundle and package index of this
#      machine handed to the build; a Debian base made here when no registry has python:3.11-slim);
#   2. run the README's main job, examples/quickstart.sh, in a container as the caller's uid:gid
#      with /data and /runs bind-mounted from the host;
#   3. check on the host: checkpoints, logs, monitor records, plots, evaluation and the Hugging Face
#      export are there, and every file under /data and /runs belongs to that uid:gid;
#   4. exact resume across containers: the quickstart's Vanilla run stopped at RESUME_AT in a second
#      container and resumed from its checkpoint in a third; the per-step losses and gradient norms
#      (monitor.jsonl) must equal the uninterrupted run's, bit for bit;
#   5. docker/build_check.sh in the image (versions, --help, a dry run, the CPU unit tests).
# No Docker engine: one line saying why, exit 0.
#   bash docker/test_image.sh
# Environment: IMAGE (megatron-patch:cpu), WORK (host directory for data/ and runs/, emptied first;
# default ${CI_WORK:-/tmp}/docker-test), ITERS (40) and RESUME_AT (20) for the main job, RUN_AS
# (uid:gid of the containers, default the caller's), CPU_IMAGE (default python:3.11-slim-bookworm,
# else docker/base_image.sh's), TORCH_WHEEL_DIR (/opt/wheels), CA_BUNDLE (the host's bundle),
# BUILD=0 to test the image IMAGE as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v docker > /dev/null; then
    echo "SKIP docker/test_image.sh: no docker client (apt-get install docker.io)"; exit 0
fi
if ! docker info > /dev/null 2>&1; then
    echo "SKIP docker/test_image.sh: no Docker engine answers 'docker info' (start dockerd)"; exit 0
fi
image="${IMAGE:-megatron-patch:cpu}"
work="${WORK:-${CI_WORK:-/tmp}/docker-test}"
iters="${ITERS:-40}" resume_at="${RESUME_AT:-20}"
run_as="${RUN_AS:-$(id -u):$(id -g)}"
step() { echo "== [$(date +%T)] $*"; }
fail() { echo "test_image.sh: FAILED: $*" >&2; exit 1; }
exec 3>&1  # timed's report reaches the terminal when the command's output goes to a log
timed() { local t=$SECONDS rc=0; "$@" || rc=$?; echo "   ($((SECONDS - t)) s)" >&3; return "$rc"; }

run_env=()  # proxies and the index, for containers as for the build
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -z "${!var:-}" ] || run_env+=(-e "$var")
done
# How this machine's pip reaches its index: an http(s) index URL is passed on (a file:// index
# on the host's disk is not visible in a container; pip's default is PyPI).
index="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2> /dev/null || true)}"
case "$index" in http://*|https://*) run_env+=(-e "PIP_INDEX_URL=$index") ;; *) index="" ;; esac

build() {  # the README's build command, with what this machine has to offer
    local build_args=() wheel="" ca="${CA_BUNDLE:-}" candidate base
    # The torch wheel and CA bundle go into the build context (git-ignored, removed at exit).
    trap 'rm -rf docker/local/wheels docker/local/ca.crt' EXIT
    for candidate in "${TORCH_WHEEL_DIR:-/opt/wheels}"/torch-2.13.0*.whl; do [ -f "$candidate" ] && wheel="$candidate"; done
    if [ -n "$wheel" ]; then
        mkdir -p docker/local/wheels
        ln -f "$wheel" docker/local/wheels/ 2> /dev/null || cp "$wheel" docker/local/wheels/
        build_args+=(--build-arg WHEEL_DIR=docker/local/wheels)
    fi
    for candidate in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        [ -z "$ca" ] && [ -f "$candidate" ] && ca="$candidate"
    done
    if [ -n "$ca" ]; then
        cp "$ca" docker/local/ca.crt
        build_args+=(--build-arg CA_BUNDLE=docker/local/ca.crt)
    fi
    [ -z "$index" ] || build_args+=(--build-arg "PIP_INDEX_URL=$index")
    for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        [ -z "${!var:-}" ] || build_args+=(--build-arg "$var")
    done
    base="${CPU_IMAGE:-python:3.11-slim-bookworm}"
    if ! docker image inspect "$base" > /dev/null 2>&1 && ! timeout 300 docker pull -q "$base" > /dev/null 2>&1; then
        [ -z "${CPU_IMAGE:-}" ] || fail "CPU_IMAGE=$base: not here and not pullable"
        step "no $base here and no registry: a Debian bookworm base from apt (docker/base_image.sh, cached)"
        base="$(bash docker/base_image.sh)"
    fi
    build_args+=(--build-arg "CPU_IMAGE=$base")
    step "1. build: docker build -t $image --target cpu ${build_args[*]} ."
    local t=$SECONDS log="$work.build.log"
    mkdir -p "$(dirname "$work")"
    docker build -t "$image" --target cpu "${build_args[@]}" . > "$log" 2>&1 \
        || { tail -n 30 "$log" >&2; fail "docker build (log: $log)"; }
    echo "   built in $((SECONDS - t)) s, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"
}
if [ "${BUILD:-1}" = 0 ]; then
    docker image inspect "$image" > /dev/null 2>&1 || fail "BUILD=0: no image $image to test"
    step "1. build: skipped (BUILD=0), testing the image $image as it is"
else
    build
fi

# ---- host directories, owned by the uid:gid the containers run as
rm -rf "$work"
mkdir -p "$work/data" "$work/runs"
chown "$run_as" "$work/data" "$work/runs" 2> /dev/null || [ "$run_as" = "$(id -u):$(id -g)" ] \
    || fail "cannot give $work to $run_as (run as root, or leave RUN_AS unset)"
in_container() {  # docker run as run_as with the host's data/ and runs/ at /data and /runs (and stdin)
    docker run --rm -i --user "$run_as" -v "$work/data:/data" -v "$work/runs:/runs" "${run_env[@]}" "$image" "$@"
}

step "2. main job: docker run --user $run_as -v $work/data:/data -v $work/runs:/runs -e OUT=/runs/quickstart -e DATA=/data/quickstart -e ITERS=$iters $image bash examples/quickstart.sh"
timed in_container env OUT=/runs/quickstart DATA=/data/quickstart ITERS="$iters" bash examples/quickstart.sh \
    || fail "examples/quickstart.sh in the container"

step "3. on the host: what the main job left, and who owns it"
q="$work/runs/quickstart"
for f in vanilla/ckpt/latest_checkpointed_iteration.txt scaled_embed/ckpt/latest_checkpointed_iteration.txt \
         "vanilla/ckpt/iter_$(printf %07d "$iters")" vanilla.log scaled_embed.log \
         vanilla/monitor.jsonl scaled_embed/monitor.jsonl plots/loss.png \
         eval/vanilla_perplexity.json eval/scaled_embed_lambada.json hf/config.json hf/model.safetensors; do
    [ -s "$q/$f" ] || [ -d "$q/$f" ] || fail "$q/$f is missing or empty"
done
foreign=$(find "$work/data" "$work/runs" \( ! -user "${run_as%:*}" -o ! -group "${run_as#*:}" \) -printf '%u:%g %p\n' | head -n 5)
[ -z "$foreign" ] || fail "files not owned by $run_as: $foreign"
echo "   checkpoints, logs, monitor records, plots, evaluation, HF export present;" \
     "$(find "$work/data" "$work/runs" | wc -l) paths, all owned by $run_as"

step "4. exact resume: Vanilla stopped at $resume_at in one container, resumed in another"
# The quickstart's Vanilla run (examples/quickstart.sh's flags at ITERS=$iters); the first part
# must reproduce its first $resume_at steps, so these flags cannot drift from the script's unseen.
warmup=$(( iters >= 200 ? 20 : iters / 10 ))
flags=(--num-layers 8 --hidden-size 128 --num-attention-heads 4 --seq-length 128
       --max-position-embeddings 128 --micro-batch-size 8 --global-batch-size 8
       --untie-embeddings-and-output-weights --small-init
       --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters "$warmup" --train-iters "$iters"
       --adam-beta1 0.9 --adam-beta2 0.999 --clip-grad 1.0 --weight-decay 0.01
       --hidden-dropout 0 --attention-dropout 0
       --data-path /data/quickstart/wiki_text_document --split "98,2,0"
       --tokenizer-type SentencePieceTokenizer --tokenizer-model /data/quickstart/tok.model
       --log-interval 25 --eval-interval "$iters" --eval-iters 20 --seed 1
       --monitor-interval 10 --spike-policy log --spike-zscore 6 --spike-window 64
       --save /runs/resume/ckpt --save-interval "$resume_at")
timed in_container env OMP_NUM_THREADS=1 python pretrain_gpt.py "${flags[@]}" --monitor-dir /runs/resume/first \
    --exit-interval "$resume_at" > "$work/runs/resume-first.log" 2>&1 || fail "the first part (log: $work/runs/resume-first.log)"
timed in_container env OMP_NUM_THREADS=1 python pretrain_gpt.py "${flags[@]}" --monitor-dir /runs/resume/second \
    --load /runs/resume/ckpt > "$work/runs/resume-second.log" 2>&1 || fail "the resumed part (log: $work/runs/resume-second.log)"
verdict=$(in_container python - "$resume_at" "$iters" <<'PY') || fail "the resume is not exact"
import json
import sys

resume_at, iters = map(int, sys.argv[1:])
def steps(path):  # iteration -> (loss, total gradient norm), as written (json round-trips floats exactly)
    with open(path) as f:
        return {r["iteration"]: (r["loss"], r["grad_norm_total"]) for r in map(json.loads, f) if "loss" in r}
full, first, second = (steps(f"/runs/{d}/monitor.jsonl") for d in ("quickstart/vanilla", "resume/first", "resume/second"))
assert sorted(full) == list(range(1, iters + 1)), f"the quickstart's run logged steps {sorted(full)}"
assert sorted(first) == list(range(1, resume_at + 1)), f"the first part logged steps {sorted(first)}"
assert sorted(second) == list(range(resume_at + 1, iters + 1)), f"the resumed part logged steps {sorted(second)}"
for it, got in first.items():
    assert got == full[it], f"step {it}: {got} here, {full[it]} in examples/quickstart.sh's run: its flags changed?"
for it, got in second.items():
    assert got == full[it], f"step {it} after resuming: (loss, grad norm) {got}, uninterrupted {full[it]}"
last = full[iters]
print(f"   steps {resume_at + 1}-{iters} after resuming equal the uninterrupted run's exactly "
      f"(loss and grad norm; step {iters}: loss {last[0]!r}, grad norm {last[1]!r})")
PY
echo "$verdict"
[[ "$verdict" == *"after resuming equal"* ]] || fail "the resume check did not run"

step "5. docker run --rm $image bash docker/build_check.sh"
timed docker run --rm "${run_env[@]}" "$image" bash docker/build_check.sh || fail "docker/build_check.sh in the image"
echo "test_image.sh: passed"
