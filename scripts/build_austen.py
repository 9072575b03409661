"""Rebuilds data/austen_persuasion.txt.gz from Debian's r-cran-janeaustenr (public-domain text).

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /tmp/ja
    pip install pyreadr && python scripts/build_austen.py /tmp/ja

The package keeps its books in R's lazy-load database (data/Rdata.rdb): one zlib-compressed serialized
data frame per book, each preceded by a 4-byte length. Persuasion is the fourth; paragraphs are runs of
non-empty lines.
"""

import gzip
import sys
import tempfile
import zlib
from pathlib import Path

import pyreadr

REPO = Path(__file__).resolve().parent.parent


def books(rdb: bytes) -> list[list[str]]:
    out, pos = [], 0
    while pos < len(rdb):
        stream = zlib.decompressobj()
        blob = stream.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(stream.unused_data)
        with tempfile.NamedTemporaryFile(suffix=".rds") as f:
            f.write(blob)
            f.flush()
            frame = next(iter(pyreadr.read_r(f.name).values()))
        out.append([str(line) for line in frame.iloc[:, 0]])
    return out


def paragraphs(lines: list[str]) -> list[str]:
    paras, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paras.append(" ".join(current))
            current = []
    return paras


if __name__ == "__main__":
    root = Path(sys.argv[1])
    rdb = (root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").read_bytes()
    persuasion = books(rdb)[3]
    assert persuasion[0] == "Persuasion", persuasion[:3]
    with gzip.open(REPO / "data" / "austen_persuasion.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(paragraphs(persuasion)) + "\n")
