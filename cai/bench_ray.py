"""Ray executor benchmark: 1 vs 2 replicas of the openai backend against a local stub server with a
fixed latency (tokens/s, ratio), and Ray's overhead per batch vs the local executor on the fake engine.

    RAY_USAGE_STATS_ENABLED=0 python -m cai.bench_ray [--latency 0.5] [--prompts 48] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cai.engine.stub_server import StubChatServer
from cai.pipeline import generate_sft
from cai.ray_executor import RayExecutor
from cai.recipe import EngineSpec, Phase1Config, SFTJob
from cai.records import SamplingParams

HARMLESS = "harmless"  # the bundled constitution


def job(root: Path, out: str, n: int, engine: EngineSpec, batch_size: int) -> SFTJob:
    prompts = root / f"prompts-{n}.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"question number {i}?"}) + "\n" for i in range(n)))
    short = SamplingParams(max_tokens=64)
    return SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(root / out), engine=engine, batch_size=batch_size,
                  parquet=False, phase1=Phase1Config(rounds=1, answer=short, critique=short, revision=short))


def timed(make, executor) -> tuple[float, int]:
    started = time.perf_counter()
    summary = generate_sft(make, executor=executor)
    wall = time.perf_counter() - started
    print(f"    ({make.out.rsplit('/', 1)[-1]}: wall {wall:.2f} s, in the stage calls {summary.generation_seconds:.2f} s)")
    return wall, summary.generated_tokens_now


def replicas(root: Path, args) -> None:
    with StubChatServer(latency=args.latency) as server:
        spec = EngineSpec(backend="openai", model="stub", options={"base_url": server.url, "api_key": "k"})
        timed(job(root, "warm-local", 2, spec, 1), None)
        wall, tokens = timed(job(root, "openai-local", args.prompts, spec, args.batch_size), None)
        print(f"openai backend, stub latency {args.latency * 1000:.0f} ms, local executor: {args.prompts} prompts "
              f"in {wall:.2f} s wall, {tokens} tokens, {tokens / wall:.1f} tokens/s")
        rates = {}
        for n in (1, 2):
            with RayExecutor(replicas=n, num_cpus=0.5) as ex:
                timed(job(root, f"warm-{n}", n * 2, spec, 1), ex)  # replicas up, engines built: not measured
                wall, tokens = timed(job(root, f"openai-{n}", args.prompts, spec, args.batch_size), ex)
            rates[n] = tokens / wall
            print(f"openai backend, stub latency {args.latency * 1000:.0f} ms, {n} replica(s): {args.prompts} prompts "
                  f"in {wall:.2f} s wall, {tokens} tokens, {rates[n]:.1f} tokens/s")
        print(f"2 replicas / 1 replica: {rates[2] / rates[1]:.2f}x")


def overhead(root: Path, args) -> None:
    fake, n = EngineSpec(backend="fake"), args.overhead_batches
    timed(job(root, "fake-local-warm", 2, fake, 1), None)
    local, _ = timed(job(root, "fake-local", n, fake, 1), None)
    print(f"fake engine, local executor: {n} batches of 1 prompt in {local:.2f} s = {local / n * 1000:.1f} ms/batch")
    for k in (1, 2):
        with RayExecutor(replicas=k, num_cpus=0.5) as ex:
            timed(job(root, f"fake-warm-{k}", 2, fake, 1), ex)
            wall, _ = timed(job(root, f"fake-ray-{k}", n, fake, 1), ex)
        print(f"fake engine, Ray executor, {k} replica(s): {n} batches in {wall:.2f} s = {wall / n * 1000:.1f} ms/batch; "
              f"Ray's overhead {(wall - local) / n * 1000:+.1f} ms/batch vs local")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overhead-batches", type=int, default=200)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        replicas(Path(tmp), args)
        overhead(Path(tmp), args)
    ray.shutdown()


if __name__ == "__main__":
    main()
