#!/usr/bin/env python3
"""Soak test of resume (not CI): kill-and-resume and drain trials under load, on loopback only.

One `baton serve --workers 3 --wire-dtype f32` runs throughout. Every trial sends the same
concurrent streams (greedy, plus one seeded sampled stream), and once each has streamed a few
tokens it disturbs the chain:
  kill   SIGKILL to a worker in the chain; a fresh `baton worker` then joins and the chain is
         rebalanced, so every trial starts from three workers again;
  drain  `baton drain` of a worker in the chain, which afterwards joins back and is rebalanced in.
Each stream is checked against an undisturbed reference run: `completed` (every token identical),
`failed` (an error, or tokens that differ) or `hung` (no result within --timeout). `resumed`
counts streams the head paused and continued (its status file). Every wait is bounded.

Usage: scripts/soak.py [--kills 20] [--drains 20] [--baton target/release/baton] [--model M]
"""

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

PROMPTS = ["1, 2, 3, 4, 5, 6,", "Once upon a time, in a small village,", "def fibonacci(n):", "The history of Rome begins"]
SAMPLED = {"prompt": "My favourite food is", "temperature": 0.8, "seed": 7}


def reader(stream, q, echo=False):
    for line in stream:
        if echo:
            sys.stderr.write("[serve] " + line)
        q.put(line)


class Soak:
    def __init__(self, args, state):
        self.args, self.state = args, state
        cmd = [args.baton, "serve", "--stdin", "--workers", "3", "--wire-dtype", "f32", "--state-dir", state]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, BATON_LOG=os.environ.get("BATON_LOG", "warn"))
        self.serve = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out, self.err = queue.Queue(), queue.Queue()
        threading.Thread(target=reader, args=(self.serve.stdout, self.out), daemon=True).start()
        threading.Thread(target=reader, args=(self.serve.stderr, self.err, args.verbose), daemon=True).start()
        self.pids = {}  # worker name -> pid, for serve's workers and the ones joined later
        self.endpoints = {}  # worker name -> control endpoint
        self.extra = []  # worker processes this script started
        deadline = time.time() + 120
        while len(self.pids) < 3:
            line = self.err.get(timeout=max(0.1, deadline - time.time()))
            if line.startswith("serve: worker-"):
                f = line.split()
                self.pids[f[1]], self.endpoints[f[1]] = int(f[3]), f[5]
        self.next_id = 0
        self.spares = 0

    def baton(self, *args):
        r = subprocess.run([self.args.baton, *args, "--state-dir", self.state], capture_output=True, text=True, timeout=self.args.timeout)
        if r.returncode != 0:
            raise RuntimeError(f"baton {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def status(self):
        with open(os.path.join(self.state, "head-status.json")) as f:
            return json.load(f)

    def chain_workers(self):
        return [s["node"] for s in self.status()["stages"] if s["node"] in self.pids]

    def streams(self, disturb=None):
        """Sends the streams; calls disturb() once each has BEFORE tokens. Returns per-stream
        (tokens or None, error or None) and the longest gap between two tokens of one stream."""
        reqs = [{"prompt": p, "temperature": 0.0} for p in PROMPTS] + [dict(SAMPLED)]
        first = self.next_id
        for r in reqs:
            r.update(max_tokens=self.args.max_tokens, stream=True)
            self.serve.stdin.write(json.dumps(r) + "\n")
        self.serve.stdin.flush()
        self.next_id += len(reqs)
        n = len(reqs)
        streamed, results, last, gap = [[] for _ in range(n)], [None] * n, [time.time()] * n, 0.0
        deadline = time.time() + self.args.timeout
        while any(r is None for r in results) and time.time() < deadline:
            try:
                v = json.loads(self.out.get(timeout=max(0.1, deadline - time.time())))
            except queue.Empty:
                break
            i = v["id"] - first
            now = time.time()
            if "token" in v:
                streamed[i].append(v["token"])
                gap, last[i] = max(gap, now - last[i]), now
            elif "error" in v:
                results[i] = (None, v["error"])
            else:
                results[i] = (v["tokens"], None)
            if disturb and all(len(s) >= 3 for s in streamed):
                disturb()
                disturb = None
        return results, gap

    def spawn_worker(self):
        self.spares += 1
        name = f"soak-{self.spares}"
        p = subprocess.Popen([self.args.baton, "worker", "--listen", "127.0.0.1:0", "--no-mdns", "--name", name,
                              "--state-dir", os.path.join(self.state, "soak-workers", name),
                              "--key-file", os.path.join(self.state, "cluster.key")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.extra.append(p)
        deadline = time.time() + 60
        for line in p.stdout:
            if line.startswith("BATON_WORKER_READY"):
                control = next(f.split("=", 1)[1] for f in line.split() if f.startswith("control="))
                self.pids[name], self.endpoints[name] = p.pid, control
                return name
            if time.time() > deadline:
                break
        raise RuntimeError(f"{name} did not come up")

    def close(self):
        for p in self.extra:
            p.kill()
        self.serve.kill()
        self.serve.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--drains", type=int, default=20)
    ap.add_argument("--baton", default="target/release/baton")
    ap.add_argument("--model", help="default: the embedded model")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds a trial's streams may take")
    ap.add_argument("--verbose", action="store_true", help="echo serve's stderr")
    args = ap.parse_args()

    totals = dict(trials=0, completed=0, resumed=0, failed=0, hung=0)
    with tempfile.TemporaryDirectory() as state:
        soak = Soak(args, state)
        try:
            reference, _ = soak.streams()
            if any(tokens is None for tokens, _ in reference):
                sys.exit(f"the undisturbed reference run failed: {reference}")
            print(f"reference: {len(reference)} streams of up to {args.max_tokens} tokens", flush=True)
            trials = ["kill"] * args.kills + ["drain"] * args.drains
            for t, kind in enumerate(trials, 1):
                victim = soak.chain_workers()[t % 3]
                resumed_before = soak.status().get("resumed_sequences", 0)

                def disturb():
                    if kind == "kill":
                        os.kill(soak.pids[victim], signal.SIGKILL)
                    else:
                        soak.baton("drain", victim)

                results, gap = soak.streams(disturb)
                completed = sum(1 for (r, ref) in zip(results, reference) if r is not None and r[0] == ref[0])
                hung = sum(1 for r in results if r is None)
                failed = len(results) - completed - hung
                resumed = soak.status().get("resumed_sequences", 0) - resumed_before
                status = soak.status()
                print(f"trial {t:2} {kind:5} {victim:8}: completed {completed}, resumed {resumed}, failed {failed}, hung {hung}; "
                      f"longest token gap {gap * 1e3:.0f} ms, re-plan pause {status.get('last_pause_ms', 0)} ms", flush=True)
                for r in results:
                    if r is not None and r[1] is not None:
                        print(f"    error: {r[1]}", flush=True)
                totals["trials"] += 1
                for k, v in (("completed", completed), ("resumed", resumed), ("failed", failed), ("hung", hung)):
                    totals[k] += v
                # Back to three workers: a fresh one after a kill, the drained one after a drain.
                back = soak.spawn_worker() if kind == "kill" else victim
                soak.baton("join", soak.endpoints[back])
                soak.baton("rebalance")
        finally:
            soak.close()
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    sys.exit(0 if totals["failed"] == 0 and totals["hung"] == 0 else 1)


if __name__ == "__main__":
    main()
