"""Write the SST-2 subset that ships inside the package (src/lora2/datasets/sst2).

Source: ../shared/data/sst2 (GLUE SST-2, see its README). We keep 8,000 random training rows
(seed 0) and the whole 1,000-row validation split, so the default run needs neither a hub nor
the shared folder. Run from the repository root: python scripts/make_sst2_subset.py
"""

import csv
import random
from pathlib import Path

SRC = Path("../shared/data/sst2")
DST = Path("src/lora2/datasets/sst2")
TRAIN_ROWS = 8000


def read(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    header, train = read(SRC / "train.tsv")
    _, validation = read(SRC / "validation.tsv")
    random.Random(0).shuffle(train)
    DST.mkdir(parents=True, exist_ok=True)
    write(DST / "train.tsv", header, train[:TRAIN_ROWS])
    write(DST / "validation.tsv", header, validation)
