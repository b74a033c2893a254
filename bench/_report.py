"""RESULTS.md and results.png from the measurements of one run."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from _common import REPO_DIR, Result, Settings, StepResult
from _systems import (
    AUG_BATCHUP,
    AUG_POOL,
    AUG_SERVICE_1,
    AUG_SERVICE_2,
    AUG_SERVICE_SYSTEMS,
    AUG_SYSTEMS,
    AUG_TORCH,
    BATCHUP,
    RAW_TCP,
    RAW_TCP_GATHER,
    RAW_TCP_GATHER_2,
    SERVICE_DROPIN,
    SERVICE_SHM,
    SERVICE_TCP,
    SYSTEMS,
    TORCH_SAMPLE_2,
    TORCH_SYSTEMS,
)

TABLE_HEADER = (
    "| workload | batch | system | samples/s | batches/s | GB/s | × batchup | spread (min–max samples/s) "
    "| epochs/run |"
)

KEY_WORKLOAD, KEY_BATCH = "cifar", 256
RAW_TARGET, TORCH_TARGET = 0.80, 4.0
SCALING_TARGET, WAIT_TARGET = 1.7, 0.10  #: service 2 vs 1 server workers; training-step wait share


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> list[tuple[str, str]]:
    import numpy
    import zmq

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        torch_threads = __import__("torch").get_num_threads()
    except ImportError:
        torch_threads = "n/a"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        if dirty:
            changed = [line.split(maxsplit=1)[-1] for line in dirty.splitlines()]
            commit += f" + uncommitted changes to {', '.join(changed[:8])}" + (
                " …" if len(changed) > 8 else ""
            )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return [
        ("CPU", f"{cpu}; {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable"),
        ("memory", mem),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        (
            "numpy / torch (threads) / pyzmq (libzmq) / msgpack",
            (
                f"{numpy.__version__} / {_version('torch')} ({torch_threads}) / {zmq.__version__} "
                f"({zmq.zmq_version()}) / {_version('msgpack')}"
            ),
        ),
        (
            "batchup / batchup-service / matplotlib",
            f"{_version('batchup')} / {_version('batchup-service')} / {_version('matplotlib')}",
        ),
        ("git", commit),
    ]


def _find(results: list[Result], system: str, workload: str, batch: int) -> Result | None:
    for r in results:
        if (r.system, r.workload, r.batch_size) == (system, workload, batch):
            return r
    return None


def key_targets(
    results: list[Result], workload: str = KEY_WORKLOAD, batch: int = KEY_BATCH
) -> list[dict[str, Any]]:
    svc = _find(results, SERVICE_TCP, workload, batch)
    if svc is None:
        return []
    rows = []

    def add(
        kind: str, label: str, other: Result | None, goal: float | None, mine: Result | None = None
    ) -> None:
        own = svc if mine is None else mine
        if other is None:
            return
        ratio = own.samples / other.samples
        verdict = "info" if goal is None else ("PASS" if ratio >= goal else "MISS")
        rows.append(
            {
                "kind": kind,
                "label": label,
                "service": own.samples,
                "other": other.samples,
                "other_name": other.system,
                "ratio": ratio,
                "goal": goal,
                "verdict": verdict,
            }
        )

    add(
        "raw",
        "service tcp vs raw pyzmq tcp, same bytes",
        _find(results, RAW_TCP, workload, batch),
        RAW_TARGET,
    )
    add(
        "raw-gather",
        "service tcp vs raw pyzmq tcp that also gathers each batch (the same work, no service)",
        _find(results, RAW_TCP_GATHER, workload, batch),
        None,
    )
    add(
        "raw-gather-2",
        "service tcp vs 2 raw pyzmq tcp senders that gather, each every other batch (the work of "
        "the service's 2 workers, no service: the bound for gather-then-send on this machine)",
        _find(results, RAW_TCP_GATHER_2, workload, batch),
        None,
    )
    add(
        "torch2",
        "service tcp vs DataLoader per-sample, 2 workers",
        _find(results, TORCH_SAMPLE_2, workload, batch),
        TORCH_TARGET,
    )
    torch_rows = [r for s in TORCH_SYSTEMS if (r := _find(results, s, workload, batch)) is not None]
    if torch_rows:
        best = max(torch_rows, key=lambda r: r.samples)
        add("best", f"service tcp vs DataLoader best config ({best.system})", best, None)
    add("batchup", "service tcp vs batchup 0.2.3 in-process", _find(results, BATCHUP, workload, batch), None)
    shm = _find(results, SERVICE_SHM, workload, batch)
    if shm is not None:
        batchup_row = _find(results, BATCHUP, workload, batch)
        add(
            "shm",
            "service shared memory vs batchup 0.2.3 in-process (issue 5: ≥ 1.0×)",
            batchup_row,
            1.0,
            shm,
        )
        add(
            "shm-torch",
            "service shared memory vs DataLoader per-sample, 2 workers (issue 5: ≥ 10×)",
            _find(results, TORCH_SAMPLE_2, workload, batch),
            10.0,
            shm,
        )
    dropin = _find(results, SERVICE_DROPIN, workload, batch)
    if dropin is not None:  # the "embedded local server" issue 5 names: the drop-in API's
        add(
            "dropin",
            "service drop-in on the embedded server vs batchup 0.2.3 in-process (issue 5: ≥ 1.0×)",
            _find(results, BATCHUP, workload, batch),
            1.0,
            dropin,
        )
        add(
            "dropin-torch",
            "service drop-in on the embedded server vs DataLoader per-sample, 2 workers (issue 5: ≥ 10×)",
            _find(results, TORCH_SAMPLE_2, workload, batch),
            10.0,
            dropin,
        )
    return rows


def aug_label(system: str, extras: dict[str, Any]) -> str:
    """An augmentation system's name, with where ``.map(fn)`` ran for the service's rows."""
    kind = AUG_SERVICE_SYSTEMS.get(system)
    where = (extras.get("map_where") or {}).get(kind or "")
    return f"{system} (map in {where['where']})" if where else system


def augmentation_targets(extras: dict[str, Any]) -> list[dict[str, Any]]:
    """2-worker ÷ 1-process throughput with the augmentation: the service and its competitors."""
    results: list[Result] = extras.get("augmentation") or []
    rows = []

    def add(label: str, mine: str, base: str, goal: float | None) -> None:
        own, other = _find(results, mine, "cifar", 256), _find(results, base, "cifar", 256)
        if own is None or other is None:
            return
        ratio = own.samples / other.samples
        verdict = "info" if goal is None else ("PASS" if ratio >= goal else "MISS")
        rows.append(
            {
                "label": label,
                "mine": aug_label(mine, extras),
                "own": own.samples,
                "base": aug_label(base, extras),
                "other": other.samples,
                "ratio": ratio,
                "goal": goal,
                "verdict": verdict,
            }
        )

    where = (extras.get("map_where") or {}).get("service")
    svc = f"service (map in {where['where']})" if where else "service"
    add(f"{svc}: 2 server workers ÷ 1 (issue 5: ≥ 1.7×)", AUG_SERVICE_2, AUG_SERVICE_1, SCALING_TARGET)
    add("batchup: WorkerProcessPool(2) ÷ in-process", AUG_POOL, AUG_BATCHUP, None)
    add("DataLoader: 2 workers ÷ batchup in-process (one process)", AUG_TORCH, AUG_BATCHUP, None)
    add(f"{svc}, 2 server workers ÷ batchup WorkerProcessPool(2)", AUG_SERVICE_2, AUG_POOL, None)
    add(f"{svc}, 2 server workers ÷ DataLoader 2 workers", AUG_SERVICE_2, AUG_TORCH, None)
    return rows


def _step(extras: dict[str, Any], system: str) -> StepResult | None:
    return next((r for r in extras.get("training_step") or [] if r.system == system), None)


def _fmt_goal(goal: float | None) -> str:
    if goal is None:
        return "—"
    return f"≥ {goal:.0%}" if goal < 1 else f"≥ {goal:g}×"


def write_markdown(
    path: str,
    command: str,
    settings: Settings,
    results: list[Result],
    extras: dict[str, Any],
    started: str,
    duration: float,
) -> None:
    L: list[str] = []
    L.append("# batchup-service benchmarks")
    L.append("")
    L.append(f"Command (run in `{os.getcwd()}`): `{command}`")
    L.append("")
    L.append(
        f"Run started {started}; took {duration:.0f} s"
        + (
            " — **quick smoke run: small arrays, one timed run, batch 256 only; figures are indicative only**"
            if settings.quick
            else ""
        )
        + "."
    )
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in machine_info():
        L.append(f"| {k} | {v} |")
    L.append("")

    L.append(
        f"## Key targets ({KEY_WORKLOAD.upper()}-shaped, batch {KEY_BATCH}, shuffled with a RandomState; "
        f"medians of {settings.runs} run(s))"
    )
    L.append("")
    L.append("| target | service samples/s | other samples/s | ratio | goal | verdict |")
    L.append("|---|---:|---:|---:|---|---|")
    for row in key_targets(results):
        L.append(
            f"| {row['label']} | {row['service']:,.0f} | {row['other']:,.0f} | "
            f"{row['ratio']:.2f}× | {_fmt_goal(row['goal'])} | **{row['verdict']}** |"
        )
    L.append("")
    aug_rows = augmentation_targets(extras)
    if aug_rows:
        L.append(
            f"Augmentation (crop + flip in `.map(augment)`, CIFAR-shaped, batch 256, medians of "
            f"{settings.aug_runs} run(s)): throughput with 2 workers ÷ throughput in one process."
        )
        L.append("")
        L.append("| target | samples/s | ÷ samples/s | ratio | goal | verdict |")
        L.append("|---|---:|---:|---:|---|---|")
        for row in aug_rows:
            L.append(
                f"| {row['label']} | {row['own']:,.0f} | {row['other']:,.0f} | "
                f"{row['ratio']:.2f}× | {_fmt_goal(row['goal'])} | **{row['verdict']}** |"
            )
        L.append("")
    svc_step = _step(extras, AUG_SERVICE_2)
    if svc_step is not None:
        verdict = "PASS" if svc_step.wait < WAIT_TARGET else "MISS"
        others = ", ".join(
            f"{r.system.split(', .map')[0]} {r.wait:.0%}"
            for r in extras.get("training_step") or []
            if r.system != AUG_SERVICE_2
        )
        L.append(
            f"Emulated training step ({settings.step_seconds * 1e3:g} ms per batch, augmentation): "
            f"{aug_label(AUG_SERVICE_2, extras)} waits for data **{svc_step.wait:.1%}** of the time "
            f"(goal < {WAIT_TARGET:.0%}: **{verdict}**); {others}."
        )
        L.append("")
    L.append(
        "Same comparison at every batch size (service tcp ÷ other, medians; *other load* = CPU share "
        "taken by processes outside this benchmark while that cell ran):"
    )
    L.append("")
    L.append(
        "| workload | batch | ÷ raw tcp | ÷ raw tcp + gather | ÷ 2 raw senders + gather "
        "| ÷ DataLoader per-sample 2w "
        "| ÷ DataLoader best (which) | ÷ batchup | other load |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    cores = len(os.sched_getaffinity(0))
    loads = {sec["name"]: sec for sec in extras.get("load") or []}
    for w in settings.workloads:
        for bs in settings.batch_sizes:
            kinds = {r["kind"]: r for r in key_targets(results, w.name, bs)}
            if not kinds:
                continue
            cells = [
                f"{kinds[k]['ratio']:.2f}×" if k in kinds else "—"
                for k in ("raw", "raw-gather", "raw-gather-2", "torch2")
            ]
            best = kinds.get("best")
            cells.append(
                f"{best['ratio']:.2f}× ({best['other_name'].replace('DataLoader ', '')})" if best else "—"
            )
            cells.append(f"{kinds['batchup']['ratio']:.2f}×" if "batchup" in kinds else "—")
            sec = loads.get(f"throughput {w.name} batch {bs}")
            cells.append(f"{sec['foreign'] / (sec['wall'] * cores):.0%}" if sec and sec["wall"] > 0 else "—")
            L.append(f"| {w.name} | {bs} | " + " | ".join(cells) + " |")
    L.append("")

    L.append("## Throughput")
    L.append("")
    L.append(
        "Medians over the timed runs; × batchup is relative to batchup 0.2.3's in-process iterator "
        "on the same workload and batch size in this run. GB/s counts X and y bytes delivered."
    )
    L.append("")
    for w in settings.workloads:
        L.append(f"- **{w.name}**: {w.label}, {w.rows * w.row_bytes / 1e6:,.0f} MB per epoch")
    L.append("")
    L.append(TABLE_HEADER)
    L.append("|---|---:|---|---:|---:|---:|---:|---|---:|")
    for w in settings.workloads:
        for bs in settings.batch_sizes:
            base = _find(results, BATCHUP, w.name, bs)
            for system in SYSTEMS:
                r = _find(results, system, w.name, bs)
                if r is None:
                    continue
                ratio = f"{r.samples / base.samples:.2f}" if base else "—"
                spread = f"{min(r.samples_per_s):,.0f}–{max(r.samples_per_s):,.0f}"
                name = f"**{system}**" if system == SERVICE_TCP else system
                L.append(
                    f"| {w.name} | {bs} | {name} | {r.samples:,.0f} | {r.batches:,.0f} | {r.gbytes:.2f} | "
                    f"{ratio} | {spread} | {r.epochs_per_run} |"
                )
    L.append("")

    fanin: list[Result] = extras.get("fanin") or []
    if len(fanin) in (3, 6):
        L.append(
            "## Several servers feeding one trainer (augmentation, CIFAR-shaped, batch 256, servers on tcp)"
        )
        L.append("")
        L.append(
            "Each server runs its router and one worker pinned to one core (`taskset -c 0`, `taskset -c 1`); "
            "the trainer is not pinned. One server alone against both feeding one stream "
            f"(`connect([a, b])`), medians of {len(fanin[0].samples_per_s)} run(s). Batches come through "
            "shared memory (the default with servers on the trainer's host) and, forced with "
            "`shared_memory_batches = False`, over the tcp socket (as from servers on other hosts). "
            "The *bound* rows run the same two servers, each feeding its own client process "
            "(`bench/_client_proc.py`, unpinned): no merging, the same trainer-side work per batch on "
            "the same two cores, so the most any fan-in could reach on this machine:"
        )
        L.append("")
        L.append("| system | samples/s | batches/s | spread (min–max samples/s) |")
        L.append("|---|---:|---:|---|")
        for r in fanin:
            spread = f"{min(r.samples_per_s):,.0f}–{max(r.samples_per_s):,.0f}"
            L.append(f"| {r.system} | {r.samples:,.0f} | {r.batches:,.0f} | {spread} |")
        L.append("")
        for one, two, pair in zip(fanin[0::3], fanin[1::3], fanin[2::3]):
            ratio = two.samples / one.samples if one.samples else float("nan")
            bound = pair.samples / one.samples if one.samples else float("nan")
            verdict = "PASS" if ratio >= 1.8 else "MISS"
            transport = one.system.rsplit(", ", 1)[-1]
            L.append(
                f"- {transport}: two servers ÷ one **{ratio:.2f}×** (issue 8 goal ≥ 1.8×: **{verdict}**); "
                f"the bound, two servers each feeding its own client ÷ one: {bound:.2f}×; fan-in ÷ "
                f"bound {two.samples / pair.samples:.2f}×"
            )
        L.append("")

    aug: list[Result] = extras.get("augmentation") or []
    if aug:
        cal = extras.get("augment") or {}
        L.append("## Augmentation (CIFAR-shaped, batch 256, shuffled)")
        L.append("")
        L.append(
            f"`bench/_augment.py:augment(X, y)`: random crop of the 4-pixel zero-padded image plus random "
            f"horizontal flip, one vectorised numpy gather per batch, drawing from the global `np.random`. "
            f"Calibration in the benchmark process: **{cal.get('median_ms', float('nan')):.2f} ms** per batch "
            f"of {cal.get('batch', 256)} (median; best {cal.get('min_ms', float('nan')):.2f} ms)."
        )
        L.append("")
        for kind, info in (extras.get("map_where") or {}).items():
            name = "service (`client.source(name).map(fn)`)" if kind == "service" else "drop-in (`.map(fn)`)"
            L.append(
                f"- where `.map(fn)` ran, {name}: **{info['where']}** (a probe map function returned "
                f"pid(s) {info['pids']}; the benchmark's pid is {info['bench_pid']})."
            )
        L.append("")
        L.append(TABLE_HEADER.replace("× batchup", "× batchup .map"))
        L.append("|---|---:|---|---:|---:|---:|---:|---|---:|")
        base = _find(aug, AUG_BATCHUP, "cifar", 256)
        for system in AUG_SYSTEMS:
            r = _find(aug, system, "cifar", 256)
            if r is None:
                continue
            ratio = f"{r.samples / base.samples:.2f}" if base else "—"
            spread = f"{min(r.samples_per_s):,.0f}–{max(r.samples_per_s):,.0f}"
            L.append(
                f"| cifar | 256 | {aug_label(system, extras)} | {r.samples:,.0f} | {r.batches:,.0f} | "
                f"{r.gbytes:.2f} | {ratio} | {spread} | {r.epochs_per_run} |"
            )
        L.append("")
    steps: list[StepResult] = extras.get("training_step") or []
    if steps:
        L.append(
            f"## Emulated training step (augmentation, batch 256, {settings.step_seconds * 1e3:g} ms `time.sleep` "
            "per batch)"
        )
        L.append("")
        L.append(
            f"The consumer sleeps {settings.step_seconds * 1e3:g} ms after receiving each batch. Over one epoch "
            f"after {settings.step_warmup} warm-up batches: share of the wall time spent waiting in `next()` "
            f"for data, and batches/s (a consumer that never waits reaches {1 / settings.step_seconds:,.0f}/s "
            f"minus loop overhead). Medians of {settings.step_runs} epoch(s) per system, interleaved."
        )
        L.append("")
        L.append("| system | waiting for data | spread | batches/s | timed batches per epoch |")
        L.append("|---|---:|---|---:|---:|")
        for r in steps:
            L.append(
                f"| {aug_label(r.system, extras)} | {r.wait:.1%} | {min(r.wait_fractions):.1%}–"
                f"{max(r.wait_fractions):.1%} | {r.batches_rate:,.0f} | {r.batches} |"
            )
        L.append("")

    L.append("## Start-up and latency")
    L.append("")
    construct = extras.get("pool_construct") or {}
    pool_starts = extras.get("pool_startup") or []
    if construct or pool_starts:
        made = ", ".join(
            f"{'WorkerThreadPool(2)' if name == 'thread' else 'WorkerProcessPool(2)'} ({name}) "
            f"{secs * 1e3:.0f} ms"
            for name, secs in construct.items()
        )
        L.append(
            f"- **batchup worker pools**: constructors {made}. A process pool's work starts later: the first "
            "`batch_iterator()` pickles the data source into the pool's `SyncManager`, and every worker loads it "
            "from there before its first batch (a thread pool shares it):"
        )
        L.append("")
        L.append("  | system | workload | batch | `batch_iterator()` → first batch | first epoch |")
        L.append("  |---|---|---:|---:|---:|")
        for row in pool_starts:
            L.append(
                f"  | {row['system']} | {row['workload']} | {row['batch']} | {row['first_batch_s']:.2f} s | "
                f"{row['epoch_s']:.2f} s |"
            )
        L.append("")
    lat = extras.get("latency")
    if lat:
        L.append(
            f"- **connect → first batch** (warm named source `{lat['source_name']}`, tcp, batch {lat['batch']}, "
            f"shuffled): median {lat['total_median'] * 1e3:.1f} ms, best {lat['total_min'] * 1e3:.1f} ms over "
            f"{lat['repeats']} tries — `connect()` {lat['connect'] * 1e3:.1f} ms, `source()` "
            f"{lat['source'] * 1e3:.1f} ms, `batch_iterator()` to first batch {lat['first_batch'] * 1e3:.1f} ms "
            "(medians)."
        )
    emb = extras.get("embedded")
    if emb:
        L.append(
            f"- **embedded server start** (`batchup_client.connect()` with no address, until it returns): "
            f"median {emb['start_median'] * 1e3:.0f} ms, best {emb['start_min'] * 1e3:.0f} ms over "
            f"{emb['repeats']} tries; `close()` {emb['close_median'] * 1e3:.0f} ms."
        )
    drop = extras.get("dropin")
    if drop:
        ship = ", ".join(f"{k} {v:.2f} s" for k, v in drop["ship"].items())
        L.append(
            f"- **drop-in first use**: `default_client()` (starts the embedded server) "
            f"{drop['default_client_s'] * 1e3:.0f} ms; first `batch_iterator()` to first batch, which hashes "
            f"the arrays and hands them to the server through shared memory: {ship}. Excluded from the "
            "drop-in throughput rows (later epochs only re-check a strided sample of each array)."
        )
    starts = extras.get("torch_startup") or []
    if starts:
        L.append(
            "- **DataLoader worker start-up** (2 forked persistent workers; first epoch, `iter()` to first "
            "batch; excluded from throughput, which times later epochs):"
        )
        L.append("")
        L.append("  | system | workload | batch | first batch |")
        L.append("  |---|---|---:|---:|")
        for s in starts:
            L.append(
                f"  | {s['system']} | {s['workload']} | {s['batch']} | {s['first_batch_s'] * 1e3:.0f} ms |"
            )
    L.append("")

    conc = extras.get("concurrency")
    if conc:
        cw = extras["concurrency_workload"]
        L.append(
            f"## Concurrent clients (one tcp server, 2 workers; {cw[0]}, batch {cw[1]}, shuffled; "
            f"{settings.concurrency_epochs} epoch(s) per client per run, client processes released together)"
        )
        L.append("")
        L.append("| clients | aggregate samples/s | per-client samples/s | aggregate × 1 client |")
        L.append("|---:|---:|---:|---:|")
        one = conc[0]["aggregate"]
        for row in conc:
            L.append(
                f"| {row['clients']} | {row['aggregate']:,.0f} | {row['per_client']:,.0f} | "
                f"{row['aggregate'] / one:.2f}× |"
            )
        L.append("")

    load = extras.get("load") or []
    if load:
        cores = len(os.sched_getaffinity(0))
        L.append("## Background load during the run")
        L.append("")
        L.append(
            "CPU time used by processes *outside* this benchmark's process tree (other jobs on the machine), "
            f"per section, out of {cores} cores × wall time. High values mean the figures of that section "
            "are depressed by contention."
        )
        L.append("")
        L.append("| section | wall s | benchmark CPU s | other CPU s | other load |")
        L.append("|---|---:|---:|---:|---:|")
        for sec in load:
            share = sec["foreign"] / (sec["wall"] * cores) if sec["wall"] > 0 else 0.0
            L.append(
                f"| {sec['name']} | {sec['wall']:.1f} | {sec['own']:.1f} | {sec['foreign']:.1f} | {share:.0%} |"
            )
        L.append("")

    L.append("## Method")
    L.append("")
    L.append(
        "- Data: random float32 X and int32 y from `np.random.RandomState(0)`, written once per run as `.npy` "
        "files in a temporary folder and shared by every system: the in-process systems load them into memory, "
        "the service's server memory-maps them (`[sources.NAME] npy = {X = ..., y = ...}`), the drop-in ships the "
        "in-memory arrays to its embedded server."
    )
    L.append(
        "- Each cell (workload × batch size) runs all systems side by side: every system first does warm-up "
        f"epochs, at least 2 and for ≳{settings.warmup_seconds:g} s (past one-off costs such as a new shared-memory "
        f"pool's first page faults; the last one picks how many epochs, 1–{settings.max_epochs_per_run}, make one "
        f"timed run last ≳{settings.min_run_seconds:g} s; they draw from one `RandomState`, as a run does), then come {settings.runs} round(s) in which every system does one timed "
        "run, in an order rotated from round to round, so background load and drift hit all systems alike. The "
        "epochs of a run draw successive permutations from one fresh `RandomState`. Figures are medians over "
        "runs; the spread column shows min–max. Every epoch iterates all batches (the last one short) and "
        "touches only `len(X)`."
    )
    L.append("- batchup 0.2.3: `ArrayDataSource([X, y], repeats=1).batch_iterator(bs, shuffle=rng)`.")
    L.append(
        "- batchup 0.2.3 worker pools: `WorkerThreadPool(processes=2)` / `WorkerProcessPool(processes=2)`, "
        f"`pool.parallel_data_source(ArrayDataSource([X, y]), batch_buffer_size={settings.pool_buffer})` (batchup's "
        "default buffer), one source per workload reused across batch sizes, iterated as above. The pools are "
        "made before any server or client (the process pool forks) and shut down after the throughput cells: "
        "batchup has no close API, so the bench terminates and joins the internal `ThreadPool` / joblib "
        "`MemmappingPool`, shuts the `SyncManager` down and stops joblib's resource tracker."
    )
    L.append(
        "- Augmentation: batchup `ArrayDataSource([X, y]).map(augment)` in process and through its own "
        f"`WorkerProcessPool(2)` (`parallel_data_source(..., batch_buffer_size={settings.pool_buffer})`; batchup "
        "runs `MapDataSource.fn` in the workers); DataLoader whole-batch (as above) with `augment` applied in "
        "`__getitem__`, 2 forked persistent workers (torch seeds each worker's `np.random`); the service: "
        "`batchup_client.connect(addr).source('cifar').map(augment)` on tcp servers started with `--workers 1` "
        "and `--workers 2` (default client settings: shared-memory batches on this host), and the drop-in "
        "`ArrayDataSource([X, y]).map(augment)` on the embedded server. Where `.map` ran is probed with a map "
        "function that returns its pid in place of the labels. Timed like the throughput cells, in "
        f"{settings.aug_runs} rotated rounds of runs of whole epochs lasting ≳{settings.aug_min_run_seconds:g} s "
        "(so do the fan-in cells)."
    )
    L.append(
        "- DataLoader (CPU): *per-sample* = `TensorDataset` + `batch_size=bs, shuffle=True` (torch's own "
        "seeded generator draws the permutation; default collate stacks samples); *whole-batch* = a sampler "
        "yielding batchup's `RandomState` permutation cut into index arrays, `batch_size=None`, and a dataset "
        "whose `__getitem__` gathers an index array with numpy. With 2 workers: `persistent_workers=True`, fork "
        "context; worker start-up is reported above, not in throughput. All configs ran at every batch size."
    )
    L.append(
        "- Service: `python3 -m batchup_server --bind tcp://127.0.0.1:0` (or `ipc://…`) `--config server.toml "
        "--workers 2 --no-demo`; `batchup_client.connect(addr).source(name).batch_iterator(bs, shuffle=rng)`, a new "
        "stream per epoch (stream set-up included in throughput; from a run's second epoch on, the stream opened "
        "ahead during the previous one, protocol 1.6). Drop-in: "
        "`batchup_client.data_source.ArrayDataSource([X, y])` on `batchup_client.default_client()` (embedded "
        "server, `$BATCHUP_SERVER` unset)."
    )
    L.append(
        "- Raw transport: a child process PUSHes pre-built buffers of the same sizes as the service's X and y "
        "frames (2 frames, `copy=False`, HWM 32) to a PULL in the benchmark process, which views them with "
        "`np.frombuffer`; no gather, no shuffle, no header — the ceiling for moving those bytes. "
        "*Gathering each batch*: the same tcp peer first draws a permutation and gathers each batch from the "
        "memory-mapped `.npy` files the servers read (`np.take` into a new array, glibc's heap tuned as in the "
        "service's workers), then sends it: the work of the service's socket path without the service, in one "
        "process and one batch at a time (the service spreads its gathers over 2 workers)."
    )
    L.append(
        "- One process tree (`bench/run.py` and its children): a tcp and an ipc server (2 workers each), the "
        "drop-in's embedded server and the two raw PUSH processes stay up for the whole run and idle while "
        "other systems are timed; DataLoaders are made per cell. Connect latency, concurrency and embedded "
        "start are measured after the throughput cells. The machine has 2 cores: server router + 2 workers + "
        "client share them, as DataLoader's main process and 2 workers do. After every timed run the service's "
        "clients close the streams they opened ahead for a next epoch (a loop's last epoch leaves one) and the "
        "servers are waited for until idle, so that no system's run pays for another's leftover work."
    )
    if extras.get("leftovers"):
        L.append(f"- **Cleanup warning**: folders possibly left behind: {sorted(extras['leftovers'])}")
    if extras.get("leftover_children"):
        L.append(f"- **Cleanup warning**: child processes still running: {extras['leftover_children']}")
    if not extras.get("leftovers") and not extras.get("leftover_children"):
        L.append(
            "- Cleanup check: no new `batchup-*` folder (nor joblib pool folder) left in /dev/shm or the temp "
            "folder; no child process left running."
        )
    L.append("")
    L.append("![samples/s per system and workload](results.png)")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def _barh_labelled(ax: Any, labels: list[str], values: list[float], colors: list[Any], fmt: str) -> None:
    """Horizontal bars with each label written inside the plot, above its bar (long names fit)."""
    import numpy as np

    y = np.arange(len(values))
    ax.barh(y, values, height=0.5, color=colors)
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        ax.text(0, i - 0.3, f"{label}: {value:{fmt}}", va="bottom", ha="left", fontsize=7.5)
    ax.set_yticks([])
    ax.set_ylim(len(values) - 0.5, -0.9)


def write_plot(
    path: str, settings: Settings, results: list[Result], subtitle: str, extras: dict[str, Any] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    extras = extras or {}
    aug: list[Result] = extras.get("augmentation") or []
    steps: list[StepResult] = extras.get("training_step") or []
    systems = [s for s in SYSTEMS if any(r.system == s for r in results)]
    n_cols = len(settings.workloads)
    second = bool(aug or steps)
    heights = [5.0, 1.2] + ([4.8] if second else [])
    fig = plt.figure(figsize=(7 * max(2, n_cols), sum(heights) + 0.8))
    grid = fig.add_gridspec(
        len(heights),
        max(2, n_cols),
        height_ratios=heights,
        hspace=0.35,
        wspace=0.15,
        left=0.06,
        right=0.98,
        top=1 - 0.9 / (sum(heights) + 0.8),
        bottom=0.05,
    )
    axes = [fig.add_subplot(grid[0, i]) for i in range(n_cols)]
    for ax in axes[1:]:
        ax.sharey(axes[0])
    colors = plt.get_cmap("tab20")
    width = 0.8 / max(1, len(systems))
    for ax, w in zip(axes, settings.workloads, strict=True):
        x = np.arange(len(settings.batch_sizes))
        for i, system in enumerate(systems):
            vals = [(_find(results, system, w.name, bs) or None) for bs in settings.batch_sizes]
            ax.bar(
                x - 0.4 + (i + 0.5) * width,
                [v.samples if v else 0 for v in vals],
                width,
                label=system,
                color=colors(i % 20),
                edgecolor="black" if system == SERVICE_TCP else None,
                linewidth=1.2,
            )
        ax.set_xticks(x, [f"batch {bs}" for bs in settings.batch_sizes])
        ax.set_yscale("log")
        ax.set_title(w.label, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("samples/s (median, log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax = fig.add_subplot(grid[1, :])
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", ncol=3, fontsize=8, frameon=False)
    if second:
        rows_aug = [r for s in AUG_SYSTEMS if (r := _find(aug, s, "cifar", 256)) is not None]
        if rows_aug:
            ax = fig.add_subplot(grid[2, 0])
            _barh_labelled(
                ax,
                [aug_label(r.system, extras) for r in rows_aug],
                [r.samples for r in rows_aug],
                [colors((2 * i + 1) % 20) for i in range(len(rows_aug))],
                ",.0f",
            )
            ax.set_xlabel("samples/s (median)")
            cal = extras.get("augment") or {}
            ax.set_title(
                f"augmentation: crop + flip ({cal.get('median_ms', float('nan')):.1f} ms/batch in one process), "
                "CIFAR-shaped, batch 256",
                fontsize=10,
            )
            ax.grid(axis="x", alpha=0.3)
        if steps:
            ax = fig.add_subplot(grid[2, 1])
            _barh_labelled(
                ax,
                [f"{aug_label(r.system, extras)}, % of the time waiting" for r in steps],
                [100 * r.wait for r in steps],
                [colors((2 * i + 1) % 20) for i in range(len(steps))],
                ".1f",
            )
            ax.axvline(
                100 * WAIT_TARGET, color="red", linestyle="--", linewidth=1, label="goal for the service"
            )
            ax.set_xlim(0, 100)
            ax.set_xlabel("% of wall time waiting in next() for data (median)")
            ax.set_title(
                f"emulated training step ({settings.step_seconds * 1e3:g} ms sleep per batch), augmentation",
                fontsize=10,
            )
            ax.legend(fontsize=7, loc="lower right")
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"batchup-service benchmarks — {subtitle}", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
