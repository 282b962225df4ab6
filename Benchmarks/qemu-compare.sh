#!/usr/bin/env bash
# Runs the bundled 'compute' guest workload on Swiftvisor's software engine and on
# qemu-system-x86_64 -accel tcg, and prints both throughputs and the ratio (ours / QEMU's).
# The project target is ours >= 0.3x QEMU TCG.
#
# Both sides run the same ELF64, built here from Guests/ with the flags of
# Sources/GuestBuilder (and checked against the bundled one when the build has it). QEMU
# gets it inside a multiboot image (Benchmarks/qemu/: a 32-bit loader that builds the
# docs/guest-abi.md machine, then enters the ELF in long mode). Each side runs at two
# scales; the difference of the wall times is the steady-state cost of (high - base) units
# of work, so process start, VM set-up and boot drop out. The serial outputs of both sides
# must be identical (same checksums), or the script fails.
#
# Usage: Benchmarks/qemu-compare.sh [--scale N] [--base N] [--reps N] [--qemu-reps N] [--json]
#                                   [--min-ratio X]
set -euo pipefail

HIGH=24
BASE=1
REPS=2
QEMU_REPS=8
JSON=0
MIN_RATIO=""
TARGET=0.3
MEMORY=64M

usage() {
    cat <<'EOF'
Usage: Benchmarks/qemu-compare.sh [options]

Runs the 'compute' guest on the software engine and under qemu-system-x86_64 -accel tcg
at two scales, and prints steady-state throughput of each and the ratio ours / QEMU's.

  --scale N       high scale (work units, scale=N on the guest command line); default 24
  --base N        low scale whose time is subtracted (start-up, boot); default 1
                  (the guest treats scale=0 as 1)
  --reps N        software-engine runs per scale; the fastest counts; default 2
  --qemu-reps N   QEMU runs per scale (they are short, so noisier); fastest counts; default 8
  --json          print the results as JSON on stdout instead of the table
  --min-ratio X   exit with status 3 when ours / QEMU's is below X (e.g. 0.3)
  -h, --help      this text

Environment: QEMU=path to qemu-system-x86_64; SWIFTVISOR=path to the swiftvisor binary.
Exit status: 0 ok, 1 a run failed or the outputs differ, 2 missing prerequisite,
3 below --min-ratio.
EOF
}

die() { echo "qemu-compare: $*" >&2; exit 1; }
note() { echo "qemu-compare: $*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

while [ $# -gt 0 ]; do
    case "$1" in
        --scale) HIGH="${2:-}"; shift 2 ;;
        --base) BASE="${2:-}"; shift 2 ;;
        --reps) REPS="${2:-}"; shift 2 ;;
        --qemu-reps) QEMU_REPS="${2:-}"; shift 2 ;;
        --json) JSON=1; shift ;;
        --min-ratio) MIN_RATIO="${2:-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "qemu-compare: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
is_uint "$HIGH" && is_uint "$BASE" && is_uint "$REPS" && is_uint "$QEMU_REPS" ||
    { echo "qemu-compare: --scale, --base, --reps and --qemu-reps take whole numbers" >&2; exit 2; }
[ "$BASE" -ge 1 ] || BASE=1
[ "$HIGH" -gt "$BASE" ] || { echo "qemu-compare: --scale must be larger than --base ($BASE)" >&2; exit 2; }
[ "$REPS" -ge 1 ] || REPS=1
[ "$QEMU_REPS" -ge 1 ] || QEMU_REPS=1
if [ -n "$MIN_RATIO" ] && ! [[ "$MIN_RATIO" =~ ^[0-9]*\.?[0-9]+$ ]]; then
    echo "qemu-compare: --min-ratio takes a number" >&2; exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/Benchmarks/qemu"
BUILD="$HERE/build"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qemu-compare.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- prerequisites ----------------------------------------------------------------------

# QEMU: install it from the distribution when it's missing.
QEMU="${QEMU:-}"
if [ -z "$QEMU" ]; then
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then
            if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; fi
        fi
        if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
            note "installing qemu-system-x86 (apt-get)"
            export DEBIAN_FRONTEND=noninteractive
            if ! $SUDO apt-get install -y --no-install-recommends qemu-system-x86 >"$WORK/apt.log" 2>&1; then
                $SUDO apt-get update >>"$WORK/apt.log" 2>&1 || true
                $SUDO apt-get install -y --no-install-recommends qemu-system-x86 >>"$WORK/apt.log" 2>&1 || {
                    tail -5 "$WORK/apt.log" >&2
                    echo "qemu-compare: could not install qemu-system-x86: install it (it provides qemu-system-x86_64) and rerun" >&2
                    exit 2
                }
            fi
        fi
        command -v qemu-system-x86_64 >/dev/null 2>&1 || {
            echo "qemu-compare: qemu-system-x86_64 not found: install the 'qemu-system-x86' package (apt-get install qemu-system-x86) and rerun" >&2
            exit 2
        }
    fi
    QEMU="$(command -v qemu-system-x86_64)"
fi
QEMU_VERSION="$("$QEMU" --version | head -1 | sed -n 's/.*version \([^ ]*\).*/\1/p')"

# The toolchain's clang, ld.lld and llvm-objcopy (next to swift, as GuestBuilder looks).
TOOLS=""
if command -v swift >/dev/null 2>&1; then TOOLS="$(dirname "$(readlink -f "$(command -v swift)")")"; fi
find_tool() {
    if [ -n "$TOOLS" ] && [ -x "$TOOLS/$1" ]; then echo "$TOOLS/$1"; return; fi
    if [ -x "/opt/swift/usr/bin/$1" ]; then echo "/opt/swift/usr/bin/$1"; return; fi
    command -v "$1" 2>/dev/null || { echo "qemu-compare: cannot find '$1': install a Swift toolchain (it ships clang, ld.lld and llvm-objcopy)" >&2; exit 2; }
}
CLANG="$(find_tool clang)"
LLD="$(find_tool ld.lld)"
OBJCOPY="$(find_tool llvm-objcopy)"

# Our binary: build it when it isn't there.
SV="${SWIFTVISOR:-$ROOT/.build/release/swiftvisor}"
if [ ! -x "$SV" ]; then
    note "no $SV: running swift build -c release --product swiftvisor"
    (cd "$ROOT" && swift build -c release --product swiftvisor) >&2 || die "swift build failed"
    [ -x "$SV" ] || die "swift build did not produce $SV"
fi

# ---- build the guest and its multiboot image ----------------------------------------------

# Same flags and link as Sources/GuestBuilder/main.swift.
CFLAGS=(-target x86_64-unknown-none-elf -O2 -ffreestanding -fno-pic -mno-red-zone
        -mgeneral-regs-only -nostdlib -fno-stack-protector -fno-builtin -Wall -Werror -std=c11)
LOADER_CFLAGS=(-target i386-unknown-none-elf -O2 -ffreestanding -fno-pic -mgeneral-regs-only
               -nostdlib -fno-stack-protector -fno-builtin -Wall -Werror -std=c11)
RT="$ROOT/Guests/runtime"
mkdir -p "$BUILD/obj"
note "building compute.elf and its multiboot image in ${BUILD#$ROOT/}"
objs=()
for src in $(cd "$RT" && ls *.c *.S 2>/dev/null | LC_ALL=C sort); do
    "$CLANG" "${CFLAGS[@]}" -I "$RT" -c "$RT/$src" -o "$BUILD/obj/runtime-$src.o"
    objs+=("$BUILD/obj/runtime-$src.o")
done
for src in $(cd "$ROOT/Guests/compute" && ls *.c *.S 2>/dev/null | LC_ALL=C sort); do
    "$CLANG" "${CFLAGS[@]}" -I "$RT" -c "$ROOT/Guests/compute/$src" -o "$BUILD/obj/compute-$src.o"
    objs+=("$BUILD/obj/compute-$src.o")
done
ELF="$BUILD/compute.elf"
"$LLD" -static -nostdlib -T "$RT/guest.ld" -o "$ELF" "${objs[@]}"

"$CLANG" "${LOADER_CFLAGS[@]}" -DGUEST_ELF="\"$ELF\"" -c "$HERE/multiboot.S" -o "$BUILD/obj/mb-multiboot.S.o"
"$CLANG" "${LOADER_CFLAGS[@]}" -c "$HERE/loader.c" -o "$BUILD/obj/mb-loader.c.o"
"$LLD" -m elf_i386 -static -nostdlib -T "$HERE/multiboot.ld" -o "$BUILD/compute-multiboot.elf" \
    "$BUILD/obj/mb-multiboot.S.o" "$BUILD/obj/mb-loader.c.o"
IMAGE="$BUILD/compute-multiboot.bin"
"$OBJCOPY" -O binary "$BUILD/compute-multiboot.elf" "$IMAGE"

# Is it the guest bundled in $SV? (GuestBuilder embeds each ELF as base64; bench cpu's
# instruction count is of the bundled one.)
BUNDLED=true
if ! grep -q -F "$(base64 -w0 "$ELF")" "$SV"; then
    BUNDLED=false
    note "warning: the compute guest built from Guests/ differs from the one bundled in $SV (rebuild it); the instruction count comes from the bundled one"
fi

# ---- runs -------------------------------------------------------------------------------

now_ns() { date +%s%N; }

# run_ours SCALE OUT -> prints seconds
run_ours() {
    local t0 t1 rc=0
    t0=$(now_ns)
    "$SV" run "$ELF" --engine software --memory "$MEMORY" --timeout 600 --cmdline "scale=$1" >"$2" 2>"$2.err" || rc=$?
    t1=$(now_ns)
    if [ $rc -ne 0 ]; then
        cat "$2" "$2.err" >&2
        die "swiftvisor (software engine) exited with status $rc at scale=$1"
    fi
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", (b - a) / 1e9 }'
}

# run_qemu SCALE OUT -> prints seconds. The guest's exit status 0 reaches isa-debug-exit
# as (0 << 1) | 1 = 1.
run_qemu() {
    local t0 t1 rc=0
    : >"$2"
    t0=$(now_ns)
    timeout 600 "$QEMU" -accel tcg -m "$MEMORY" -nodefaults -display none -no-reboot \
        -serial "file:$2" -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel "$IMAGE" -append "scale=$1" 2>"$2.err" || rc=$?
    t1=$(now_ns)
    if [ $rc -ne 1 ]; then
        cat "$2" "$2.err" >&2
        case $rc in
            253) die "the multiboot loader failed at scale=$1 (message above)" ;;
            124) die "QEMU timed out at scale=$1" ;;
            0) die "QEMU stopped without the guest exiting (triple fault?) at scale=$1" ;;
            *) die "QEMU exited with status $rc at scale=$1 (guest status $(( (rc - 1) / 2 )) if odd)" ;;
        esac
    fi
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", (b - a) / 1e9 }'
}

min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b < a) ? b : a }'; }

ours_base="" ours_high="" qemu_base="" qemu_high=""
ROUNDS=$(( REPS > QEMU_REPS ? REPS : QEMU_REPS ))
note "software engine: $REPS x (scale=$BASE, scale=$HIGH); qemu tcg: $QEMU_REPS x (scale=$BASE, scale=$HIGH); interleaved"
for rep in $(seq 1 "$ROUNDS"); do
    if [ "$rep" -le "$REPS" ]; then
        ours_base=$(min "$ours_base" "$(run_ours "$BASE" "$WORK/ours-$BASE.txt")")
        ours_high=$(min "$ours_high" "$(run_ours "$HIGH" "$WORK/ours-$HIGH.txt")")
    fi
    if [ "$rep" -le "$QEMU_REPS" ]; then
        qemu_base=$(min "$qemu_base" "$(run_qemu "$BASE" "$WORK/qemu-$BASE.txt")")
        qemu_high=$(min "$qemu_high" "$(run_qemu "$HIGH" "$WORK/qemu-$HIGH.txt")")
    fi
    # Every run's output is checked against the software engine's (same scale).
    for s in "$BASE" "$HIGH"; do
        if ! cmp -s "$WORK/ours-$s.txt" "$WORK/qemu-$s.txt"; then
            echo "qemu-compare: serial output differs at scale=$s (ours, then QEMU's):" >&2
            diff "$WORK/ours-$s.txt" "$WORK/qemu-$s.txt" >&2 || true
            exit 1
        fi
        grep -q "^compute: done (scale $s)" "$WORK/ours-$s.txt" || { cat "$WORK/ours-$s.txt" >&2; die "unexpected guest output at scale=$s"; }
    done
done

# Guest instructions per unit of work, from the software engine's counter (bench cpu at
# scales 1 and 2: every unit repeats the same work, so the difference is one unit).
instructions_at() {
    "$SV" bench cpu --scale "$1" --json "$WORK/bench-$1.json" >/dev/null 2>&1 || return 0
    sed -n 's/.*"engine":"software","seconds":[0-9.e+-]*,"instructions":\([0-9]*\).*/\1/p' "$WORK/bench-$1.json"
}
note "counting guest instructions (swiftvisor bench cpu --scale 1, 2)"
i1="$(instructions_at 1)"
i2="$(instructions_at 2)"
PER_UNIT=""
if [ -n "$i1" ] && [ -n "$i2" ] && [ "$i2" -gt "$i1" ]; then PER_UNIT=$((i2 - i1)); fi

# ---- results ----------------------------------------------------------------------------

UNITS=$((HIGH - BASE))
read -r ours_steady qemu_steady ratio <<<"$(awk -v ob="$ours_base" -v oh="$ours_high" -v qb="$qemu_base" -v qh="$qemu_high" \
    'BEGIN { o = oh - ob; q = qh - qb; printf "%.6f %.6f %.6f\n", o, q, (o > 0 ? q / o : 0) }')"
awk -v o="$ours_steady" -v q="$qemu_steady" 'BEGIN { exit !(o > 0 && q > 0) }' ||
    die "a steady-state time is not positive (ours ${ours_steady}s, QEMU ${qemu_steady}s): raise --scale"
STEADY_INSTR=""
ours_mips="" qemu_mips=""
if [ -n "$PER_UNIT" ]; then
    STEADY_INSTR=$((PER_UNIT * UNITS))
    ours_mips=$(awk -v n="$STEADY_INSTR" -v t="$ours_steady" 'BEGIN { printf "%.1f", n / t / 1e6 }')
    qemu_mips=$(awk -v n="$STEADY_INSTR" -v t="$qemu_steady" 'BEGIN { printf "%.1f", n / t / 1e6 }')
fi
MEETS=$(awk -v r="$ratio" -v t="$TARGET" 'BEGIN { print (r >= t) ? "true" : "false" }')
checksums="$(grep -E 'checksum=|primes below' "$WORK/ours-$HIGH.txt" | sed 's/^/    /')"

if [ "$JSON" -eq 1 ]; then
    n() { if [ -n "$1" ]; then echo "$1"; else echo null; fi; }
    printf '{"benchmark":"qemu-compare","workload":"compute","base_scale":%d,"high_scale":%d,"units":%d,"reps":%d,"qemu_reps":%d,' \
        "$BASE" "$HIGH" "$UNITS" "$REPS" "$QEMU_REPS"
    printf '"instructions_per_unit":%s,"steady_instructions":%s,"outputs_match":true,"guest_matches_bundled":%s,' \
        "$(n "$PER_UNIT")" "$(n "$STEADY_INSTR")" "$BUNDLED"
    printf '"results":[{"engine":"software","base_seconds":%s,"high_seconds":%s,"steady_seconds":%s,"mips":%s},' \
        "$ours_base" "$ours_high" "$ours_steady" "$(n "$ours_mips")"
    printf '{"engine":"qemu-tcg","qemu_version":"%s","base_seconds":%s,"high_seconds":%s,"steady_seconds":%s,"mips":%s}],' \
        "$QEMU_VERSION" "$qemu_base" "$qemu_high" "$qemu_steady" "$(n "$qemu_mips")"
    printf '"ratio":%s,"target":%s,"meets_target":%s}\n' "$ratio" "$TARGET" "$MEETS"
else
    echo "compute workload: scale=$BASE and scale=$HIGH (best of $REPS ours, $QEMU_REPS QEMU); steady state = difference ($UNITS units)"
    echo "serial output identical on both engines:"
    echo "$checksums"
    printf '%-22s %12s %12s %14s %16s %10s\n' engine "scale=$BASE" "scale=$HIGH" "steady state" "guest instrs" MIPS
    printf '%-22s %11.3fs %11.3fs %13.3fs %16s %10s\n' "swiftvisor software" "$ours_base" "$ours_high" "$ours_steady" \
        "${STEADY_INSTR:-?}" "${ours_mips:--}"
    printf '%-22s %11.3fs %11.3fs %13.3fs %16s %10s\n' "qemu $QEMU_VERSION tcg" "$qemu_base" "$qemu_high" "$qemu_steady" \
        "${STEADY_INSTR:-?}" "${qemu_mips:--}"
    [ -n "$PER_UNIT" ] && echo "(guest instructions counted by the software engine, $PER_UNIT per unit; QEMU's MIPS is the same count over its time)"
    if [ "$MEETS" = true ]; then verdict="meets"; else verdict="below"; fi
    printf 'ratio ours / qemu tcg: %.3fx   (target >= %sx: %s)\n' "$ratio" "$TARGET" "$verdict"
fi

if [ -n "$MIN_RATIO" ] && awk -v r="$ratio" -v m="$MIN_RATIO" 'BEGIN { exit !(r < m) }'; then
    note "ratio $ratio is below --min-ratio $MIN_RATIO"
    exit 3
fi
