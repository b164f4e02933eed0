#!/usr/bin/env bash
# One federated round of nf4 MiniLM-L6 between an aarch64 agent (inside the arm64 root that
# build-and-test.sh built) and an x86 agent on the host, through a Mosquitto and a
# coordinator on the host over loopback. Checks that the round aggregates both updates and
# that the coordinator recorded the arm64 device as aarch64; prints each agent's peak RSS.
#
# Called by `build-and-test.sh --round` (after the install); takes ~2 min on a 2-core
# host, nearly all of it the emulated agent importing torch, loading MiniLM and training
# its 2 steps. Steps, batch and sequence are tiny so emulated time stays bounded.
set -euo pipefail

ROOT="${SCHOOLFL_ARM64_ROOT:-/var/tmp/schoolfl-arm64/root}"
HOST_PYTHON="${SCHOOLFL_HOST_PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${SCHOOLFL_ARM64_WORK:-$(dirname "$ROOT")/round}"
ARM_STATE=/var/lib/schoolfl-round   # inside the root
VENV=/opt/schoolfl/venv
ROUND_TIMEOUT=2400

step() { printf '\n==> %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# Commands as arrays, not functions: a backgrounded function runs in a subshell, and $! would
# be that shell, not the agent (its RSS and its kill would miss the agent).
SCHOOLFL_HOST=(env PYTHONPATH="$REPO" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$HOST_PYTHON" -m schoolfl)
IN_ROOT=(chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin HF_HUB_OFFLINE=1
    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=1048576)
schoolfl_host() { "${SCHOOLFL_HOST[@]}" "$@"; }
in_root() { "${IN_ROOT[@]}" "$@"; }
# VmHWM: the process's peak resident set so far (under qemu-user, guest + emulator).
peak_rss_mb() { awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

[[ -x "$ROOT$VENV/bin/schoolfl" ]] || die "no agent in $ROOT; run build-and-test.sh first"
for m in proc dev sys; do mountpoint -q "$ROOT/$m" || die "$ROOT/$m is not mounted (run via build-and-test.sh --round)"; done

rm -rf "$WORK" "$ROOT$ARM_STATE" && mkdir -p "$WORK/x86/data" "$ROOT$ARM_STATE/data"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true  # each child's exit status no longer matters here
}
trap cleanup EXIT

PORT=$("$HOST_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="mqtt://127.0.0.1:$PORT"
step "Mosquitto on $URL (loopback; the chroot shares the host's network)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
mosquitto -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)

# A tiny two-class task: 8 lines per device, 2 local steps of batch 2, sequence 16.
write_data() {
    local out=$1 offset=$2
    : > "$out"
    for i in 0 1 2 3; do
        printf '{"text": "how many legs does a spider have %s", "label": "science"}\n' $((i + offset)) >> "$out"
        printf '{"text": "when did the roman empire fall %s", "label": "history"}\n' $((i + offset)) >> "$out"
    done
}
write_data "$WORK/x86/data/subjects.jsonl" 0
write_data "$ROOT$ARM_STATE/data/subjects.jsonl" 10
write_data "$WORK/held_out.jsonl" 20

cat > "$WORK/coordinator.toml" <<EOF
[coordinator]
fleet = "arm64"
state_dir = "$WORK/coordinator"
tick_seconds = 0.2
heartbeat_seconds = 10.0

[broker]
url = "$URL"

[[tasks]]
id = "subjects"
kind = "classification"
base_model = "minilm-l6"
labels = ["science", "history"]
scheme = "nf4"
rank = 4
alpha = 8.0
learning_rate = 0.001
rounds = 1
local_steps = 2
batch_size = 2
seq_len = 16
update_encoding = "int8"
eval_file = "$WORK/held_out.jsonl"

[tasks.schedule]
devices_per_round = 2
min_updates = 2
gather_seconds = 1200.0
over_selection = 0.0
round_deadline_seconds = $ROUND_TIMEOUT
EOF

step "coordinator on the host"
"${SCHOOLFL_HOST[@]}" coordinator serve --config "$WORK/coordinator.toml" --exit-when-done \
    > "$WORK/coordinator.log" 2>&1 &
COORDINATOR=$!
PIDS+=($COORDINATOR)
sleep 3  # its store exists before enroll-token opens it
X86_TOKEN=$(schoolfl_host coordinator enroll-token --config "$WORK/coordinator.toml" --school north)
ARM_TOKEN=$(schoolfl_host coordinator enroll-token --config "$WORK/coordinator.toml" --school north)

# This machine runs both agents and the emulator: its CPU is busy by design, and the
# allowed-hours default would keep daytime runs idle.
relax() {
    sed -i -e 's/^max_cpu_percent = .*/max_cpu_percent = 100.0/' \
        -e 's/^memory_margin_bytes = .*/memory_margin_bytes = 0/' \
        -e 's/^allowed_hours = .*/allowed_hours = []/' "$1"
}

step "x86 agent: init, enroll (laptop-low-4gb profile)"
schoolfl_host agent init --config "$WORK/x86/agent.toml" --fleet arm64 --device-id x86-laptop \
    --school north --broker "$URL" --state-dir "$WORK/x86/state" --data-dir "$WORK/x86/data" \
    --profile laptop-low-4gb --threads 1
relax "$WORK/x86/agent.toml"
schoolfl_host agent enroll --config "$WORK/x86/agent.toml" --token "$X86_TOKEN" --timeout 120

step "aarch64 agent inside the root: init, enroll (raspberry-pi-4-4gb profile; emulated, slow)"
in_root "$VENV/bin/schoolfl" agent init --config "$ARM_STATE/agent.toml" --fleet arm64 \
    --device-id arm-pi --school north --broker "$URL" --state-dir "$ARM_STATE/state" \
    --data-dir "$ARM_STATE/data" --profile raspberry-pi-4-4gb --threads 1
relax "$ROOT$ARM_STATE/agent.toml"
in_root "$VENV/bin/schoolfl" agent enroll --config "$ARM_STATE/agent.toml" --token "$ARM_TOKEN" --timeout 600

step "both agents run; waiting for the round to aggregate (timeout ${ROUND_TIMEOUT} s)"
start=$(date +%s)
"${SCHOOLFL_HOST[@]}" -v agent run --config "$WORK/x86/agent.toml" > "$WORK/x86.log" 2>&1 &
X86=$!
PIDS+=($X86)
"${IN_ROOT[@]}" "$VENV/bin/schoolfl" -v agent run --config "$ARM_STATE/agent.toml" > "$WORK/arm.log" 2>&1 &
ARM=$!
PIDS+=($ARM)
x86_peak="?" arm_peak="?"
while kill -0 "$COORDINATOR" 2>/dev/null; do
    (( $(date +%s) - start < ROUND_TIMEOUT )) || die "no aggregate within ${ROUND_TIMEOUT} s; see $WORK/*.log"
    x86_peak=$(peak_rss_mb "$X86") arm_peak=$(peak_rss_mb "$ARM")
    sleep 1
done
# VmHWM only grows: a last reading while the agents still run is their peak for the round.
x86_peak=$(peak_rss_mb "$X86") arm_peak=$(peak_rss_mb "$ARM")
wait "$COORDINATOR" || die "the coordinator failed; see $WORK/coordinator.log"
elapsed=$(( $(date +%s) - start ))

step "what the coordinator recorded"
schoolfl_host coordinator devices --config "$WORK/coordinator.toml" | tee "$WORK/devices.txt"
schoolfl_host coordinator rounds --config "$WORK/coordinator.toml" | tee "$WORK/rounds.txt"
grep -E '^arm-pi .* aarch64 ' "$WORK/devices.txt" >/dev/null || die "the coordinator did not record arm-pi as aarch64"
grep -E 'round 1: .*updates=2' "$WORK/rounds.txt" >/dev/null || die "round 1 did not aggregate 2 updates"

step "figures (one round, nf4 MiniLM-L6, 2 steps of batch 2 x seq 16)"
printf '    round wall time        %s s (emulated arm64 agent; not a Pi figure)\n' "$elapsed"
printf '    peak RSS aarch64 agent %s MiB (under qemu-user: includes the emulator)\n' "$arm_peak"
printf '    peak RSS x86 agent     %s MiB\n' "$x86_peak"
printf '    logs                   %s\n' "$WORK"
