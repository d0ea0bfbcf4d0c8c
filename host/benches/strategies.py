#!/usr/bin/env python3
"""The execution strategies against kubectl, in the same run on the same embedded cluster.

Usage: python3 host/benches/strategies.py [--host target/release/host] [--runs 7] [--mib 20]

1. Per-stage overhead: the host's `step_script` phase (its `keel::timings` line) for a job whose
   only command is `true`, under each strategy, against a bare `kubectl exec <pod> -- true` on a
   pod of the same cluster (kubectl's process start included, as the host's is not: the ratio
   flatters kubectl, if anything).
2. Log streaming throughput: a stage printing N MiB of 100-byte lines, streamed through the attach
   strategy (stage -> log file -> reader exec in the helper -> host -> masked trace -> stdout),
   against `kubectl logs -f` of a pod that printed the same N MiB (the kubelet's log path).
   Throughput = bytes / (stage phase) and bytes / (kubectl logs -f wall time).
Runs alternate so a load change on the machine hits all alike; medians are reported.
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
STRATEGIES = ["exec", "attach", "nsenter"]


def phases_of(stderr):
    m = re.search(r"phases=(\S+(?: \S+=\S+ms)*)", stderr)
    out = {}
    if m:
        for part in m.group(1).split():
            k, v = part.split("=")
            out[k] = float(v[:-2])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default=os.path.join(ROOT, "target/release/host"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mib", type=int, default=20)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="keel-bench-")
    true_job = os.path.join(work, "true.yml")
    with open(true_job, "w") as f:
        f.write("image: busybox\nvariables:\n  GIT_STRATEGY: none\nscript:\n  - \"true\"\n")
    size = args.mib * 1024 * 1024
    lines = size // 100
    gen = f"i=0; yes 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' | head -n {lines}"
    big_job = os.path.join(work, "big.yml")
    with open(big_job, "w") as f:
        f.write(f"image: busybox\nvariables:\n  GIT_STRATEGY: none\nscript:\n  - \"{gen}\"\n")
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        # GitLab's default output_limit (4 MiB) would cut the trace short.
        f.write('[[runners]]\nname = "bench"\nexecutor = "kubernetes"\ntoken = "glrt-bench"\n'
                f"output_limit = {args.mib * 1024 * 2}\n[runners.kubernetes]\n")

    up = subprocess.Popen([args.host, "cluster", "up", "--host-rootfs"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    kubeconfig = up.stdout.readline().strip()
    env = dict(os.environ, KEEL_LOG="keel::timings=info", KEEL_PLUGIN_CACHE=os.path.join(work, "cache"))
    kubectl = ["kubectl", "--kubeconfig", kubeconfig]

    def host(job, strategy, out=subprocess.PIPE):
        h = subprocess.run([args.host, "run", "--config", config, "--kubeconfig", kubeconfig, "--strategy", strategy,
                            job], env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        if h.returncode != 0:
            sys.exit(f"host run --strategy {strategy} failed:\n{h.stdout}\n{h.stderr}")
        return h

    stage = {s: [] for s in STRATEGIES}
    kexec, kstart = [], []
    attach_stream, klogs = [], []
    try:
        subprocess.run(kubectl + ["run", "sleeper", "--image=busybox", "--restart=Never", "--", "sleep", "3600"],
                       check=True, capture_output=True)
        subprocess.run(kubectl + ["wait", "--for=condition=Ready", "pod/sleeper", "--timeout=60s"], check=True,
                       capture_output=True)
        subprocess.run(kubectl + ["run", "printer", "--image=busybox", "--restart=Never", "--", "sh", "-c", gen],
                       check=True, capture_output=True)
        subprocess.run(kubectl + ["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/printer",
                                  "--timeout=120s"], check=True, capture_output=True)
        for s in STRATEGIES:  # warm-up: compile cache, page cache
            host(true_job, s)
        for _ in range(args.runs):
            for s in STRATEGIES:
                stage[s].append(phases_of(host(true_job, s).stderr).get("step_script", float("nan")))
            t = time.perf_counter()
            subprocess.run(kubectl + ["exec", "sleeper", "--", "true"], check=True, capture_output=True)
            kexec.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            subprocess.run(kubectl + ["version", "--client"], check=True, capture_output=True)
            kstart.append((time.perf_counter() - t) * 1000)
            with open(os.devnull, "w") as devnull:
                h = host(big_job, "attach", out=devnull)
            attach_stream.append(phases_of(h.stderr).get("step_script", float("nan")) / 1000)
            t = time.perf_counter()
            k = subprocess.run(kubectl + ["logs", "-f", "printer"], check=True, capture_output=True)
            klogs.append(time.perf_counter() - t)
            if len(k.stdout) < size * 0.99:
                sys.exit(f"kubectl logs returned {len(k.stdout)} bytes, expected {size}")
    finally:
        up.send_signal(2)
        up.wait(timeout=60)

    med = statistics.median
    km = med(kexec)
    print(f"runs: {args.runs}, alternating, same cluster")
    print(f"kubectl exec sleeper -- true       median {km:7.1f} ms   (kubectl version --client alone: "
          f"{med(kstart):.1f} ms, so the exec itself ~{km - med(kstart):.1f} ms)")
    for s in STRATEGIES:
        m = med(stage[s])
        print(f"stage `true` under {s:8}          median {m:7.1f} ms   ratio to kubectl exec {m / km:.2f}"
              f" (to its exec alone {m / max(km - med(kstart), 0.1):.2f})")
    a, k = size / med(attach_stream) / 2**20, size / med(klogs) / 2**20
    print(f"attach log streaming of {args.mib} MiB      median {a:7.1f} MiB/s")
    print(f"kubectl logs -f of {args.mib} MiB           median {k:7.1f} MiB/s")
    print(f"ratio attach/kubectl logs -f: {a / k:.2f}  (aim: >= 0.8)")


if __name__ == "__main__":
    main()
