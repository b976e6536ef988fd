"""Write the SST-2 subset that ships inside the package (lora2/datasets/sst2).

Source: ../shared/data/sst2 (GLUE SST-2, see its README). We keep 8,000 random training rows
(seed 0), the whole 1,000-row validation split, and a 1,000-row test split drawn (seed 1) from
the remaining training rows whose text is in neither of the other two, so the default run needs
neither a hub nor the shared folder. Learning rates are chosen on validation; test is only
reported. Run from the repository root: python scripts/make_sst2_subset.py
"""

import csv
import random
from pathlib import Path

SRC = Path("../shared/data/sst2")
DST = Path("lora2/datasets/sst2")
TRAIN_ROWS = 8000
TEST_ROWS = 1000


def read(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Plain TSV, as read back with csv.QUOTE_NONE (no escaping: the sentences hold no tabs)."""
    for row in rows:
        assert all("\t" not in f and "\n" not in f for f in row), row
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    header, train = read(SRC / "train.tsv")
    _, validation = read(SRC / "validation.tsv")
    random.Random(0).shuffle(train)
    kept, rest = train[:TRAIN_ROWS], train[TRAIN_ROWS:]
    seen = {" ".join(r[0].lower().split()) for r in kept + validation}
    candidates = [r for r in rest if " ".join(r[0].lower().split()) not in seen]
    test = random.Random(1).sample(candidates, TEST_ROWS)
    DST.mkdir(parents=True, exist_ok=True)
    write(DST / "train.tsv", header, kept)
    write(DST / "validation.tsv", header, validation)
    write(DST / "test.tsv", header, test)
