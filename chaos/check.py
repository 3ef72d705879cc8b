"""The invariants checked at the end of a chaos run, and the figures of the report.

Inputs: the ledger's final rows of the two tasks, the handlers' execution log, the
producers' acknowledgement logs and the harness's own log (process lifetimes, pauses,
outages, faults). See ``chaos/README.md`` for each check and why it holds.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import read, read_all

Key = tuple[str, int]  # (task name "auto"|"manual", job id)

#: End-record outcomes the workload asked for: a failed attempt by design.
PLANNED_FAILURES = {"raise", "todo", "none"}


@dataclass
class Run:
    key: Key
    cid: int
    pid: int
    start: float
    end: float | None = None  # end record, or the process's death, or None
    out: str | None = None  # end record's outcome; None if the run never finished
    kind: str = ""


@dataclass
class Row:
    status: str
    commit_id: int
    failed_times: int


@dataclass
class Outcome:
    violations: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def fail(self, what: str, items: list[Any], limit: int = 10) -> None:
        if items:
            shown = ", ".join(str(i) for i in items[:limit])
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            self.violations.append(f"{what}: {len(items)}: {shown}{more}")


def _intersects(a0: float, a1: float, spans: list[tuple[float, float]]) -> bool:
    return any(s0 < a1 and a0 < s1 for s0, s1 in spans)


def load_runs(run_dir: Path, deaths: dict[int, float]) -> tuple[list[Run], list[str]]:
    runs: dict[tuple[str, int, int, int], Run] = {}
    problems: list[str] = []
    ends: list[dict[str, Any]] = []
    for rec in read_all(run_dir, "exec-*.jsonl"):
        ident = (rec["task"], rec["job"], rec["cid"], rec["pid"])
        if rec["e"] == "start":
            if ident in runs:
                problems.append(f"{ident}")
            runs[ident] = Run((rec["task"], rec["job"]), rec["cid"], rec["pid"], rec["ts"])
            runs[ident].kind = rec.get("kind", "")
        elif rec["e"] == "end":
            ends.append(rec)
    for rec in ends:
        run = runs.get((rec["task"], rec["job"], rec["cid"], rec["pid"]))
        if run is not None:
            run.end, run.out = rec["ts"], rec["out"]
    for run in runs.values():
        if run.end is None:
            run.end = deaths.get(run.pid)
    return list(runs.values()), problems


def check(
    run_dir: Path,
    rows: dict[Key, Row],
    max_failed_times: int,
    harness: list[dict[str, Any]],
) -> Outcome:
    res = Outcome()
    fig = res.figures

    # -- processes, pauses and outages from the harness log ------------------------------
    deaths: dict[int, float] = {}
    paused: dict[int, list[tuple[float, float]]] = defaultdict(list)
    outages: list[tuple[float, float]] = []
    for rec in harness:
        if rec["e"] == "exit":
            deaths[rec["pid"]] = rec["ts"]
        elif rec["e"] == "paused":
            paused[rec["pid"]].append((rec["since"], rec["until"]))
        elif rec["e"] == "db_down":
            outages.append((rec["since"], rec["until"]))

    # -- producers: acknowledged ids ----------------------------------------------------
    acked: set[Key] = set()
    torn: list[dict[str, Any]] = []
    acks: list[tuple[int, float, Key]] = []  # (producer index, wall time, first job)
    for path in sorted(run_dir.glob("ack-*.jsonl")):
        index = int(path.stem.split("-")[1])
        for rec in read(path):
            if rec["e"] == "ack":
                acked.update((rec["task"], i) for i in rec["ids"])
                acks.append((index, rec["ts"], (rec["task"], rec["ids"][0])))
            elif rec["e"] == "torn":
                torn.append({**rec, "index": index})
    acks.sort(key=lambda a: a[1])
    fig["acknowledged"] = len(acked)
    fig["ledger_rows"] = len(rows)
    fig["unacknowledged_rows"] = len(set(rows) - acked)
    fig["by_task"] = dict(Counter(k[0] for k in rows))

    # Invariant 1: an id a producer got back is never lost ...
    lost = sorted(k for k in acked if k not in rows)
    res.fail("acknowledged jobs missing from the ledger (lost)", lost)
    fig["lost"] = len(lost)
    # ... and invariant 4: every job (acknowledged or not) reached a terminal state.
    stuck = sorted((k, r.status) for k, r in rows.items() if r.status not in ("done", "failed"))
    res.fail("jobs not in a terminal state after the drain (stuck)", stuck)
    fig["stuck"] = len(stuck)
    fig["status"] = dict(Counter(r.status for r in rows.values()))

    # -- executions ---------------------------------------------------------------------
    runs, double = load_runs(run_dir, deaths)
    # Invariant 2 (fencing): one claim (job, commit_id) is handed to one run only.
    claims = Counter((r.key, r.cid) for r in runs)
    res.fail("claims handed to two runs (same job and commit_id)", double)
    res.fail(
        "claims handed to two runs in different processes",
        sorted(f"{k}@{c}" for (k, c), n in claims.items() if n > 1),
    )
    by_job: dict[Key, list[Run]] = defaultdict(list)
    for r in runs:
        by_job[r.key].append(r)
    for rs in by_job.values():
        rs.sort(key=lambda r: r.start)
    fig["executions"] = len(runs)
    fig["jobs_executed"] = len(by_job)
    unfinished = [r for r in runs if r.end is None]
    res.fail(
        "runs with no end and no known process death",
        [f"{r.key}@{r.cid} pid {r.pid}" for r in unfinished],
    )

    # Invariant 3: no two runs of a job overlap, setting aside runs of a process that
    # was frozen meanwhile (and runs across a database outage: no lease can be renewed
    # while the ledger is down, so it may expire under a live handler).
    overlaps: list[str] = []
    excused = Counter[str]()
    for key, rs in by_job.items():
        for i, a in enumerate(rs):
            a_end = a.end if a.end is not None else math.inf
            for b in rs[i + 1 :]:
                if b.start >= a_end:
                    break
                if _intersects(a.start, a_end, paused.get(a.pid, [])):
                    excused["paused"] += 1
                elif _intersects(a.start, b.start, outages):
                    excused["db_outage"] += 1
                else:
                    overlaps.append(
                        f"{key}: pid {a.pid} cid {a.cid} [{a.start:.3f}, {a_end:.3f}] and "
                        f"pid {b.pid} cid {b.cid} from {b.start:.3f}"
                    )
    res.fail("overlapping runs of one job (outside pauses and outages)", overlaps)
    fig["overlaps"] = len(overlaps)
    fig["overlaps_excused"] = dict(excused)

    # Stale commits: the commit that finished a job carried the claim of the run that
    # made it (final commit_id - 1), and that run finished with that verdict.
    done_verdict = {"auto": "ok", "manual": "done"}
    bad_done: list[str] = []
    bad_failed: list[str] = []
    failed_why = Counter[str]()
    for key, row in rows.items():
        if row.status not in ("done", "failed"):
            continue
        committing = [r for r in by_job.get(key, []) if r.cid == row.commit_id - 1]
        if row.status == "done":
            if not any(r.out == done_verdict[key[0]] for r in committing):
                seen = [(r.pid, r.out) for r in committing]
                bad_done.append(f"{key} commit_id {row.commit_id} runs at claim: {seen}")
        elif row.failed_times >= max_failed_times:
            failed_why["max_failed_times"] += 1
        elif key[0] == "manual" and any(r.out == "failed" for r in committing):
            failed_why["manual_commit"] += 1
        else:
            bad_failed.append(f"{key} failed_times {row.failed_times}")
    res.fail("done jobs whose committing run did not complete successfully", bad_done)
    res.fail("failed jobs neither past max_failed_times nor failed by their handler", bad_failed)
    fig["failed_by"] = dict(failed_why)
    fig["stale_commits_taken"] = len(bad_done) + len(bad_failed)

    # Figures: duplicates (runs beyond the first, and beyond the planned retries) and
    # how the workload's kinds ended.
    beyond_first = sum(len(rs) - 1 for rs in by_job.values())
    duplicates = 0
    for rs in by_job.values():
        planned = sum(1 for r in rs if r.out in PLANNED_FAILURES)
        duplicates += max(0, len(rs) - planned - 1)
    fig["beyond_first"] = beyond_first
    fig["duplicates"] = duplicates
    fig["runs_killed_or_frozen"] = sum(1 for r in runs if r.out is None)
    fig["stale_manual_commits_refused"] = sum(
        1 for rec in read_all(run_dir, "exec-*.jsonl") if rec["e"] == "stale"
    )
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for key, rs in by_job.items():
        final = rows.get(key)
        if final is not None:
            kinds[rs[0].kind][final.status] += 1
    fig["final_by_kind"] = {k: dict(v) for k, v in sorted(kinds.items())}
    fig["never_ran"] = dict(Counter(rows[k].status for k in rows if k not in by_job))

    # -- recovery after each fault ------------------------------------------------------
    fig["recovery"] = recovery(harness, by_job, runs, torn, acks)
    return res


def _first_start_after(rs: list[Run], t: float, other_than: int | None = None) -> float | None:
    for r in rs:
        if r.start >= t and r.pid != other_than:
            return r.start
    return None


def recovery(
    harness: list[dict[str, Any]],
    by_job: dict[Key, list[Run]],
    runs: list[Run],
    torn: list[dict[str, Any]],
    acks: list[tuple[int, float, Key]],
) -> dict[str, dict[str, Any]]:
    """Per fault kind: how many were injected and the worst recovery time (seconds).

    * worker_kill / worker_pause: until every job the worker held a claim on at the
      fault (running, prefetched, or awaiting its commit) had started again in another
      process;
    * redis_restart / redis_flushall / db_restart: until every job waiting (todo) just
      before the fault, and the first job acknowledged after it, had started (for
      restarts this includes the time the server was down);
    * producer_torn_push: until every job of the torn push had started;
    * producer_kill: until the restarted producer's next acknowledged push.
    """
    out: dict[str, dict[str, Any]] = {}
    by_pid: dict[int, list[Run]] = defaultdict(list)
    for r in runs:
        by_pid[r.pid].append(r)
    for rec in harness:
        if rec["e"] != "fault":
            continue
        kind = rec["kind"]
        slot = out.setdefault(kind, {"injected": 0, "skipped": 0, "max_recovery": None})
        if rec.get("skipped"):
            slot["skipped"] += 1
            continue
        slot["injected"] += 1
        t = rec["ts"]
        worst: float | None = None
        missing = 0
        if kind in ("worker_kill", "worker_pause"):
            # the jobs it held a claim on (running, prefetched, or awaiting their commit)
            pid = rec["pid"]
            held: set[Key] = {(k[0], k[1]) for k in rec.get("orphans", [])}
            held |= {
                r.key for r in by_pid.get(pid, []) if r.start <= t and (r.end is None or r.end > t)
            }
            for key in held:
                nxt = _first_start_after(by_job.get(key, []), t, other_than=pid)
                if nxt is None:
                    missing += 1
                else:
                    worst = max(worst or 0.0, nxt - t)
            slot.setdefault("orphans", 0)
            slot["orphans"] += len(held)
        elif kind in ("redis_restart", "redis_flushall", "db_restart"):
            watch: list[Key] = [(k[0], k[1]) for k in rec.get("waiting", [])]
            watch += [key for _, ts, key in acks if ts >= t][:1]
            for key in watch:
                nxt = _first_start_after(by_job.get(key, []), rec["sampled"])
                if nxt is None:
                    missing += 1
                else:
                    worst = max(worst or 0.0, nxt - t)
            slot.setdefault("waiting", 0)
            slot["waiting"] += len(rec.get("waiting", []))
            if kind != "redis_flushall":
                slot["longest_outage"] = max(slot.get("longest_outage", 0.0), rec["length"])
        elif kind == "producer_torn_push":
            mine = [x for x in torn if x["index"] == rec["index"] and x["ts"] >= t]
            if mine:
                x = min(mine, key=lambda x: x["ts"])
                for job in x["ids"]:
                    nxt = _first_start_after(by_job.get((x["task"], job), []), x["ts"])
                    if nxt is None:
                        missing += 1
                    else:
                        worst = max(worst or 0.0, nxt - t)
        elif kind == "producer_kill":
            later = [ts for i, ts, _ in acks if i == rec["index"] and ts > t]
            if later:
                worst = min(later) - t
        if missing:
            slot["not_rerun"] = slot.get("not_rerun", 0) + missing
        if worst is not None:
            slot["max_recovery"] = max(slot["max_recovery"] or 0.0, round(worst, 2))
    return out
