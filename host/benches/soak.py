#!/usr/bin/env python3
"""Soak: many mixed `host run` jobs against one embedded cluster (`host cluster up`), a few at a
time. Every job must end as its kind says (success, script failure, timeout), none may be a
system failure, and once the cluster has stopped no process of it may be left.

    python3 host/benches/soak.py --host target/debug/host --jobs 200 --parallel 4

Needs `make images` (the busybox archive the jobs and their helper run in). Not part of
`make bench`: it takes minutes and measures nothing but survival. Run two at once to load the
machine with two clusters.
"""

import argparse
import concurrent.futures
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "keel-examples/busybox:1.35"
# kind -> (script lines, extra job keys, whether `host run` must succeed)
JOBS = {
    "ok": (["echo hi", "wget -qO- http://host.keel.internal:1/ || true"], "", True),
    "fail": (["exit 3"], "", False),
    "timeout": (["sleep 30"], "timeout: 3s\n", False),
    "net": (["hostname -i", "cat /etc/resolv.conf"], "", True),
    # The image's user as the node runs it as root: its own uid, gid and groups.
    # (/etc stays root's: mapped to the pod's root instead, it would appear as the user's.)
    "user": (["test \"$(id -u):$(id -g)\" = 1000:1000", "test \"$(stat -c %u /etc)\" = 0", "echo made > mine"], "", True),
}
# Extra `image:` keys per kind (the job file's image is a mapping then).
IMAGE_KEYS = {"user": "  kubernetes:\n    user: \"1000:1000\"\n"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default=os.path.join(ROOT, "target/debug/host"))
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=4)
    args = ap.parse_args()
    images = os.path.join(ROOT, "target/images")
    config = os.path.join(ROOT, "examples/local.toml")
    # Job files and the cluster's data live apart: the job's directory is copied as its sources.
    jobs_dir = tempfile.mkdtemp(prefix="keel-soak-jobs-")
    cluster_dir = tempfile.mkdtemp(prefix="keel-soak-cluster-")
    # Open to other users (mkdtemp makes it 0700), so the `user` jobs run as their real uid.
    os.chmod(cluster_dir, 0o755)
    for kind, (lines, extra, _) in JOBS.items():
        script = "".join(f"  - {line!r}\n" for line in lines)
        with open(os.path.join(jobs_dir, f"{kind}.yml"), "w") as f:
            image = f"image:\n  name: {IMAGE}\n{IMAGE_KEYS[kind]}" if kind in IMAGE_KEYS else f"image: {IMAGE}\n"
            f.write(f"{image}{extra}script:\n{script}")
    log = open(os.path.join(cluster_dir, "cluster.log"), "w")
    up = subprocess.Popen(
        [args.host, "cluster", "up", "--images-from", images, "--data-dir", os.path.join(cluster_dir, "c")],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    kubeconfig = up.stdout.readline().strip()

    def run(i: int):
        kind = random.choice(list(JOBS))
        start = time.monotonic()
        p = subprocess.run(
            [args.host, "run", "--kubeconfig", kubeconfig, "--config", config, os.path.join(jobs_dir, f"{kind}.yml")],
            capture_output=True, text=True, timeout=600,
        )
        out = p.stdout + p.stderr
        must_succeed = JOBS[kind][2]
        ok = (p.returncode == 0) == must_succeed and "system failure" not in out
        return i, kind, p.returncode, ok, time.monotonic() - start, out[-2000:]

    bad, durations = [], []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for i, kind, rc, ok, took, tail in pool.map(run, range(args.jobs)):
            durations.append(took)
            if not ok:
                bad.append(i)
                print(f"BAD job {i} ({kind}, exit {rc}):\n{tail}", flush=True)
    up.terminate()
    up.wait(timeout=60)
    left = subprocess.run(["pgrep", "-f", cluster_dir], capture_output=True, text=True).stdout.split()
    durations.sort()
    print(
        f"{args.jobs} jobs, {args.parallel} at a time, in {time.monotonic() - started:.0f} s "
        f"(median {durations[len(durations) // 2]:.1f} s a job): {len(bad)} bad; "
        f"left after the cluster stopped: {left or 'nothing'}"
    )
    return 1 if bad or left else 0


if __name__ == "__main__":
    sys.exit(main())
