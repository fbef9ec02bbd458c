"""One line per short run for docs/toy/experiments.md: wall time, mini-GenEval, final loss per scale.

    python tools/run_summary.py runs/base runs/t5l4 ...

The final loss is the mean of the last 10 logged training losses (bits, nats/bit), per scale.
"""
import json
import sys
from pathlib import Path


def summary(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("stage") == "infinity" and "per_scale" in r]
    done = next((r for r in rows if r.get("stage") == "done"), {})
    last = steps[-10:]
    per_scale = [sum(r["per_scale"][i] for r in last) / len(last) for i in range(len(last[0]["per_scale"]))]
    g = json.loads((run / "geneval.json").read_text())
    cats = " ".join(f"{k} {v:.3f}" for k, v in g["categories"].items() if k != "overall")
    seconds = done.get("seconds", {}).get("infinity", float("nan"))
    return (f"{run.name}: steps {steps[-1]['step'] + 1}, {seconds:.0f} s, overall {g['overall']:.3f} ({cats}), "
            f"final loss {' '.join(f'{v:.3f}' for v in per_scale)}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summary(Path(arg)))
