#!/usr/bin/env python3
"""`host run` of an `echo hi` job end to end against `kubectl run --rm -i --restart=Never
--image=busybox x -- echo hi`, in the same run on the same embedded cluster (`host cluster up`).

Usage: python3 host/benches/run_vs_kubectl.py [--host target/release/host] [--runs 10]

Both commands go through the same kubeconfig (HTTPS, client certificate). Runs alternate so a
load change on the machine hits both alike. Reported: median and p90 wall time of each, their
ratio, the host's own breakdown (the `keel::timings` line: prepare = config, job and plugin
load/calls; create->running; sources; stage; cleanup) and its peak RSS (VmHWM) per job.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_p90(xs):
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default=os.path.join(ROOT, "target/release/host"))
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="keel-bench-")
    job = os.path.join(work, "job.yml")
    with open(job, "w") as f:
        f.write("image: busybox\nvariables:\n  GIT_STRATEGY: none\nscript:\n  - echo hi\n")
    up = subprocess.Popen([args.host, "cluster", "up", "--host-rootfs"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    kubeconfig = up.stdout.readline().strip()
    env = dict(os.environ, KEEL_LOG="keel::timings=info", KEEL_PLUGIN_CACHE=os.path.join(work, "cache"))
    host_cmd = [args.host, "run", "--kubeconfig", kubeconfig, job]

    def kubectl_cmd(i):
        return ["kubectl", "--kubeconfig", kubeconfig, "run", f"bench-{i}", "--rm", "-i", "--restart=Never",
                "--image=busybox", "--", "echo", "hi"]

    host_times, kubectl_times, phases, rss = [], [], {}, []
    kubectl_saw_output = 0
    # The runs in which kubectl showed `hi`: the ones that did the same work as `host run`.
    kubectl_complete = []
    # kubectl's own process start-up, a floor under every kubectl run.
    kubectl_start = []
    try:
        # Warm-up: compile cache, page cache, the cluster's first pod.
        subprocess.run(host_cmd, env=env, capture_output=True, check=True)
        subprocess.run(kubectl_cmd("warm"), capture_output=True, check=True)
        for i in range(args.runs):
            t = time.perf_counter()
            h = subprocess.run(host_cmd, env=env, capture_output=True, text=True)
            host_times.append(time.perf_counter() - t)
            if h.returncode != 0 or "hi\n" not in h.stdout:
                sys.exit(f"host run failed:\n{h.stdout}\n{h.stderr}")
            m = re.search(r"phases=(\S+(?: \S+=\S+ms)*) peak_rss_kib=(\d+)", h.stderr)
            if m:
                for part in m.group(1).split():
                    k, v = part.split("=")
                    phases.setdefault(k, []).append(float(v[:-2]))
                rss.append(int(m.group(2)))
            t = time.perf_counter()
            k = subprocess.run(kubectl_cmd(i), capture_output=True, text=True)
            kubectl_times.append(time.perf_counter() - t)
            if k.returncode != 0:
                sys.exit(f"kubectl run failed:\n{k.stdout}\n{k.stderr}")
            # kubectl attaches after creating the pod; a container this short may be done
            # before that, and then kubectl shows nothing (a race on any cluster).
            kubectl_saw_output += "hi" in k.stdout
            if "hi" in k.stdout:
                kubectl_complete.append(kubectl_times[-1])
            t = time.perf_counter()
            subprocess.run(["kubectl", "version", "--client"], capture_output=True)
            kubectl_start.append(time.perf_counter() - t)
    finally:
        up.send_signal(2)
        up.wait(timeout=60)

    hm, hp = median_p90(host_times)
    km, kp = median_p90(kubectl_times)
    print(f"runs: {args.runs} each, alternating, same cluster")
    print(f"host run      median {hm * 1000:7.1f} ms   p90 {hp * 1000:7.1f} ms")
    print(f"kubectl run   median {km * 1000:7.1f} ms   p90 {kp * 1000:7.1f} ms")
    print(f"ratio host/kubectl (median): {hm / km:.2f}  (aim: <= 0.5)")
    print(f"kubectl showed the output in {kubectl_saw_output}/{args.runs} runs; host run in all")
    if kubectl_complete:
        cm, _ = median_p90(kubectl_complete)
        print(f"kubectl run, the runs that showed the output: median {cm * 1000:.1f} ms (ratio {hm / cm:.2f})")
    print(f"kubectl version --client (process start): median {statistics.median(kubectl_start) * 1000:.1f} ms")
    if phases:
        inside = sum(statistics.median(v) for v in phases.values())
        print("host breakdown (median ms): " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items()))
        print(f"process start + exit (wall - phases): {hm * 1000 - inside:.1f} ms")
    if rss:
        print(f"host peak RSS per job: median {statistics.median(rss) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
