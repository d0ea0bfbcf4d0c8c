#!/usr/bin/env python3
"""A 200 MB cache (random bytes: incompressible) saved and restored by `host run` through the S3
path (moto's server on loopback, signatures checked) against a plain `cp` of the same bytes on
this machine, in the same run.

Usage: python3 host/benches/cache_s3.py [--host target/release/host] [--runs 3] [--mb 200]

What is timed is the host's own `keel::timings` phases: `archive_cache` (tar out of the pod ->
cache.zip on disk -> multipart upload) and `restore_cache` (download -> tar -> into the pod), so
the job's script (which writes the random file) is not counted. The baseline is `cp` of a file
with the same size and kind of bytes, host to host, page cache warm as it is for the cache path.
Not part of the tests (`make bench` only); needs moto[server] and boto3 (`.ci/run`).
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_moto(work):
    import boto3

    port = free_port()
    moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    ep = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1", aws_access_key_id="s", aws_secret_access_key="s")
    iam.create_user(UserName="ci")
    key = iam.create_access_key(UserName="ci")["AccessKey"]
    iam.put_user_policy(UserName="ci", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                 aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket="bench")
    return moto, port, key["AccessKeyId"], key["SecretAccessKey"]


def phase(stderr, name):
    m = re.search(rf"\b{name}=([\d.]+)ms", stderr)
    if not m:
        sys.exit(f"no {name} phase in the host's log:\n{stderr}")
    return float(m.group(1)) / 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default=os.path.join(ROOT, "target/release/host"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=200)
    args = ap.parse_args()
    size = args.mb * 1024 * 1024

    work = tempfile.mkdtemp(prefix="keel-cache-bench-")
    moto, port, access, secret = start_moto(work)
    up = subprocess.Popen([args.host, "cluster", "up", "--host-rootfs"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    kubeconfig = up.stdout.readline().strip()
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write(f'[[runners]]\nname = "bench"\nexecutor = "kubernetes"\n[runners.kubernetes]\n'
                f'[runners.cache]\nType = "s3"\n[runners.cache.s3]\nServerAddress = "127.0.0.1:{port}"\n'
                f'AccessKey = "{access}"\nSecretKey = "{secret}"\nBucketName = "bench"\nInsecure = true\n')
    jobs = os.path.join(work, "jobs")
    os.makedirs(jobs)
    save_job, restore_job = os.path.join(jobs, "save.yml"), os.path.join(jobs, "restore.yml")
    with open(save_job, "w") as f:
        f.write("image: busybox\ncache: {key: bench, paths: [big/], policy: push}\n"
                f"script:\n  - mkdir -p big && head -c {size} /dev/urandom > big/blob\n")
    with open(restore_job, "w") as f:
        f.write("image: busybox\ncache: {key: bench, paths: [big/], policy: pull}\n"
                "script:\n  - ls -l big/blob\n")
    env = dict(os.environ, KEEL_LOG="keel::timings=info", KEEL_PLUGIN_CACHE=os.path.join(work, "plugins"))

    def host(job):
        r = subprocess.run([args.host, "run", "--kubeconfig", kubeconfig, "--config", config, job],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"host run {job} failed:\n{r.stdout}\n{r.stderr}")
        return r

    saves, restores, cps = [], [], []
    try:
        src = os.path.join(work, "blob")
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1024 * 1024))
        for i in range(args.runs):
            t = time.perf_counter()
            subprocess.run(["cp", src, src + ".cp"], check=True)
            cps.append(time.perf_counter() - t)
            os.remove(src + ".cp")
            r = host(save_job)
            if "Created cache" not in r.stdout:
                sys.exit(f"the cache was not saved:\n{r.stdout}")
            saves.append(phase(r.stderr, "archive_cache"))
            r = host(restore_job)
            if "Successfully extracted cache" not in r.stdout or str(size) not in r.stdout:
                sys.exit(f"the cache was not restored:\n{r.stdout}")
            restores.append(phase(r.stderr, "restore_cache"))
    finally:
        up.terminate()
        up.wait()
        moto.terminate()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)

    mb = args.mb
    cp, save, restore = statistics.median(cps), statistics.median(saves), statistics.median(restores)
    print(f"{mb} MiB random bytes, median of {args.runs} runs, host binary {args.host}")
    print(f"| path | time | MiB/s | vs cp |")
    print(f"|---|---|---|---|")
    print(f"| cp (host to host) | {cp:.2f} s | {mb / cp:.0f} | 1x |")
    print(f"| save: pod tar -> cache.zip -> S3 upload | {save:.2f} s | {mb / save:.0f} | {save / cp:.1f}x slower |")
    print(f"| restore: S3 download -> tar -> pod | {restore:.2f} s | {mb / restore:.0f} | {restore / cp:.1f}x slower |")


if __name__ == "__main__":
    main()
