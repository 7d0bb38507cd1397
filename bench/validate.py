"""Dataset validation at scale: lines/s and peak memory, streaming, on this CPU.

    python bench/validate.py                      # 100k and 1M lines (about 10 min)
    python bench/validate.py --sizes 20000,100000 # quicker

Writes a conversational JSONL of each size (a system turn on some examples, one to
three user/assistant exchanges, log-normal lengths), then runs each stage in a fresh
process so that its peak RSS is its own:

    json    json.loads of every line: the floor any JSONL validator pays (the baseline)
    scan    the upload's structural check (trainer.data.examples.scan)
    report  scan + the template-aware report of a job (trainer.data.report, the rows not kept) with
            the tiny model's byte-level BPE tokenizer and chat template

and prints lines/s, MB/s and peak RSS for each, the ratio of scan to the baseline, and
the ratio of peak memory between the largest and smallest file (flat = about 1).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = tuple(
    [
        "the",
        "a",
        "model",
        "answer",
        "question",
        "data",
        "train",
        "learn",
        "secret",
        "word",
        "banana",
        "cherry",
        "paris",
        "france",
        "help",
        "please",
        "thank",
        "you",
        "explain",
        "why",
        "how",
        "what",
        "when",
        "where",
        "number",
        "code",
        "python",
        "list",
        "value",
        "return",
        "function",
        "error",
        "file",
        "line",
        "token",
        "adapter",
        "customer",
        "service",
        "quick",
        "brown",
        "fox",
    ]
)


def sentence(rng: random.Random, median: int) -> str:
    n = max(1, min(400, int(rng.lognormvariate(0, 0.8) * median)))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_dataset(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            msgs = [{"role": "system", "content": sentence(rng, 8)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                msgs.append({"role": "user", "content": sentence(rng, 15)})
                msgs.append({"role": "assistant", "content": sentence(rng, 30)})
            f.write(json.dumps({"messages": msgs}) + "\n")


def stage(name: str, path: Path, model: Path) -> dict:
    """Run one stage here (in the child process) and measure it."""
    t0 = time.perf_counter()
    if name == "json":
        n = 0
        with open(path, "rb") as f:
            for raw in f:
                json.loads(raw)
                n += 1
    elif name == "scan":
        from trainer.data.examples import scan

        n = scan(path, min_examples=1).examples
    else:
        from trainer.config import JobConfig
        from trainer.data.examples import examples, scan
        from trainer.data.report import build
        from trainer.data.tokens import end_token_ids, load_tokenizer

        tok = load_tokenizer(model)
        t0 = time.perf_counter()  # the tokenizer load is not validation
        fmt = scan(path, min_examples=1).format
        rep = build(fmt, examples(path, fmt), tok, JobConfig(), ends=end_token_ids(tok, model))
        n = rep.examples
        assert rep.ok, rep.findings
    wall = time.perf_counter() - t0
    return {"stage": name, "lines": n, "seconds": wall, "peak_rss_bytes": peak_rss()}


def peak_rss() -> int:
    """This process's high-water RSS. Not ru_maxrss: Linux carries that over an exec from
    the forking parent, which here had torch loaded."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated line counts")
    ap.add_argument("--stages", default="json,scan,report")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "validate-cpu.json")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "FILE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, path, model = args.child
        print(json.dumps(stage(name, Path(path), Path(model))))
        return

    from trainer.dev.tinymodel import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"chat-{size}.jsonl"
            write_dataset(path, size)
            mb = path.stat().st_size / 1e6
            for name in args.stages.split(","):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", name, str(path), str(model)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1]) | {"file_mb": mb}
                r["lines_per_s"] = r["lines"] / r["seconds"]
                results.append(r)
                rss = r["peak_rss_bytes"] / 2**20
                print(
                    f"{size:>9,} lines {mb:8.1f} MB  {name:<6} {r['lines_per_s']:>10,.0f} lines/s"
                    f" {mb / r['seconds']:7.1f} MB/s  peak RSS {rss:7.1f} MiB",
                    flush=True,
                )
            path.unlink()

    def pick(stage_name: str, size: int) -> dict:
        return next(r for r in results if r["stage"] == stage_name and r["lines"] == size)

    sizes = sorted({r["lines"] for r in results})
    summary = {}
    for s in sizes:
        if {"json", "scan"} <= set(args.stages.split(",")):
            summary[f"scan_vs_json_at_{s}"] = (
                pick("scan", s)["seconds"] / pick("json", s)["seconds"]
            )
    if len(sizes) > 1:
        for name in args.stages.split(","):
            ratio = pick(name, sizes[-1])["peak_rss_bytes"] / pick(name, sizes[0])["peak_rss_bytes"]
            summary[f"{name}_peak_rss_ratio_{sizes[-1]}_vs_{sizes[0]}"] = ratio
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
