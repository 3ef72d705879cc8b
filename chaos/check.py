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
#: Tasks whose zombie policy closes a job after one attempt (max_failed_times 1).
ZOMBIE_TASKS = {"z-todo": "todo", "z-done": "done", "z-failed": "failed"}
#: Clock rounding allowed between a producer's wall time and a start record.
EPSILON = 0.002


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
    execs: dict[int, list[float]] = defaultdict(list)  # a recycle re-executes the process
    for rec in read_all(run_dir, "exec-*.jsonl"):
        if rec["e"] == "recycle":
            execs[rec["pid"]].append(rec["ts"])
        if "task" not in rec:  # fork, recycle
            continue
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
        if run.end is None:  # it lasted until its process died or re-executed itself
            later = [t for t in execs.get(run.pid, []) if t >= run.start]
            run.end = min(later) if later else deaths.get(run.pid)
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
    index_of: dict[int, int] = {}  # worker pid -> worker index
    skewed: dict[int, float] = {}  # worker pid -> its clock's offset
    cut_off: dict[int, list[tuple[float, float]]] = defaultdict(list)  # index -> db partitions
    for rec in harness:
        if rec["e"] == "exit":
            deaths[rec["pid"]] = rec["ts"]
        elif rec["e"] == "paused":
            paused[rec["pid"]].append((rec["since"], rec["until"]))
        elif rec["e"] == "db_down":
            outages.append((rec["since"], rec["until"]))
        elif rec["e"] == "spawn" and rec.get("role") == "worker":
            index_of[rec["pid"]] = rec["index"]
            if rec.get("skew"):
                skewed[rec["pid"]] = rec["skew"]
        elif rec["e"] == "partitioned" and rec["what"] == "db":
            cut_off[rec["index"]].append((rec["since"], rec["until"]))
    faults = sorted(
        (rec["ts"], rec["kind"], n)
        for n, rec in enumerate(harness)
        if rec["e"] == "fault" and not rec.get("skipped")
    )
    blame: Counter[int] = Counter()  # fault record -> violations that followed it

    def blamed(ts: float) -> None:
        """Charge a violation at wall time ``ts`` to the latest fault before it."""
        before = [f for f in faults if f[0] <= ts]
        if before:
            blame[before[-1][2]] += 1

    # -- producers: acknowledged ids ----------------------------------------------------
    acked: set[Key] = set()
    torn: list[dict[str, Any]] = []
    acks: list[tuple[int, float, Key]] = []  # (producer index, wall time, first job)
    not_before: dict[Key, float] = {}  # the earliest time a job may start (its run_at)
    savepoint_acks: list[tuple[float, Key]] = []
    push_errors: list[str] = []
    for path in sorted(run_dir.glob("ack-*.jsonl")):
        index = int(path.stem.split("-")[1])
        for rec in read(path):
            if rec["e"] == "ack":
                acked.update((rec["task"], i) for i in rec["ids"])
                acks.append((index, rec["ts"], (rec["task"], rec["ids"][0])))
                if "nb" in rec and "key" not in rec:  # a keyed push may return an old job
                    for i in rec["ids"]:
                        not_before.setdefault((rec["task"], i), rec["nb"])
                if rec.get("savepoint"):
                    savepoint_acks += [(rec["ts"], (rec["task"], i)) for i in rec["ids"]]
            elif rec["e"] == "torn":
                torn.append({**rec, "index": index})
            elif rec["e"] == "push_error":
                push_errors.append(f"producer {index}: {rec['what']}: {rec['error']}")
                blamed(rec["ts"])
    acks.sort(key=lambda a: a[1])
    fig["acknowledged"] = len(acked)
    fig["ledger_rows"] = len(rows)
    fig["unacknowledged_rows"] = len(set(rows) - acked)
    fig["by_task"] = dict(Counter(k[0] for k in rows))

    # Invariant 1: an id a producer got back is never lost ...
    lost = sorted(k for k in acked if k not in rows)
    res.fail("acknowledged jobs missing from the ledger (lost)", lost)
    fig["lost"] = len(lost)
    res.fail("pushes refused (large payloads near max_payload_bytes)", push_errors, limit=3)
    fig["push_errors"] = len(push_errors)
    # ... and invariant 4: every job (acknowledged or not) reached a terminal state.
    stuck = sorted((k, r.status) for k, r in rows.items() if r.status not in ("done", "failed"))
    res.fail("jobs not in a terminal state after the drain (stuck)", stuck)
    fig["stuck"] = len(stuck)
    fig["status"] = dict(Counter(r.status for r in rows.values()))

    # -- executions ---------------------------------------------------------------------
    runs, double = load_runs(run_dir, deaths)
    # A handler's forked child that ran jobs (meepo's loops) is reported below, apart:
    # its runs share the parent's claims and would blur the other checks.
    execs = list(read_all(run_dir, "exec-*.jsonl"))
    children = {rec["child"] for rec in execs if rec["e"] == "fork"}
    in_child = [f"{r.key}@{r.cid} in child {r.pid}" for r in runs if r.pid in children]
    started_keys = Counter[Key]()  # distinct claims that reached a handler, children too
    for key, _cid in {(r.key, r.cid) for r in runs}:
        started_keys[key] += 1
    runs = [r for r in runs if r.pid not in children]
    double = [d for d in double if not any(f" {c})" in d for c in children)]
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
    # A partition of the worker from the database excuses its runs like a pause does. A
    # skewed clock excuses nothing: every time comparison uses the database's clock.
    overlaps: list[str] = []
    skew_overlaps: list[str] = []
    excused = Counter[str]()
    for key, rs in by_job.items():
        for i, a in enumerate(rs):
            a_end = a.end if a.end is not None else math.inf
            for b in rs[i + 1 :]:
                if b.start >= a_end:
                    break
                if _intersects(a.start, a_end, paused.get(a.pid, [])):
                    excused["paused"] += 1
                elif _intersects(a.start, a_end, cut_off.get(index_of.get(a.pid, -1), [])):
                    excused["db_partition"] += 1
                elif _intersects(a.start, b.start, outages):
                    excused["db_outage"] += 1
                else:
                    what = (
                        f"{key}: pid {a.pid} cid {a.cid} [{a.start:.3f}, {a_end:.3f}] and "
                        f"pid {b.pid} cid {b.cid} from {b.start:.3f}"
                    )
                    blamed(b.start)
                    if a.pid in skewed or b.pid in skewed:
                        skew_overlaps.append(what)
                    else:
                        overlaps.append(what)
    res.fail("overlapping runs of one job (outside pauses, partitions and outages)", overlaps)
    res.fail("overlapping runs of one job involving the clock-skewed worker", skew_overlaps)
    fig["overlaps"] = len(overlaps) + len(skew_overlaps)
    fig["overlaps_under_skew"] = len(skew_overlaps)
    fig["overlaps_excused"] = dict(excused)

    # No job starts before its run_at (its push's wall time plus its delay).
    early: list[str] = []
    for key, nb in not_before.items():
        rs = by_job.get(key)
        if rs and rs[0].start < nb - EPSILON:
            r = rs[0]
            skew = f" (skewed {skewed[r.pid]:+g}s)" if r.pid in skewed else ""
            early.append(f"{key} started {nb - r.start:.2f}s early by pid {r.pid}{skew}")
            blamed(r.start)
    res.fail("jobs started before their run_at", early)
    fig["early_starts"] = len(early)
    fig["early_starts_under_skew"] = sum(1 for e in early if "skewed" in e)

    # Every job closed done/failed started at least once: by its handler's verdict or by
    # the zombie policy, which may only close (or charge) a job whose handler started.
    never = sorted(
        k for k, r in rows.items() if r.status in ("done", "failed") and not started_keys[k]
    )
    res.fail("jobs closed done/failed that never started", never)
    fig["closed_never_started"] = dict(Counter(f"{k[0]}:{rows[k].status}" for k in never))
    charged = [
        f"{k} failed_times {r.failed_times}, {started_keys[k]} starts"
        for k, r in rows.items()
        if r.failed_times > started_keys[k]
    ]
    res.fail("jobs charged more attempts than their handler started", charged)
    fig["charged_beyond_starts"] = len(charged)

    # A handler that forks: its child exits; it never runs meepo's loops (jobs).
    stuck_children = [
        f"{rec['child']} (parent {rec['parent']}"
        + (f", skewed {skewed[rec['parent']]:+g}s" if rec["parent"] in skewed else "")
        + (
            f", wchan {w.get('wchan')}, syscall {w.get('syscall', '').split(' ')[0]})"
            if (w := rec.get("where"))
            else ")"
        )
        for rec in execs
        if rec["e"] == "fork_stuck"
    ]
    res.fail("jobs run by a handler's forked child", in_child)
    res.fail("forked children that did not exit within 5 s (killed)", stuck_children)
    fig["forks"] = len(children)
    fig["runs_in_forked_children"] = len(in_child)

    # A manual commit in the handler works during a graceful stop (SIGTERM, a recycle).
    refused = [
        f"{(rec['task'], rec['job'])}@{rec['cid']}: {rec['error']} (stopping: {rec['stopping']})"
        for rec in execs
        if rec["e"] == "commit_error"
    ]
    for rec in execs:
        if rec["e"] == "commit_error":
            blamed(rec["ts"])
    res.fail("in-handler manual commits refused", refused)
    fig["manual_commits_refused"] = len(refused)

    # A push in a rolled-back savepoint does not hold back the outer, committed push.
    delays = [
        nxt - ts
        for ts, key in savepoint_acks
        if (nxt := _first_start_after(by_job.get(key, []), 0.0)) is not None
    ]
    fig["savepoint_jobs"] = len(savepoint_acks)
    fig["savepoint_worst_ack_to_start"] = round(max(delays), 2) if delays else None

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
        if key[0] in ZOMBIE_TASKS:  # closed by a handler, or by the zombie policy
            if row.status == "failed" and row.failed_times >= 1:
                failed_why["max_failed_times"] += 1
            elif row.status == "done" and any(r.out == "ok" for r in committing):
                pass
            elif row.status == "done" and key[0] == "z-done" and key in by_job:
                failed_why["done_by_zombie_policy"] += 1  # (not a failure: counted here)
            else:
                (bad_done if row.status == "done" else bad_failed).append(
                    f"{key} {row.status} failed_times {row.failed_times}"
                )
            continue
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
    fig["recovery"] = recovery(harness, by_job, runs, torn, acks, execs)
    # Per fault kind: how many of its faults were followed by no violation (before the
    # next fault), and the duplicate runs that followed it.
    dup_after: Counter[int] = Counter()
    for rs in by_job.values():
        planned = 0
        for r in rs:
            if r.out in PLANNED_FAILURES:
                planned += 1
        for r in rs[1 + planned :]:
            before = [f for f in faults if f[0] <= r.start]
            if before:
                dup_after[before[-1][2]] += 1
    for _ts, kind, n in faults:
        slot = fig["recovery"].setdefault(kind, {"injected": 0, "max_recovery": None})
        slot["survived"] = slot.get("survived", 0) + (0 if blame[n] else 1)
        slot["duplicates"] = slot.get("duplicates", 0) + dup_after[n]
        slot["violations_after"] = slot.get("violations_after", 0) + blame[n]
    if skewed:
        fig["recovery"]["clock_skew"] = {
            "injected": 1,
            "survived": 1 if not (skew_overlaps or fig["early_starts_under_skew"]) else 0,
            "duplicates": 0,
            "max_recovery": None,
            "runs": sum(1 for r in runs if r.pid in skewed),
            "offset": sorted(set(skewed.values())),
        }
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
    execs: list[dict[str, Any]] | None = None,
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
    for rs in by_pid.values():
        rs.sort(key=lambda r: r.start)
    spawns = [
        (rec["ts"], rec["index"], rec["pid"])
        for rec in harness
        if rec["e"] == "spawn" and rec.get("role") == "worker"
    ]
    recycles: dict[int, list[float]] = defaultdict(list)
    for rec in execs or []:
        if rec["e"] == "recycle":
            recycles[rec["pid"]].append(rec["ts"])
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
        if kind == "worker_sigterm":  # until the restarted worker runs a job
            later = [pid for ts, i, pid in spawns if i == rec["index"] and ts >= t]
            nxt = _first_start_after(by_pid.get(later[0], []), t) if later else None
            if nxt is None:
                missing += 1
            else:
                worst = nxt - t
        elif kind == "worker_recycle":  # until the re-executed worker runs a job
            done = [x for x in recycles.get(rec["pid"], []) if x >= t]
            nxt = _first_start_after(by_pid.get(rec["pid"], []), done[0]) if done else None
            if nxt is None:
                slot["not_recycled"] = slot.get("not_recycled", 0) + 1
            else:
                worst = nxt - t
        elif kind in ("worker_kill", "worker_pause", "db_partition"):
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
        elif kind in (
            "redis_restart",
            "redis_flushall",
            "db_restart",
            "redis_oom",
            "redis_readonly",
        ):
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
