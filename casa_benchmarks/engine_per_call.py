"""One engine per Runner call: the time of one ``Runner`` call, with an engine started per executor call
(``idle_timeout=0``: coffea's preprocessing and processing each start and stop it) against one engine for
both (the default: preprocessing's engine stays up for processing, which stops it).

    python -m casa_benchmarks.engine_per_call --json bench-out/engine_per_call.json
    python -m casa_benchmarks.engine_per_call --engines dask --repeat 3

Engines: ``dask(workers=2)`` (its own LocalCluster) and, on a local one-node Slurm (root only),
``parsl(provider=SlurmProvider(...), adapt=(0, 2))`` and ``workqueue(submit="slurm", adapt=(1, 2))``.
The input is the real CMS sample (1000 events) copied into ``--files`` files, one chunk per file. For
each call: its wall time, how many times the engine started (the backend's count; for dask also
distributed's own "Scheduler at" log records) and, on Slurm, the job ids the controller accepted
during the call (its log). The two settings alternate, each going first in turn.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import awkward as ak
import cloudpickle
from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors
from casa_benchmarks.common import rotated, save_json

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import casa_benchmarks/
SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "Run2012B_SingleMu-1000.parquet"
SETTINGS = {"engine per call (idle_timeout=0)": 0.0, "one engine per Runner call": None}
ENGINES = ("dask", "parsl-slurm", "workqueue-slurm")


class MuonCount(processor.ProcessorABC):
    def process(self, events):
        return {"events": len(events), "muons": int(ak.sum(ak.num(events.Muon)))}

    def postprocess(self, accumulator):
        return accumulator


class SchedulerStarts(logging.Handler):
    """distributed's record of each scheduler it starts in this process (one per LocalCluster)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Scheduler at:" in record.getMessage()


def sample_files(n: int, workdir: Path) -> list[str]:
    from casa_benchmarks.adl.sample import write_root

    first = workdir / "sample-0.root"
    write_root(str(SAMPLE), str(first))
    out = [str(first)]
    for i in range(1, n):
        shutil.copyfile(first, workdir / f"sample-{i}.root")
        out.append(str(workdir / f"sample-{i}.root"))
    return out


def submitted_jobs(slurm: Any) -> set[str]:
    """Every job id the controller accepted so far (squeue forgets finished jobs; its log does not)."""
    text = (slurm.dir / "log" / "slurmctld.log").read_text(errors="replace")
    return set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text))


def executor(engine: str, idle_timeout: float | None, slurm: Any, jobdir: Path) -> casa_executors.Driver:
    opts: dict[str, Any] = {"status": False}
    if idle_timeout is not None:
        opts["idle_timeout"] = idle_timeout
    if engine == "dask":
        return casa_executors.dask(workers=2, **opts)
    if engine == "parsl-slurm":
        from parsl.launchers import SingleNodeLauncher
        from parsl.providers import SlurmProvider

        provider = SlurmProvider(partition=slurm.partition, exclusive=False, nodes_per_block=1,
                                 walltime="00:20:00", launcher=SingleNodeLauncher(),
                                 scheduler_options=f"#SBATCH --chdir={jobdir}\n")
        return casa_executors.parsl(provider=provider, adapt=(0, 2), host="127.0.0.1", worker_timeout=120, **opts)
    if engine == "workqueue-slurm":
        # adapt=(1, 2): with a minimum of 0, cctools 9.9's work_queue_factory cannot read the manager's status
        return casa_executors.workqueue(submit="slurm", adapt=(1, 2), worker_timeout=120, **opts)
    raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")


def one_call(engine: str, setting: str, files: list[str], chunksize: int, slurm: Any, jobdir: Path) -> dict:
    ex = executor(engine, SETTINGS[setting], slurm, jobdir)
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={})
    handler = SchedulerStarts()
    sched_log = logging.getLogger("distributed.scheduler")
    level = sched_log.level
    sched_log.setLevel(logging.INFO)
    sched_log.addHandler(handler)
    jobs_before = submitted_jobs(slurm) if slurm is not None else set()
    try:
        t0 = time.perf_counter()
        out = runner({"sample": files}, MuonCount(), treename="Events")
        wall = time.perf_counter() - t0
    finally:
        sched_log.removeHandler(handler)
        sched_log.setLevel(level)
    row = {"engine": engine, "setting": setting, "wall_s": round(wall, 3), "engine_starts": ex.backend.starts,
           "stopped_after": ex.backend.stopped.is_set(), "events": out["events"], "muons": out["muons"]}
    if engine == "dask":
        row["local_cluster_starts"] = handler.count
    if slurm is not None:
        row["slurm_jobs"] = sorted(submitted_jobs(slurm) - jobs_before, key=int)
        deadline = time.monotonic() + 60
        while slurm.jobs() and time.monotonic() < deadline:  # the next call starts on an empty queue
            time.sleep(0.2)
    return row


def measure(engines: list[str], repeat: int, n_files: int, chunksize: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="casa-engine-per-call-"))
    slurm = None
    try:
        files = sample_files(n_files, tmp)
        if any(e.endswith("-slurm") for e in engines):
            from casa_executors.standins.slurm import LocalSlurm

            slurm = LocalSlurm()
            slurm.start()
            slurm.export()
        rows = []
        for engine in engines:
            for rep in range(repeat):
                for setting in rotated(list(SETTINGS), rep):
                    row = one_call(engine, setting, files, chunksize, slurm if engine != "dask" else None, tmp)
                    row["repeat"] = rep
                    print(row, flush=True)
                    rows.append(row)
        left = slurm.jobs() if slurm is not None else []
    finally:
        if slurm is not None:
            slurm.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"command": " ".join(["python -m casa_benchmarks.engine_per_call", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0],
            "files": n_files, "chunksize": chunksize, "rows": rows, "summary": summary(rows),
            "jobs_left_after": len(left)}


def summary(rows: list[dict]) -> dict:
    """Per engine and setting: the best and median wall time, the starts and jobs of each call."""
    out: dict[str, dict] = {}
    for row in rows:
        cell = out.setdefault(row["engine"], {}).setdefault(row["setting"], {"wall_s": [], "engine_starts": [],
                                                                             "slurm_jobs": []})
        cell["wall_s"].append(row["wall_s"])
        cell["engine_starts"].append(row["engine_starts"])
        if "slurm_jobs" in row:
            cell["slurm_jobs"].append(len(row["slurm_jobs"]))
    for cells in out.values():
        for cell in cells.values():
            walls = sorted(cell["wall_s"])
            cell["best_s"], cell["median_s"] = walls[0], walls[len(walls) // 2]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="dask,parsl-slurm",
                    help=f"comma-separated, of: {', '.join(ENGINES)} (the Slurm ones need root)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--chunksize", type=int, default=1000, help="1000: one chunk per file")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    if any(e.endswith("-slurm") for e in engines) and os.geteuid() != 0:
        print("engine_per_call: the Slurm engines need root to start a local Slurm", file=sys.stderr)
        return 2
    result = measure(engines, args.repeat, args.files, args.chunksize)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    save_json(result, args.json)
    import json

    print(json.dumps(result["summary"], indent=1))
    return 0 if result["jobs_left_after"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
