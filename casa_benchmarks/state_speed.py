"""The driver's rules alone (``casa_executors.state.RunState``): CPU per chunk, and memory.

    python -m casa_benchmarks.state_speed --chunks 1000000 --window 20000 --json bench-out/state_speed.json

A tight loop feeds the state machine what a facility's engine would: tasks answered
first in, first out, a tick per answer, merge tasks answered as they come. It measures
the process CPU time of the whole loop per chunk: the rules plus this stand-in engine's
own few lines (an upper bound on the rules' cost; timing each ``handle`` call instead
would cost as much as it measures: ``process_time`` takes 2 µs a call here, and wall
time on a shared machine counts other processes). ``--speculate`` turns straggler
duplicates on (every 100th task, up to 50, is answered only through its duplicate).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import deque

from casa_executors.state import (
    Cancel,
    ChunksDone,
    Finish,
    MergedHere,
    MergeDone,
    MergeHere,
    Ok,
    Rules,
    RunState,
    SubmitChunks,
    SubmitMerge,
    Tick,
)


def measure(chunks: int, window: int, fanin: int, batch: int, speculate: bool) -> dict[str, float]:
    rules = Rules(retries=3, fanin=fanin, batch=batch, window=window, merges_here=False, tail_bytes=16 << 20,
                  speculate=speculate, speculate_min_s=0.0, speculate_after=20)
    cpu0 = time.process_time()
    state = RunState(chunks, rules)
    running: deque = deque()
    held: set[int] = set()  # stragglers: answered only through their duplicate
    clock, root, ok = 0.0, None, Ok(1, nbytes=1)
    pending = [Tick(clock)]
    while root is None:
        out = state.handle_all(pending)
        pending = []
        while out:
            ins = out.pop()
            kind = type(ins)
            if kind is SubmitChunks:
                running.append(ins)
                if speculate and ins.task % 100 == 7 and not ins.priority and ins.task not in held and len(held) < 50:
                    held.add(ins.task)
            elif kind is SubmitMerge:
                running.append(ins)
            elif kind is MergeHere:
                out += state.handle(MergedHere(ins.group, 1))
            elif kind is Finish:
                root = ins.root
            elif kind is Cancel:
                held.discard(ins.task)
        if root is not None:
            break
        clock += 0.001
        for _ in range(len(running)):
            ins = running.popleft()
            if ins.task in held:
                running.append(ins)
                continue
            break
        else:
            if speculate:  # only held tasks run: time passes until a duplicate goes out
                clock += 1.0
                pending = [Tick(clock)]
                continue
            raise RuntimeError("nothing to answer")
        if type(ins) is SubmitChunks:
            pending = [Tick(clock), ChunksDone(ins.task, (ok,) * len(ins.nodes))]
        else:
            pending = [Tick(clock), MergeDone(ins.task, 1)]
    loop_cpu = time.process_time() - cpu0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"chunks": chunks, "window": window, "fanin": fanin, "batch": batch, "speculate": speculate,
            "driver_us_per_chunk": loop_cpu / chunks * 1e6, "speculated": state.speculated, "rss_mb": rss_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=20_000)
    parser.add_argument("--fanin", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--speculate", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = measure(args.chunks, args.window, args.fanin, args.batch, args.speculate)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
