#!/bin/bash
# Regenerates Sources/SwiftvisorTool/startup-order.txt: the functions `swiftvisor run hello`
# executes (on each engine), which the linker places together at the start of the text so
# that the kernel's 64 KiB fault-around brings in little besides them (see README, "Start-up
# and footprint"). Needs valgrind (callgrind). Usage:
#   swift build -c release -Xswiftc -static-stdlib -Xswiftc -Xfrontend -Xswiftc -function-sections --product swiftvisor
#   Scripts/startup-order.sh [.build/release/swiftvisor]
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-.build/release/swiftvisor}
out=Sources/SwiftvisorTool/startup-order.txt
command -v valgrind >/dev/null || { echo "startup-order.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
scratch=$(mktemp -d "${TMPDIR:-/tmp}/startup-order.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# valgrind cannot read the Swift toolchain's DWARF; the symbol table is enough.
llvm-objcopy --strip-debug "$binary" "$scratch/swiftvisor" 2>/dev/null \
    || "$(dirname "$(readlink -f "$(command -v swiftc)")")/llvm-objcopy" --strip-debug "$binary" "$scratch/swiftvisor"
engines=(software)
[ -r /dev/kvm ] && [ -w /dev/kvm ] && engines=(kvm software)
for engine in "${engines[@]}"; do
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$scratch/$engine.cg" \
        "$scratch/swiftvisor" run hello --engine "$engine" >/dev/null 2>"$scratch/$engine.log" \
        || { cat "$scratch/$engine.log" >&2; exit 1; }
done

# Every function of the binary that ran (callgrind's "fn=" records under the binary's object),
# except names defined more than once (local helpers such as '$sSqwxx' exist in many objects,
# and the linker would move every section defining them, whole libraries' text among them).
llvm-nm --defined-only "$scratch/swiftvisor" 2>/dev/null | awk '{print $NF}' | sort | uniq -d > "$scratch/ambiguous" \
    || "$(dirname "$(readlink -f "$(command -v swiftc)")")/llvm-nm" --defined-only "$scratch/swiftvisor" | awk '{print $NF}' | sort | uniq -d > "$scratch/ambiguous"
python3 - "$scratch/swiftvisor" "$scratch/ambiguous" "$scratch"/*.cg > "$out" <<'EOF'
import re, sys
binary = sys.argv[1]
seen = set(line.strip() for line in open(sys.argv[2]))
order = []
for path in sys.argv[3:]:
    objects, functions, current = {}, {}, None
    for line in open(path):
        m = re.match(r'^(c?ob|c?fn)=\((\d+)\)(?: (.*))?$', line.rstrip('\n'))
        if not m:
            continue
        kind, key, name = m.groups()
        if kind.endswith('ob'):
            if name: objects[key] = name
            if kind == 'ob': current = objects.get(key)
            continue
        if name: functions[key] = name
        name = (functions.get(key) or '').split("'")[0]  # callgrind marks recursion levels as name'2
        if kind == 'fn' and current == binary and name and not name.startswith('0x') and name not in seen:
            seen.add(name)
            order.append(name)
print('\n'.join(order))
EOF
echo "startup-order.sh: $(wc -l < "$out") functions → $out"
