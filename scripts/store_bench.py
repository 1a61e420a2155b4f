#!/usr/bin/env python3
"""Generation tokens/s with the PostgreSQL vector store against the folder store.

Starts a private PostgreSQL cluster (initdb in a temporary folder, a free loopback port; as
root the server programs run as the `postgres` user), then one tiller on the folder store and
one on the database, stores the same vector in both, and runs `tiller loadgen` (8 clients,
every request steered with that vector) against each in turn, alternating, in one sitting.
The database is never on the generation path, so the two must match within noise.

    python3 scripts/store_bench.py [--rounds 3] [--tiller target/release/tiller]
"""

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_cluster_owner(argv):
    return (["runuser", "-u", "postgres", "--"] + argv) if os.geteuid() == 0 else argv


def start_postgres(tmp):
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    data = os.path.join(tmp, "data")
    os.mkdir(data)
    if os.geteuid() == 0:
        os.chmod(tmp, 0o755)
        shutil.chown(data, "postgres")
    subprocess.run(as_cluster_owner([f"{bindir}/initdb", "-D", data, "-U", "tiller",
                                     "--auth=trust", "--no-sync"]), check=True,
                   stdout=subprocess.DEVNULL)
    port = free_port()
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    subprocess.run(as_cluster_owner([f"{bindir}/pg_ctl", "-D", data, "-l", f"{data}/log",
                                     "-o", opts, "-w", "start"]), check=True,
                   stdout=subprocess.DEVNULL)
    stop = as_cluster_owner([f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "stop"])
    return f"postgres://tiller@127.0.0.1:{port}/postgres", stop


def start_tiller(tiller, env):
    port = free_port()
    proc = subprocess.Popen([tiller, "serve", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "TILLER_LOG_LEVEL": "warn", **env})
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise SystemExit("tiller did not become ready")


def put_vector(addr, name):
    # The built-in golden_gate direction, stored under a new name so that it comes from the store.
    with urllib.request.urlopen(f"http://{addr}/vectors/golden_gate?format=json") as r:
        body = r.read()
    req = urllib.request.Request(f"http://{addr}/vectors/{name}", data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()


def loadgen(tiller, addr, vector):
    out = subprocess.run([tiller, "loadgen", "--addr", addr, "--concurrency", "8",
                          "--requests", "2", "--max-tokens", "64", "--steering", "same",
                          "--vector", vector, "--layer", "12"],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    report = json.loads(out.stdout)
    assert report["errors"] == 0, report
    return report["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiller", default=os.path.join(ROOT, "target/release/tiller"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url, stop_pg = start_postgres(tmp)
        servers = []
        try:
            folder, folder_addr = start_tiller(args.tiller,
                                               {"TILLER_VECTORS_DIR": f"{tmp}/vectors"})
            servers.append(folder)
            db, db_addr = start_tiller(args.tiller, {"TILLER_STORE_URL": url})
            servers.append(db)
            for addr in (folder_addr, db_addr):
                put_vector(addr, "bench")
            results = {"folder": [], "postgres": []}
            for _ in range(args.rounds):
                results["folder"].append(loadgen(args.tiller, folder_addr, "bench"))
                results["postgres"].append(loadgen(args.tiller, db_addr, "bench"))
            for k, v in results.items():
                print(f"{k:9} tok/s: " + " ".join(f"{x:.1f}" for x in v))
            mean = {k: sum(v) / len(v) for k, v in results.items()}
            print(f"postgres / folder: {mean['postgres'] / mean['folder']:.3f}")
        finally:
            for p in servers:
                p.terminate()
                p.wait()
            subprocess.run(stop_pg, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
