"""The demo on the built-in data: generate the synthetic stream, then stream it day by day prequentially.

    python -m jobs.demo --out runs/demo-data

For each day it evaluates (maps ids through the vocabulary without growing it: unseen ids go to the fallback
row) and then trains (grows the vocabulary), and prints a per-day table: rows, batches, new ids, the share of
evaluation ids that were unseen, and the streaming speed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.dataset import Dataset
from pipeline.stream import DayStream, StreamConfig
from pipeline.synthetic import SyntheticConfig, write_synthetic
from pipeline.vocab import VocabularySet

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo-data"), help="where the synthetic data goes")
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--rows-per-day", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    cfg = SyntheticConfig(days=args.days, rows_per_day=args.rows_per_day)
    data_dir = args.out / "synthetic"
    write_synthetic(cfg, data_dir, overwrite=True)
    dataset = Dataset(data_dir)
    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=args.batch_size))

    header = f"{'day':<12}{'rows':>9}{'batches':>9}{'new items':>11}{'unseen item %':>15}{'rows/s':>12}"
    print(header)
    print("-" * len(header))
    for day in stream.days:
        start = time.perf_counter()
        unseen_before, items_before = vocab["item"].unseen, vocab["item"].num_ids
        eval_rows = sum(b.labels.numel() for b in stream.batches(day, grow=False))
        unseen = vocab["item"].unseen - unseen_before
        train_batches = list(stream.batches(day, grow=True))
        rows = sum(b.labels.numel() for b in train_batches)
        speed = (eval_rows + rows) / (time.perf_counter() - start)
        print(
            f"{day.name:<12}{rows:>9,}{len(train_batches):>9}{vocab['item'].num_ids - items_before:>11,}"
            f"{100 * unseen / eval_rows:>14.2f}%{speed:>12,.0f}"
        )
    vocab_dir = vocab.save(args.out / "vocab")
    print(f"\ndata: {data_dir}\nvocabulary: {vocab_dir}")
    for f, s in vocab.stats().items():
        print(f"  {f:<6} ids={s['ids']:>7,} rows={s['rows']:>7,} unseen lookups={s['unseen']:>8,}")


if __name__ == "__main__":
    main()
