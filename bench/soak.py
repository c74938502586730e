#!/usr/bin/env python3
"""Soak: a mixed workload through easemob-gateway in front of the simulator for a set time (default 10 minutes),
reporting answers, unexpected failures, the gateway's RSS and open file descriptors at intervals. Not run by CI.

    bench/soak.py [--minutes 10] [--workers 8] [--interval 10]

Everything runs on 127.0.0.1 with ports chosen by the OS. Uses the `dist` binary (fat LTO; built when missing).
Exit status 1 if any request got no definite answer (a connection error, a timeout, or a 5xx other than the
injected ones), else 0.
"""
import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), os.environ.get("BENCH_PROFILE", "dist"), "easemob-gateway")
ORG, APP, GROUP = "1122161011178276", "demo", "172839405612345"


def start(args, out):
    proc = subprocess.Popen([BIN] + args, stdout=subprocess.PIPE, stderr=out, text=True)
    line = proc.stdout.readline()
    if "listening" not in line:
        sys.exit(f"{args[0]} did not start: {line!r}")
    return proc, dict(part.split("=", 1) for part in line.split()[1:])


def call(host, port, method, path, body=None):
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def workload(rng):
    """One request of the mix: mostly valid deletions, some invalid ones, some unknown routes."""
    users = ["alice", "bob", "carol", "dave"]
    owner, peer = rng.sample(users, 2)
    base = f"/{ORG}/{APP}"
    now_ms = int(time.time() * 1000)
    roll = rng.random()
    if roll < 0.25:
        return "DELETE", f"{base}/rest/message/roaming/chat/user/{owner}?userId={peer}&msgIdList={rng.randrange(10**18, 10**19)}", None
    if roll < 0.40:
        return "DELETE", f"{base}/rest/message/roaming/group/user/{owner}?groupId={GROUP}&msgIdList=1,2,3&isNotify=false", None
    if roll < 0.50:
        return "DELETE", f"{base}/rest/message/roaming/chat/user/{owner}/time?userId={peer}&delTime={now_ms - 3600_000}", None
    if roll < 0.60:
        return "DELETE", f"{base}/rest/message/roaming/group/user/{owner}/time?groupId={GROUP}&delTime={now_ms}", None
    if roll < 0.65:
        return "POST", f"{base}/rest/message/roaming/user/{owner}/delete/all", None
    if roll < 0.75:
        body = json.dumps({"channel": peer, "type": "chat", "delete_roam": rng.random() < 0.5})
        return "DELETE", f"{base}/users/{owner}/user_channel", body
    if roll < 0.90:
        return "DELETE", f"{base}/rest/message/roaming/chat/user/{owner}?userId={peer}&delTime=1659014868", None
    return "GET", f"{base}/users/{owner}", None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10)
    args = parser.parse_args()
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--profile", os.environ.get("BENCH_PROFILE", "dist"), "--quiet"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="easemob-soak-")
    logs = open(os.path.join(work, "logs.txt"), "w")
    sim, sim_addr = start(["sim", "--listen", "127.0.0.1:0"], logs)
    secret = os.path.join(work, "secret")
    with open(secret, "w") as f:
        f.write("YXA6demo-client-secret\n")
    config = os.path.join(work, "gateway.toml")
    with open(config, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "{sim_addr['sim']}"
[token]
ttl = "60s"
[rate_limit]
route = {{ rate = 200, burst = 20 }}
user_conversation_per_minute = 1000
[audit]
file = "{os.path.join(work, 'audit.jsonl')}"
[[apps]]
org_name = "{ORG}"
app_name = "{APP}"
client_id = "YXA6demo-client-id"
client_secret_file = "{secret}"
""")
    gateway, addrs = start(["serve", "--config", config], logs)
    host, port = addrs["data"].removeprefix("http://").split(":")
    sim_host, sim_port = sim_addr["sim"].removeprefix("http://").split(":")
    # The soak runs the gateway at 200/s (a paid pack): the simulator is told so.
    call(sim_host, int(sim_port), "PUT", "/_sim/limits", json.dumps({"route_per_second": 200, "user_conversation_per_minute": 1000}))
    while True:
        try:
            if call(*addrs["admin"].removeprefix("http://").split(":"), "GET", "/readyz") == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)

    answers, failures, lock = Counter(), Counter(), threading.Lock()
    deadline = time.time() + args.minutes * 60
    injected = threading.Event()

    def worker(seed):
        rng = random.Random(seed)
        while time.time() < deadline:
            method, path, body = workload(rng)
            try:
                status = call(host, int(port), method, path, body)
                with lock:
                    answers[status] += 1
                    if status >= 500 and not injected.is_set():
                        failures[f"unexpected {status}"] += 1
            except Exception as e:  # no definite answer
                with lock:
                    failures[type(e).__name__] += 1

    def chaos():
        """Every 30 s the simulator expires every token (401 → refresh → replay) and fails a few calls with 503."""
        while time.time() < deadline:
            time.sleep(30)
            call(sim_host, int(sim_port), "POST", "/_sim/expire-tokens")
            injected.set()
            call(sim_host, int(sim_port), "PUT", "/_sim/faults", json.dumps({"status": 503, "status_count": 5}))
            time.sleep(2)
            injected.clear()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    threads.append(threading.Thread(target=chaos, daemon=True))
    for t in threads:
        t.start()
    started = time.time()
    print(f"{'elapsed':>8} {'requests':>9} {'req/s':>7} {'2xx':>8} {'4xx':>8} {'5xx':>6} {'failed':>6} {'rss_kib':>8} {'fds':>5}")
    while time.time() < deadline:
        time.sleep(min(args.interval, max(0.0, deadline - time.time())))
        with lock:
            total = sum(answers.values())
            by_class = Counter(f"{s // 100}xx" for s in answers.elements())
            failed = sum(failures.values())
        rss = next(l.split()[1] for l in open(f"/proc/{gateway.pid}/status") if l.startswith("VmRSS"))
        fds = len(os.listdir(f"/proc/{gateway.pid}/fd"))
        elapsed = time.time() - started
        print(f"{elapsed:8.0f} {total:9d} {total / elapsed:7.0f} {by_class['2xx']:8d} {by_class['4xx']:8d} "
              f"{by_class['5xx']:6d} {failed:6d} {rss:>8} {fds:5d}", flush=True)
    for t in threads[:-1]:
        t.join()
    gateway.terminate()
    code = gateway.wait(timeout=60)
    sim.terminate()
    print(f"answers by status: {dict(sorted(answers.items()))}")
    print(f"requests without a definite answer: {dict(failures) or 0}; gateway exit code on SIGTERM: {code}")
    sys.exit(1 if failures or code != 0 else 0)


if __name__ == "__main__":
    main()
