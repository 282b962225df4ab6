#!/usr/bin/env bash
# Builds kvm-unit-tests (x86_64) in a scratch copy and runs each x86 entry of its
# unittests.cfg on swiftvisor's software engine, on its KVM engine (where /dev/kvm is
# usable) and on QEMU TCG, printing a PASS/FAIL/SKIP table with the passed test cases
# ("SUMMARY: N tests, M unexpected failures, K skipped": N - M - K).
#
#   Scripts/kvm-unit-tests.sh [--only a,b,c] [--engines software,kvm,qemu] [--timeout S] [--min-timeout S]
#
# Each entry runs with its own timeout from unittests.cfg, at most --timeout (default 90 s)
# and at least --min-timeout (default none: a loaded test host may give more time).
#
# Environment: KUT_SRC (the suite's source; default ../shared/third-party/kvm-unit-tests),
# KUT_SCRATCH (scratch directory; default .build/kvm-unit-tests, git-ignored),
# SWIFTVISOR (the tool; default .build/release/swiftvisor, built if missing).
# Results also go to $KUT_SCRATCH/results.tsv (test, engine, status, passed, total).
# The suite is used as it is: copied, never modified in place, never committed.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
src=${KUT_SRC:-$repo/../shared/third-party/kvm-unit-tests}
scratch=${KUT_SCRATCH:-$repo/.build/kvm-unit-tests}
swiftvisor=${SWIFTVISOR:-$repo/.build/release/swiftvisor}
only=""
engines="software,kvm,qemu"
timeout_default=90
timeout_min=0

while [ $# -gt 0 ]; do
    case "$1" in
        --only) only=$2; shift 2 ;;
        --engines) engines=$2; shift 2 ;;
        --timeout) timeout_default=$2; shift 2 ;;
        --min-timeout) timeout_min=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "kvm-unit-tests.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

[ -f "$src/x86/unittests.cfg" ] || { echo "kvm-unit-tests.sh: no suite at $src (set KUT_SRC)" >&2; exit 2; }

need_packages=()
command -v gcc >/dev/null || need_packages+=(gcc)
command -v make >/dev/null || need_packages+=(make)
if [[ ",$engines," == *",qemu,"* ]] && ! command -v qemu-system-x86_64 >/dev/null; then need_packages+=(qemu-system-x86); fi
if [ ${#need_packages[@]} -gt 0 ]; then
    echo "installing ${need_packages[*]} with apt-get" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}") >&2 \
        || { echo "kvm-unit-tests.sh: could not install ${need_packages[*]}" >&2; }
fi
command -v gcc >/dev/null && command -v make >/dev/null || { echo "kvm-unit-tests.sh: gcc and make are needed" >&2; exit 2; }

# Build in the scratch copy (again only when the source changed).
stamp=$(cd "$src" && find . -type f -newer "$scratch/.built" 2>/dev/null | head -1)
if [ ! -f "$scratch/.built" ] || [ -n "$stamp" ]; then
    rm -rf "$scratch/src"
    mkdir -p "$scratch"
    cp -r "$src" "$scratch/src"
    chmod -R u+w "$scratch/src"
    # A checkout without symlink support stores a symlink as a file holding its target.
    find "$scratch/src" -type f -size -200c | while read -r f; do
        target=$(head -c 200 "$f")
        case "$target" in
            ../*|./*) [ "$(wc -l < "$f")" -eq 0 ] && [ -f "$(dirname "$f")/$target" ] && ln -sf "$target" "$f" ;;
        esac
    done
    (cd "$scratch/src" && ./configure --arch=x86_64 >/dev/null && make -j2 >"$scratch/build.log" 2>&1) \
        || { echo "kvm-unit-tests.sh: build failed, see $scratch/build.log" >&2; exit 2; }
    touch "$scratch/.built"
fi

if [[ ",$engines," == *",software,"* || ",$engines," == *",kvm,"* ]] && [ ! -x "$swiftvisor" ]; then
    (cd "$repo" && swift build -c release --product swiftvisor >&2) || { echo "kvm-unit-tests.sh: swiftvisor build failed" >&2; exit 2; }
fi
kvm_usable=0
[ -r /dev/kvm ] && [ -w /dev/kvm ] && kvm_usable=1

# unittests.cfg → name|file|smp|test_args|qemu_params|arch|groups|timeout
entries=$(awk '
    function flush() { if (name != "") print name "|" file "|" smp "|" args "|" qp "|" arch "|" groups "|" to }
    /^\[/ { flush(); name = substr($0, 2, length($0) - 2); file = ""; smp = "1"; args = ""; qp = ""; arch = ""; groups = ""; to = ""; next }
    /^[a-z_]+ *=/ {
        key = $0; sub(/ *=.*/, "", key); val = $0; sub(/^[^=]*= */, "", val); gsub(/^'\''|'\''$/, "", val)
        if (key == "file") file = val; else if (key == "smp") smp = val; else if (key == "test_args" || key == "extra_params") args = val
        else if (key == "qemu_params") qp = val; else if (key == "arch") arch = val; else if (key == "groups") groups = val
        else if (key == "timeout") to = val
    }
    END { flush() }' "$scratch/src/x86/unittests.cfg")

results="$scratch/results.tsv"
: > "$results"
summary() {  # log → "passed/total" from the SUMMARY line, or "-"
    local line n m k
    line=$(grep -a -o 'SUMMARY: [0-9]* tests[^"]*' "$1" | tail -1)
    [ -z "$line" ] && { echo "-"; return; }
    n=$(echo "$line" | sed -n 's/SUMMARY: \([0-9]*\) tests.*/\1/p')
    m=$(echo "$line" | sed -n 's/.*, \([0-9]*\) unexpected failures.*/\1/p'); m=${m:-0}
    k=$(echo "$line" | sed -n 's/.*, \([0-9]*\) skipped.*/\1/p'); k=${k:-0}
    echo "$((n - m - k))/$n"
}
verdict() {  # exit status → PASS/FAIL/SKIP (isa-debug-exit: (code << 1) | 1; kvm-unit-tests skips with 77)
    case "$1" in
        1) echo PASS ;;
        155) echo SKIP ;;
        124) echo "FAIL(timeout)" ;;
        *) echo FAIL ;;
    esac
}

printf '%-24s' "test"; for e in ${engines//,/ }; do printf ' %-22s' "$e"; done; echo
while IFS='|' read -r name file smp args qp arch groups to; do
    [ -z "$name" ] && continue
    [ -n "$only" ] && [[ ",$only," != *",$name,"* ]] && continue
    [ "$arch" = i386 ] && continue
    [[ " $groups " == *" nodefault "* ]] && [ -z "$only" ] && continue
    t=${to:-$timeout_default}; t=${t%s}
    [ "$t" -gt "$timeout_default" ] 2>/dev/null && t=$timeout_default
    [ "$t" -lt "$timeout_min" ] 2>/dev/null && t=$timeout_min
    printf '%-24s' "$name"
    for e in ${engines//,/ }; do
        log="$scratch/logs/$name.$e.log"; mkdir -p "$scratch/logs"
        case "$e" in
            software|kvm)
                if [ "$e" = kvm ] && [ $kvm_usable = 0 ]; then printf ' %-22s' "SKIP(no /dev/kvm)"; echo -e "$name\t$e\tSKIP\t0\t0" >> "$results"; continue; fi
                # The entry's -cpu flags that swiftvisor's --cpu takes (e.g. -x2apic); the model and other flags are QEMU's.
                cpuflags=$(echo "$qp" | sed -n 's/.*-cpu \([^ ]*\).*/\1/p' | tr ',' '\n' | grep -E '^([+-]x2apic|\+tsc-deadline)$' | paste -sd, -)
                timeout -k 5 $((t + 10)) "$swiftvisor" run --engine "$e" --memory 256M --vcpus "$smp" --timeout "$t" \
                    ${cpuflags:+--cpu "$cpuflags"} --kernel "$scratch/src/x86/$file" ${args:+--cmdline "$args"} </dev/null >"$log" 2>&1
                status=$? ;;
            qemu)
                cpu="-cpu max"; [[ "$qp" == *"-cpu "* ]] && cpu=""
                # shellcheck disable=SC2086
                timeout -k 5 "$t" qemu-system-x86_64 -accel tcg $cpu -m 256 -smp "$smp" -nodefaults -display none \
                    -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 -serial stdio -no-reboot \
                    -kernel "$scratch/src/x86/$file" ${args:+-append "$args"} $qp </dev/null >"$log" 2>&1
                status=$? ;;
            *) echo "kvm-unit-tests.sh: unknown engine $e" >&2; exit 2 ;;
        esac
        v=$(verdict $status); s=$(summary "$log")
        # QEMU refusing the entry's options (-cpu host without KVM, an unknown property) is no test
        # result: it printed nothing but its own messages.
        [ "$e" = qemu ] && [ "$status" = 1 ] && ! grep -qv '^qemu-system-x86_64:' "$log" && v="SKIP(qemu-options)" && s="-"
        printf ' %-22s' "$v $s"
        echo -e "$name\t$e\t$v\t${s%/*}\t${s#*/}" >> "$results"
    done
    echo
done <<< "$entries"
echo "logs: $scratch/logs; results: $results"
