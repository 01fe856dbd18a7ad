#!/usr/bin/env python3
"""Connection storms: the host's resident memory before, at the peak of and after rounds
of many connections, each sending one request and then closing.

    bench/storm.py [ROUNDS] [CONNECTIONS]        (default 8 rounds of 10,000)

Builds the host and the hello plugin in release, serves hello with
global.connections.max raised and max_per_ip off (every connection comes from
127.0.0.1), and prints the host's RSS at start, at each round's peak (all
connections open and answered) and 1.5 s after they closed. Needs python3 and a
descriptor limit above CONNECTIONS (it raises its own soft limit to the hard one).
"""
import os, resource, socket, subprocess, sys, tempfile, time

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
count = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
subprocess.run(["cargo", "build", "--release", "-q", "-p", "host", "-p", "hello"], cwd=root, check=True)
work = tempfile.mkdtemp(prefix="storm-")
os.mkdir(os.path.join(work, "plugins"))
with open(os.path.join(root, "target/release/libhello.so"), "rb") as src, \
        open(os.path.join(work, "plugins/hello.so"), "wb") as dst:
    dst.write(src.read())
config = os.path.join(work, "servers.config.json")
with open(config, "w") as f:
    f.write('{"global": {"connections": {"max": 1000000, "max_per_ip": 0}, "reload": {"watch": false}},'
            ' "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}')
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
host = subprocess.Popen([os.path.join(root, "target/release/host"), "--config", config,
                         "--listen", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError:
            time.sleep(0.05)
    def rss():
        with open(f"/proc/{host.pid}/status") as f:
            return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))
    print(f"start: {rss()} MiB")
    request = b"GET / HTTP/1.1\r\nHost: hello.localhost\r\n\r\n"
    for n in range(1, rounds + 1):
        socks = []
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port)); s.sendall(request); socks.append(s)
        for s in socks:
            s.recv(4096)
        peak = rss()
        for s in socks:
            s.close()
        time.sleep(1.5)
        print(f"round {n}: {count} connections, peak {peak} MiB, after {rss()} MiB")
finally:
    host.terminate(); host.wait()
