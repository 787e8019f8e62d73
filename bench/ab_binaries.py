"""Two atlas binaries alternately on one bench lake (not a test): query A
(slice path and planned), and B (GraphQL), p50/p99 ms each, on a fresh
server per binary and round. For telling a code change from machine drift.

usage: python3 bench/ab_binaries.py --before OLD_BINARY --after NEW_BINARY
           [--lake /var/tmp/atlas-bench-serve/lake] [--rounds 2]"""
import argparse
import os, sys, signal, subprocess, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve as S
def bench(atlas, label, lake):
    ids = S.sql_column(atlas, lake, f"SELECT patient_id FROM observation WHERE left(effective, 4) >= '{S.DATE_FROM}' GROUP BY patient_id ORDER BY patient_id LIMIT 500")
    token = S.run([atlas, "--quiet", "--lake", lake, "token", "--sub", "bench", "--scope", "user/*.rs", "--ttl", "1d"]).strip()
    out = {}
    for conf in ["", "slice_reads = false\n"]:
        port = S.free_port()
        with tempfile.TemporaryDirectory() as tmp:
            c = os.path.join(tmp, "a.toml"); open(c, "w").write(conf)
            srv = subprocess.Popen([atlas, "--quiet", "--lake", lake, "serve", "--dev-auth", "--config", c, "--bind", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                S.wait_for(port)
                for kind in (["objects", "graphql"] if not conf else ["objects"]):
                    lua = os.path.join(tmp, kind + ".lua")
                    open(lua, "w").write(S.WRK_LUA.replace("{IDS}", "{" + ",".join(f'"{i}"' for i in ids) + "}").replace("{TOKEN}", token).replace("{KIND}", kind).replace("{FROM}", S.DATE_FROM).replace("{TO}", S.DATE_TO))
                    S.wrk(port, lua, 1, 3)
                    r = S.wrk(port, lua, 1, 10)
                    out[("planned" if conf else kind)] = (r["p50"], r["p99"], r["errors"])
            finally:
                srv.send_signal(signal.SIGTERM); srv.wait(timeout=30)
    print(label, out, flush=True)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--lake", default="/var/tmp/atlas-bench-serve/lake")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    for r in range(a.rounds):
        bench(a.before, f"before, round {r + 1}", a.lake)
        bench(a.after, f"after, round {r + 1}", a.lake)


if __name__ == "__main__":
    main()
