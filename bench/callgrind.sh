#!/usr/bin/env bash
# Instructions per request, host against baseline, counted by callgrind: steadier than
# any timing on a shared machine (counts move by about 1-2% between runs, as the
# runtime's timers and parking vary), though it says nothing of cache misses or kernel
# time.
#
#   bench/callgrind.sh [PATH] [REQUESTS]      (default /plain, 4000)
#   HEADERS=on bench/callgrind.sh             (with the default security headers)
#   METRICS=off bench/callgrind.sh            (requests not counted for /metrics)
#
# Needs valgrind (apt-get install -y valgrind) and python3. Builds the host, the hello
# plugin and the baseline in release, runs each under callgrind, sends 500 keep-alive
# requests to warm up, zeroes the counters, sends REQUESTS more on the same connection,
# and prints instructions per request for each and their ratio. The callgrind files are
# left in target/bench/callgrind/ for callgrind_annotate.
set -euo pipefail
path="${1:-/plain}"
requests="${2:-4000}"
# HEADERS=on keeps the server's default security headers; by default they are off, as
# the baseline sends none.
headers=', "headers": false'
[ "${HEADERS:-off}" = on ] && headers=''
# Requests are counted for the metrics, as by default; METRICS=off leaves them uncounted.
metrics=''
[ "${METRICS:-on}" = off ] && metrics=', "metrics": false'

root="$(cd "$(dirname "$0")/.." && pwd)"
# Cargo's output folder: $CARGO_TARGET_DIR when it is set (as cargo itself does).
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/bench/callgrind"
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install -y valgrind" >&2; exit 2; }

cd "$root"
cargo build --release -q -p host -p hello
cargo build --release -q -p bench --bin baseline
rm -rf "$out" && mkdir -p "$out/plugins"
cp "$target/release/libhello.so" "$out/plugins/hello.so"
cat > "$out/servers.config.json" <<EOF
{"global": {"plugin_dir": "$out/plugins", "reload": {"watch": false}, "admin": {"listen": "127.0.0.1:0"}$metrics},
 "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"$headers}]}
EOF

# Sends keep-alive requests on one connection; zeroes callgrind's counters after the
# warm-up and dumps them at the end.
drive() {
  python3 - "$1" "$2" "$3" "$path" <<'EOF'
import socket, subprocess, sys
port, pid, n, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.create_connection(("127.0.0.1", port))
req = f"GET {path} HTTP/1.1\r\nHost: hello.localhost\r\nUser-Agent: drive\r\nAccept: */*\r\n\r\n".encode()
def send(k):
    for _ in range(k):
        s.sendall(req)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                sys.exit("the server closed the connection")
            head += chunk
        top, _, body = head.partition(b"\r\n\r\n")
        if not top.startswith(b"HTTP/1.1 200"):
            sys.exit(f"unexpected response: {top[:80]!r}")
        length = next(int(l.split(b":")[1]) for l in top.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += s.recv(65536)
send(500)
subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
send(n)
subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
EOF
}

count() { # name, command...
  local name="$1"; shift
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  RUST_LOG=warn valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$out/$name.%p" "$@" --listen "127.0.0.1:$port" \
    2>"$out/$name.log" &
  local pid=$!
  for _ in $(seq 150); do
    curl -s -o /dev/null -H 'Host: hello.localhost' "127.0.0.1:$port$path" && break
    sleep 0.2
  done
  drive "$port" "$pid" "$requests"
  kill "$pid"; wait "$pid" || true
  # The dump made after the measured requests is part 1.
  local total
  total=$(grep -h '^summary:\|^totals:' "$out/$name.$pid.1" | head -1 | awk '{print $2}')
  echo "$total"
}

host=$(count host "$target/release/host" --config "$out/servers.config.json")
base=$(count baseline "$target/release/baseline")
python3 - "$host" "$base" "$requests" "$path" <<'EOF'
import sys
host, base, n, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(f"instructions per GET {path} ({n} keep-alive requests after 500 to warm up):")
print(f"  host      {host / n:8.0f}")
print(f"  baseline  {base / n:8.0f}")
print(f"  ratio     {host / base:8.3f}x  (extra: {(host - base) / n:.0f} per request)")
EOF
