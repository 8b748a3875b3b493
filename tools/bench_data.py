"""Data pipeline costs: ``prepare-data`` tokenization throughput and the data loader's share of a step.

    python tools/bench_data.py [--max-mb 32] [--vocab-size 8192] [--steps 20] [--json out.json]

1. Corpus: the interpreter's standard library ``*.py`` files (local text, a few tens of MB),
   capped at ``--max-mb``; one document per file.
2. Tokenizer: a byte-level BPE trained on the first ``--train-mb`` of it (``train_bpe``).
3. ``prepare-data``'s core (``write_documents``: read, ``encode_batch``, EOS, write
   ``.bin`` + ``.idx``) twice, with ``tokenizers``' batch parallelism on (its Rust thread pool)
   and off (one thread): tokens/s and MB of text/s.
4. Loader share: the demo model (``configs/demo.yaml``, EP 1, one process, ``--threads``) trains
   ``--steps`` real steps (forward, backward, AdamW) on batches from ``TokenBatches``, once on the
   demo's own byte corpus and once on the indexed BPE dataset of step 3 (with and without
   ``data.document_mask``). The time of ``train_batch`` (+ the copy to the device) over the whole
   step is the loader's share; the target is under 1 %.

Prints a table and writes the numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_dist.config import load_config  # noqa: E402
from moe_dist.data.batches import TokenBatches  # noqa: E402
from moe_dist.data.corpus import load_corpus, stdlib_files  # noqa: E402
from moe_dist.data.documents import iter_documents, write_documents  # noqa: E402
from moe_dist.data.tokenizer import HFTokenizer, train_bpe  # noqa: E402
from moe_dist.models import build_model  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.step_hook import finish_step  # noqa: E402


def corpus_files(max_mb: float) -> list[Path]:
    files, total = [], 0
    for f in stdlib_files():
        if total >= max_mb * 1e6:
            break
        files.append(f)
        total += f.stat().st_size
    return files


def prepare(files: list[Path], tok_path: Path, prefix: Path, parallel: bool) -> dict:
    tok = HFTokenizer(tok_path, parallel=parallel)
    t0 = time.perf_counter()
    report = write_documents(iter_documents(files), tok, prefix, "bench")
    seconds = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in files) / 1e6
    return {
        "batch_parallel": parallel,
        "documents": report.documents,
        "tokens": report.tokens,
        "seconds": seconds,
        "tokens_per_s": report.tokens / seconds,
        "text_mb_per_s": mb / seconds,
    }


def loader_share(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    cfg = load_config(config, ["parallel.ep_size=1", *overrides])
    batches = TokenBatches(load_corpus(cfg.data), cfg.data, cfg.run.seed, cfg.model.vocab_size)
    groups = ParallelGroups.single()
    model = build_model(cfg.model, groups, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    data_s, step_s = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = batches.train_batch(step, 0, 0).to(device)
        t1 = time.perf_counter()
        logits, aux_loss, _ = model(batch.x_BS, batch.doc_BS)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.y_BS.flatten()) + aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        finish_step(model.moe_layers(), groups)
        t2 = time.perf_counter()
        if step >= warmup:
            data_s.append(t1 - t0)
            step_s.append(t2 - t0)
    data, total = statistics.median(data_s), statistics.median(step_s)
    return {
        "source": batches.source,
        "batch_ms": data * 1e3,
        "step_ms": total * 1e3,
        "share_pct": 100 * data / total,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--max-mb", type=float, default=32.0, help="corpus size cap, MB of text")
    p.add_argument("--train-mb", type=float, default=4.0, help="text the BPE is trained on")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_data.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = corpus_files(args.max_mb)
    mb = sum(f.stat().st_size for f in files) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tok.json"
        t0 = time.perf_counter()
        train_bpe((d.text for d in iter_documents(corpus_files(args.train_mb))), args.vocab_size, tok_path)
        train_s = time.perf_counter() - t0
        runs = [prepare(files, tok_path, Path(tmp) / f"ds{int(par)}", par) for par in (True, False)]
        prefix = Path(tmp) / "ds1"
        bpe = [
            "model.vocab_size=" + str(args.vocab_size),
            f"data.paths=[{prefix}]",
            f"data.tokenizer.path={tok_path}",
            "data.tokenizer.kind=hf",
        ]
        shares = {
            "bytes (demo)": loader_share(args.config, [], args.steps, args.warmup),
            "bpe indexed": loader_share(args.config, bpe, args.steps, args.warmup),
            "bpe indexed + document_mask": loader_share(
                args.config, [*bpe, "data.document_mask=true"], args.steps, args.warmup
            ),
        }
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "corpus": {"files": len(files), "text_mb": mb, "bpe_vocab": args.vocab_size, "bpe_train_s": train_s},
        "prepare_data": runs,
        "loader_share": shares,
    }
    print(f"corpus: {len(files)} stdlib files, {mb:.1f} MB; BPE {args.vocab_size} trained in {train_s:.1f} s")
    print(f"{'prepare-data':<30} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'MB/s':>7}")
    for r in runs:
        name = "batch parallel " + ("on" if r["batch_parallel"] else "off (1 thread)")
        rate = f"{r['tokens_per_s']:>12,.0f} {r['text_mb_per_s']:>7.2f}"
        print(f"{name:<30} {r['tokens']:>12,} {r['seconds']:>8.2f} {rate}")
    print(f"{'loader share (demo model)':<30} {'batch ms':>9} {'step ms':>9} {'share %':>8}")
    for name, s in shares.items():
        print(f"{name:<30} {s['batch_ms']:>9.3f} {s['step_ms']:>9.1f} {s['share_pct']:>8.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
