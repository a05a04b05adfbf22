"""Autoscaling on a real (local, one-node) Slurm: Slurm jobs over one run with ``adapt=(min, max)``.

    python -m casa_benchmarks.slurm_autoscale --max 4 --chunks 32 --work 1.0 --json bench-out/slurm_autoscale.json \\
        --plot bench-out/slurm_autoscale.png

Starts :class:`casa_executors.standins.slurm.LocalSlurm`, a dask-jobqueue
``SLURMCluster`` and ``casa_executors.dask(cluster=..., adapt=(min, max))``,
then runs a processor that reads the real CMS sample and works ``--work``
seconds per chunk. A thread counts the jobs ``squeue`` lists (running and
pending) every 0.25 s from before the run until after it, and the run's end
must leave none. Needs root (slurmd) and the Debian Slurm packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import awkward as ak
import cloudpickle
from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import casa_benchmarks/
SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "Run2012B_SingleMu-1000.parquet"


class Work(processor.ProcessorABC):
    """Counts muons and spends ``seconds`` per chunk, like a heavier analysis would."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def process(self, events):
        time.sleep(self.seconds)
        return {"events": len(events), "muons": int(ak.sum(ak.num(events.Muon)))}

    def postprocess(self, accumulator):
        return accumulator


class Sampler(threading.Thread):
    """(seconds since start, running jobs, pending jobs) every ``period`` s."""

    def __init__(self, slurm, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.slurm, self.period, self.t0 = slurm, period, time.monotonic()
        self.rows: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            jobs = self.slurm.jobs()
            running = sum(j.state in ("RUNNING", "COMPLETING") for j in jobs)
            self.rows.append((round(time.monotonic() - self.t0, 2), running, len(jobs) - running))
            time.sleep(self.period)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)


def files(n: int, workdir: Path) -> list[str]:
    from casa_benchmarks.adl.sample import write_root

    first = workdir / "sample-0.root"
    write_root(str(SAMPLE), str(first))
    out = [str(first)]
    for i in range(1, n):
        (workdir / f"sample-{i}.root").write_bytes(first.read_bytes())
        out.append(str(workdir / f"sample-{i}.root"))
    return out


def measure(minimum: int, maximum: int, chunks: int, work: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="casa-autoscale-"))
    try:
        return _measure(minimum, maximum, chunks, work, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(minimum: int, maximum: int, chunks: int, work: float, tmp: Path) -> dict:
    from dask_jobqueue import SLURMCluster

    from casa_executors.standins.slurm import LocalSlurm

    n_files = max(1, -(-chunks // 4))  # 1000 events per file, 250 per chunk
    data = files(n_files, tmp)
    with LocalSlurm() as slurm:
        cluster = SLURMCluster(
            cores=1, memory="1GB", processes=1, queue=slurm.partition, python=sys.executable,
            walltime="00:30:00", job_extra_directives=[f"--chdir={tmp}"], worker_extra_args=["--host", "127.0.0.1"],
            scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "allowed_failures": 0},
        )
        sampler = Sampler(slurm)
        try:
            ex = casa_executors.dask(cluster=cluster, adapt=(minimum, maximum), worker_timeout=120, status=False)
            sampler.start()
            time.sleep(1.0)  # the idle baseline: adapt asks for nothing before there is work
            start = sampler.now()
            runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=250, maxchunks=chunks,
                                      metadata_cache={})
            out = runner({"SingleMu": data}, Work(work), treename="Events")
            end = sampler.now()
            deadline = time.monotonic() + 60
            while slurm.jobs() and time.monotonic() < deadline:
                time.sleep(0.25)
            released = sampler.now()
            time.sleep(1.0)
            sampler.done.set()
            sampler.join()
            left = slurm.jobs()
        finally:
            sampler.done.set()
            cluster.close()
        summary = ex.report.summary()
    rows = sampler.rows
    first_job = next((t for t, r, p in rows if r + p), None)
    first_running = next((t for t, r, p in rows if r), None)
    workers = sorted({r.worker.split("/", 1)[0] for r in ex.report.rows()})
    return {
        "adapt": [minimum, maximum], "chunks": summary["chunks"], "work_s_per_chunk": work,
        "events": out["events"], "attempts": summary["attempts"],
        "run_start_s": start, "run_end_s": end, "run_wall_s": round(end - start, 2),
        "first_job_after_s": None if first_job is None else round(first_job - start, 2),
        "first_running_after_s": None if first_running is None else round(first_running - start, 2),
        "max_jobs": max(r + p for _, r, p in rows), "max_running": max(r for _, r, _ in rows),
        "jobs_before_run": rows[0][1] + rows[0][2],
        "all_released_after_end_s": round(released - end, 2), "jobs_left_after": len(left),
        "slurm_jobs_in_report": workers,
        "timeline": [{"t_s": t, "running": r, "pending": p} for t, r, p in rows],
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [row["t_s"] for row in result["timeline"]]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.step(t, [row["running"] for row in result["timeline"]], where="post", label="running jobs")
    ax.step(t, [row["running"] + row["pending"] for row in result["timeline"]], where="post", linestyle="--",
            label="running + pending")
    ax.axvspan(result["run_start_s"], result["run_end_s"], alpha=0.15, label="run")
    ax.set_xlabel("seconds")
    ax.set_ylabel("Slurm jobs")
    ax.set_title(f"adapt={tuple(result['adapt'])}: {result['chunks']} chunks x {result['work_s_per_chunk']} s")
    ax.set_ylim(0, result["adapt"][1] + 1)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min", type=int, default=0)
    ap.add_argument("--max", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--work", type=float, default=1.0, help="seconds of work per chunk")
    ap.add_argument("--json", default="bench-out/slurm_autoscale.json")
    ap.add_argument("--plot", default="bench-out/slurm_autoscale.png")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("slurm_autoscale: needs root to start a local Slurm", file=sys.stderr)
        return 2
    result = measure(args.min, args.max, args.chunks, args.work)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    brief = {k: v for k, v in result.items() if k != "timeline"}
    print(json.dumps(brief, indent=1))
    return 0 if result["jobs_left_after"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
