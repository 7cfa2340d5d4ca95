# Writes the MiniLM pool's task files from published data (run by
# `fusion zoo fetch minilm`; standard library only):
#   python3 minilm_tasks.py GENSIM_TEST_DATA OUT_DIR MODEL_CARD...
# - wordsim353.similarity.jsonl, simlex999.similarity.jsonl: word pairs with
#   the human mean score (gensim's wordsim353.tsv, simlex999.txt);
# - lee.similarity.jsonl: the 1225 pairs of the 50 Lee news documents with
#   the human similarity (lee.cor, similarities0-1.txt, upper triangle);
# - polarity.embedding_classification.jsonl: 200 sentences of Pang & Lee
#   (pang_lee_polarity.cor, `__label__pos|neg` prefixes; the file lists
#   all neg then all pos, the task takes them in turn);
# - newsgroups.embedding_classification.jsonl: the 200 documents of
#   mini_newsgroup (a zlib-compressed pickle of a scikit-learn Bunch:
#   alt.atheism vs sci.space), headers removed as scikit-learn's
#   `remove=("headers",)` does, so the `Newsgroups:` line cannot give the
#   label away;
# - ../probe/NAME_card.similarity.jsonl: the examples of each fine-tune's
#   model card (README.md: `sentences = [...]` and the printed
#   `model.similarity` tensor), each pair scored with the cosine similarity
#   the card prints; only cards with at least three pairs (the smoke test).
# Every file is UTF-8 JSON lines; the counts are printed as JSON.
import ast
import io
import json
import os
import pickle
import re
import sys
import zlib


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows)


def word_pairs(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, score = line.rstrip("\n").split("\t")[:3]
            rows.append({"text_a": a, "text_b": b, "score": float(score)})
    return rows


def lee(data):
    with open(os.path.join(data, "lee.cor"), encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    with open(os.path.join(data, "similarities0-1.txt"), encoding="utf-8") as f:
        matrix = [[float(x) for x in line.split()] for line in f if line.strip()]
    assert len(docs) == 50 and len(matrix) == 50, (len(docs), len(matrix))
    return [
        {"text_a": docs[i], "text_b": docs[j], "score": matrix[i][j]}
        for i in range(50)
        for j in range(i + 1, 50)
    ]


def polarity(data):
    rows = []
    with open(os.path.join(data, "pang_lee_polarity.cor"), encoding="latin-1") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            if not text:
                continue
            rows.append({"text": text, "label": label.replace("__label__", "")})
    return interleave(rows)


def interleave(rows):
    """The rows with labels taken in turn (file order kept within a label),
    so that the first N items (`--limit N`) hold every label."""
    by_label = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    groups = [by_label[k] for k in sorted(by_label)]
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


class _Bunch(dict):
    def __setstate__(self, state):
        self.update(state)


class _Placeholder:
    """Stands for the Bunch's numpy arrays (targets, file names): this
    script needs no numpy, and the labels come from the documents."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name == "Bunch":
            return _Bunch
        if module.startswith("numpy"):
            return _Placeholder
        return super().find_class(module, name)


def newsgroups(data):
    raw = zlib.decompress(open(os.path.join(data, "mini_newsgroup"), "rb").read())
    bunch = _Unpickler(io.BytesIO(raw), encoding="latin1").load()
    names = list(bunch["target_names"])
    rows = []
    for doc in bunch["data"]:
        # The group is the one of `target_names` the `Newsgroups:` header
        # names (the same as the Bunch's targets, 100 documents each).
        m = re.search(r"^Newsgroups:\s*(.+)$", doc, re.M)
        groups = [g.strip() for g in m.group(1).split(",")] if m else []
        hit = [n for n in names if n in groups]
        if len(hit) != 1:
            raise SystemExit("mini_newsgroup: a document names no single group of %s" % names)
        _, _, body = doc.partition("\n\n")
        rows.append({"text": body.strip() or doc.strip(), "label": hit[0]})
    return rows


def card_probe(card, name):
    text = open(card, encoding="utf-8").read()
    m = re.search(r"sentences = (\[.*?\n\])", text, re.S)
    t = re.search(r"# tensor\((\[\[.*?\]\])\)", text, re.S)
    if not (m and t):
        raise SystemExit("%s: no usage example with printed similarities" % card)
    sentences = ast.literal_eval(m.group(1))
    matrix = ast.literal_eval(re.sub(r"\n#\s*", " ", t.group(1)))
    rows = []
    for i in range(len(sentences)):
        for j in range(i + 1, len(sentences)):
            if sentences[i].strip() and sentences[j].strip():
                rows.append(
                    {"text_a": sentences[i], "text_b": sentences[j],
                     "score": matrix[i][j], "source": name}
                )
    return rows


def main():
    data, out = sys.argv[1], sys.argv[2]
    cards = sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    counts = {
        "wordsim353": write(os.path.join(out, "wordsim353.similarity.jsonl"),
                            word_pairs(os.path.join(data, "wordsim353.tsv"))),
        "simlex999": write(os.path.join(out, "simlex999.similarity.jsonl"),
                           word_pairs(os.path.join(data, "simlex999.txt"))),
        "lee": write(os.path.join(out, "lee.similarity.jsonl"), lee(data)),
        "polarity": write(os.path.join(out, "polarity.embedding_classification.jsonl"),
                          polarity(data)),
        "newsgroups": write(os.path.join(out, "newsgroups.embedding_classification.jsonl"),
                            newsgroups(data)),
    }
    # The probe: one similarity task per model card that prints at least
    # three pairs (a rank correlation over fewer says nothing).
    probe_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "probe")
    os.makedirs(probe_dir, exist_ok=True)
    probe = {}
    for card in cards:
        name, _, path = card.partition("=")
        rows = card_probe(path, name)
        if len(rows) >= 3:
            probe[name + "_card"] = write(
                os.path.join(probe_dir, name + "_card.similarity.jsonl"), rows)
    counts["probe"] = probe
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
