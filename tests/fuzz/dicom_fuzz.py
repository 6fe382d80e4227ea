"""Mutation fuzzing of the DICOM series reader: damaged copies of good series, read as a user's folder.

Seeds are series the reader accepts: phantom series from ``medvl.data.dicom_write`` (CT and MR, axial,
coronal and oblique, several sizes) and pydicom's bundled files (CT_small, MR_small in explicit,
implicit and big-endian encodings and RLE, a one-frame RT dose, the CT5N series). Each case copies one
seed and applies one or more mutations:

- ``value``: a tag is rewritten as raw bytes, in one file or in all of them; for the geometry and rescale
  tags the text is made unparseable (a digit turned into a letter, junk), non-finite (nan, inf, 1e999),
  empty, one value short or one too many, or a different finite number; binary tags (Rows, BitsStored,
  ...) get random bytes.
- ``vr``: an element's value representation is replaced (an unknown one such as "ZZ", or a wrong one).
- ``bytes``: bytes after the preamble are flipped, cut off or inserted.
- ``files``: a slice is deleted or duplicated, a stray file is added, one slice moves to another series.

For every case ``read_series_metadata`` and ``read_dicom_series`` are called, and the outcome is one of:

- rejected: a ``ValueError`` whose message names the series folder (or a file in it);
- accepted: then every file of the series is re-read independently with pydicom, and each geometry and
  rescale tag present in it must hold finite numbers of the right count, stored with DICOM's value
  representation (an accepted series with a damaged value is counted as ``accepted_damaged``), the volume
  must be finite and the spacing positive;
- crash: any other exception, or a ``ValueError`` that names no file (``unnamed``).

    python -m tests.fuzz.dicom_fuzz --cases 3000 --seed 0 --workdir /tmp/fuzz   # the large run

The suite's bounded run is ``tests/fuzz/test_dicom_fuzz.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from medvl.data.dicom import GEOMETRY_RESCALE_TAGS  # what the reader promises about (tag -> value count)

# Other tags worth damaging: the matrix and pixel description, identifiers, MR acquisition values.
OTHER_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
              "NumberOfFrames", "SeriesInstanceUID", "Modality", "EchoTime", "RepetitionTime", "InstanceNumber")
BINARY_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel")
WRONG_VRS = ("ZZ", "\x00\x00", "OB", "US", "SQ", "UN", "FD", "AT")
BUNDLED_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                 "MR_small_RLE.dcm", "rtdose_1frame.dcm")
BUNDLED_SERIES = (("dicomdirtests", "98892001", "CT5N"),)


@dataclass
class FuzzReport:
    cases: int = 0
    files_mutated: int = 0
    accepted: int = 0
    rejected: int = 0
    crashes: List[str] = field(default_factory=list)
    unnamed: List[str] = field(default_factory=list)
    accepted_damaged: List[str] = field(default_factory=list)
    inconsistent: List[str] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.cases} mutated series ({self.files_mutated} files mutated) in {self.seconds:.1f} s: "
                 f"{self.accepted} accepted, {self.rejected} rejected with a reason, {len(self.crashes)} crashes, "
                 f"{len(self.unnamed)} errors naming no file, {len(self.accepted_damaged)} accepted with damaged "
                 f"geometry/rescale, {len(self.inconsistent)} accepted by one reader and refused by the other"]
        lines.append("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())))
        lines.append("rejections by reason:")
        lines += [f"  {count:5d}  {reason}" for reason, count in self.reasons.most_common()]
        for title, items in (("crashes", self.crashes), ("errors naming no file", self.unnamed),
                             ("accepted with damaged values", self.accepted_damaged),
                             ("inconsistent", self.inconsistent)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items[:20]]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# seeds


def _bundled_root() -> Optional[str]:
    from pydicom.data import get_testdata_file

    # download=False: pydicom would otherwise try (for 20 s) to fetch files it does not ship
    path = get_testdata_file("CT_small.dcm", download=False)
    return None if path is None else os.path.dirname(path)


def make_seeds(folder: str) -> List[str]:
    """Seed series folders under ``folder``: phantom series and the bundled files that are present."""
    from medvl.data.dicom_write import write_dicom_series

    seeds = []
    rng = np.random.default_rng(1234)
    oblique = (math.cos(0.5), math.sin(0.5), 0.0, 0.0, 0.0, -1.0)
    layouts = [("CT", (6, 8, 8), None, (2.0, 0.8, 0.8)), ("CT", (5, 12, 10), (1, 0, 0, 0, 0, -1), (3.0, 0.7, 0.9)),
               ("MR", (4, 8, 8), oblique, (4.0, 1.0, 1.0)), ("CT", (1, 8, 8), None, (1.5, 0.5, 0.5)),
               ("MR", (7, 6, 6), None, (1.0, 1.2, 1.2))]
    for i, (modality, shape, orientation, spacing) in enumerate(layouts):
        volume = rng.integers(-1000, 1500 if modality == "CT" else 0, size=shape) if modality == "CT" else \
            rng.integers(0, 3000, size=shape)
        path = os.path.join(folder, f"phantom{i}")
        metadata = {"EchoTime": 90.0, "RepetitionTime": 4000.0} if modality == "MR" else None
        write_dicom_series(path, volume.astype(np.float32), spacing, modality=modality, orientation=orientation,
                           position=(-10.0, 20.0, 5.0 * i), metadata=metadata, seed=i)
        seeds.append(path)
    root = _bundled_root()
    if root is not None:
        for name in BUNDLED_SEEDS:
            if os.path.isfile(os.path.join(root, name)):
                path = os.path.join(folder, "bundled-" + name.replace(".dcm", ""))
                os.makedirs(path)
                shutil.copy(os.path.join(root, name), path)
                seeds.append(path)
        for parts in BUNDLED_SERIES:
            if os.path.isdir(os.path.join(root, *parts)):
                path = os.path.join(folder, "bundled-" + "-".join(parts))
                shutil.copytree(os.path.join(root, *parts), path)
                seeds.append(path)
    return seeds


# ----------------------------------------------------------------------------------------------------------
# mutations


def _files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))


def _damaged_text(rng: np.random.Generator, current: str, count: int) -> bytes:
    """A broken (or, one time in six, a different but valid) text for a DS/IS value of ``count`` numbers."""
    values = current.split("\\") if current else ["1"] * count
    choice = int(rng.integers(0, 12))
    if choice == 0:  # a digit becomes a letter: "-1024" -> "-10x4"
        k = int(rng.integers(0, len(values)))
        digits = [j for j, c in enumerate(values[k]) if c.isdigit()] or [0]
        j = int(rng.choice(digits))
        values[k] = values[k][:j] + str(rng.choice(list("xO/lZ"))) + values[k][j + 1:]
    elif choice in (1, 2, 3):
        k = int(rng.integers(0, len(values)))
        values[k] = str(rng.choice(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e400"]))
    elif choice == 4:
        return b""
    elif choice == 5:
        values = values[:-1] if len(values) > 1 else []
        if not values:
            return b"\\"
    elif choice == 6:
        values = values + [values[-1]]
    elif choice == 7:
        return bytes(rng.integers(32, 127, size=int(rng.integers(1, 12)), dtype=np.uint8))
    elif choice == 8:
        k = int(rng.integers(0, len(values)))
        values[k] = values[k] + "\\"  # an empty value in the middle
    elif choice == 9:
        return bytes(rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8))
    else:  # valid numbers, possibly implausible: the reader may accept or refuse, but must not crash
        k = int(rng.integers(0, len(values)))
        values[k] = str(rng.choice(["0", "-0.8", "1e6", "-1", "3.5", "1e-9"]))
    return "\\".join(values).encode("latin-1")


def _mutate_value(folder: str, rng: np.random.Generator) -> Tuple[str, int]:
    import pydicom

    from medvl.data.dicom_write import write_raw_element

    files = _files(folder)
    tags = list(GEOMETRY_RESCALE_TAGS) * 3 + list(OTHER_TAGS)
    keyword = str(rng.choice(tags))
    targets = files if rng.random() < 0.3 else [files[int(rng.integers(0, len(files)))]]
    for path in targets:
        ds = pydicom.dcmread(path, stop_before_pixels=False, force=True)
        if keyword in BINARY_TAGS:
            raw = bytes(rng.integers(0, 256, size=int(rng.choice([0, 2, 2, 2, 4, 6])), dtype=np.uint8))
        else:
            current = ds.get(keyword)
            text = "" if current is None else ("\\".join(str(v) for v in current)
                                               if type(current).__name__ == "MultiValue" else str(current))
            raw = _damaged_text(rng, text, GEOMETRY_RESCALE_TAGS.get(keyword, 1))
        write_raw_element(path, keyword, raw)
    return f"value {keyword} x{len(targets)}", len(targets)


def _mutate_vr(folder: str, rng: np.random.Generator) -> Tuple[str, int]:
    import pydicom

    from medvl.data.dicom_write import write_raw_element

    files = _files(folder)
    path = files[int(rng.integers(0, len(files)))]
    ds = pydicom.dcmread(path, force=True)
    candidates = [e.tag for e in ds if e.tag.group > 0x0002 and e.VR != "SQ" and e.keyword != "PixelData"]
    if not candidates:
        return "vr none", 0
    tag = candidates[int(rng.integers(0, len(candidates)))]
    value = ds.get_item(tag).value
    raw = value if isinstance(value, bytes) else str(ds[tag].value).encode("latin-1", "replace")
    vr = str(rng.choice(WRONG_VRS))
    try:
        write_raw_element(path, tag, raw, vr=vr)
    except Exception:  # pydicom refuses to write some combinations (e.g. an SQ from bytes): keep the file
        return f"vr {vr} (not written)", 0
    return f"vr {vr}", 1


def _mutate_bytes(folder: str, rng: np.random.Generator) -> Tuple[str, int]:
    files = _files(folder)
    path = files[int(rng.integers(0, len(files)))]
    with open(path, "rb") as f:
        data = bytearray(f.read())
    start = 132 if data[128:132] == b"DICM" else 0
    if len(data) <= start + 2:
        return "bytes none", 0
    choice = int(rng.integers(0, 3))
    if choice == 0:
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(start, len(data)))] = int(rng.integers(0, 256))
        kind = "bytes flip"
    elif choice == 1:
        del data[int(rng.integers(start, len(data))):]
        kind = "bytes truncate"
    else:
        at = int(rng.integers(start, len(data)))
        data[at:at] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 16)), dtype=np.uint8))
        kind = "bytes insert"
    with open(path, "wb") as f:
        f.write(bytes(data))
    return kind, 1


def _mutate_files(folder: str, rng: np.random.Generator) -> Tuple[str, int]:
    import pydicom

    files = _files(folder)
    choice = int(rng.integers(0, 4))
    path = files[int(rng.integers(0, len(files)))]
    if choice == 0 and len(files) > 1:
        os.remove(path)
        return "files delete", 1
    if choice == 1:
        shutil.copy(path, path + ".copy")
        return "files duplicate", 1
    if choice == 2:
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not a DICOM file\n")
        return "files stray", 1
    ds = pydicom.dcmread(path, force=True)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1143.999"
    ds.save_as(path)
    return "files other-series", 1


MUTATIONS: Dict[str, Callable[[str, np.random.Generator], Tuple[str, int]]] = {
    "value": _mutate_value, "vr": _mutate_vr, "bytes": _mutate_bytes, "files": _mutate_files}
# value mutations are the ones the reader's promise is about: the larger share
_WEIGHTS = {"value": 0.55, "vr": 0.15, "bytes": 0.2, "files": 0.1}


# ----------------------------------------------------------------------------------------------------------
# the oracle


def _damaged_values(files: List[str]) -> List[str]:
    """The geometry/rescale values of ``files`` that pydicom reads as present but that are not finite numbers
    of the right count (what an accepted series must never hold)."""
    import pydicom
    from pydicom.datadict import dictionary_VR

    found = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword, count in GEOMETRY_RESCALE_TAGS.items():
            try:
                value = ds.get(keyword)
            except Exception as exc:  # noqa: BLE001 - undecodable counts as damaged
                found.append(f"{path}: {keyword} undecodable ({exc})")
                continue
            if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
                continue
            items = list(value) if isinstance(value, list) or type(value).__name__ == "MultiValue" else [value]
            try:
                numbers = [float(v) for v in items]
            except (TypeError, ValueError):
                found.append(f"{path}: {keyword} {value!r}")
                continue
            if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
                found.append(f"{path}: {keyword} {value!r}")
            elif ds[keyword].VR != dictionary_VR(keyword):
                found.append(f"{path}: {keyword} {value!r} stored as {ds[keyword].VR}")
    return found


def _reason(message: str, folder: str) -> str:
    """The message without paths and values, as a short category for the counts."""
    text = message
    if text.startswith(folder):  # "<folder>/<file>: <what>" or "<folder>: <what>"
        text = text[len(folder):].partition(": ")[2] or text
    if text.startswith("frame "):
        text = text.partition(": ")[2]
    for stop in (" is '", " is \"", " (", ": expected", " at ", ":  ", "; ", " in one folder"):
        cut = text.find(stop, 2)
        if cut > 0:
            text = text[:cut]
    return text.strip(" :/")[:90]


def check_case(folder: str, report: FuzzReport, label: str) -> None:
    from medvl.data.dicom import read_dicom_series, read_series_metadata

    outcomes = {}
    for name, read in (("metadata", read_series_metadata), ("series", read_dicom_series)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcomes[name] = ("accepted", read(folder))
        except ValueError as exc:
            message = str(exc)
            outcomes[name] = ("rejected", message)
            if folder not in message:
                report.unnamed.append(f"{label}: {name}: {message[:200]}")
        except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
            outcomes[name] = ("crash", None)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            report.crashes.append(f"{label}: {name}: {type(exc).__name__}: {str(exc)[:150]} "
                                  f"({os.path.basename(where.filename)}:{where.lineno})")
    series_kind, series = outcomes["series"]
    if series_kind == "accepted":
        report.accepted += 1
        damaged = _damaged_values(series.files)
        if damaged:
            report.accepted_damaged.append(f"{label}: " + "; ".join(damaged[:3]))
        if not (np.isfinite(series.volume).all() and all(math.isfinite(s) and s > 0 for s in series.spacing)):
            report.accepted_damaged.append(f"{label}: non-finite volume or spacing {series.spacing}")
        if outcomes["metadata"][0] != "accepted":
            report.inconsistent.append(f"{label}: pixels accepted, headers refused: {outcomes['metadata'][1]}")
    elif series_kind == "rejected":
        report.rejected += 1
        report.reasons[_reason(series, folder)] += 1


def run_fuzz(cases: int, seed: int, workdir: str, *, log: Optional[Callable[[str], None]] = None) -> FuzzReport:
    """``cases`` mutated series from the seeds, deterministic for a ``seed``; files live under ``workdir``."""
    report = FuzzReport()
    start = time.perf_counter()
    seed_dir = os.path.join(workdir, "seeds")
    os.makedirs(seed_dir, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeds = make_seeds(seed_dir)
    rng = np.random.default_rng(seed)
    kinds, weights = list(_WEIGHTS), list(_WEIGHTS.values())
    for case in range(cases):
        source = seeds[int(rng.integers(0, len(seeds)))]
        folder = os.path.join(workdir, f"case{case:05d}")
        shutil.copytree(source, folder)
        applied = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            kind = str(rng.choice(kinds, p=weights))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    what, n_files = MUTATIONS[kind](folder, rng)
                except Exception:  # noqa: BLE001 - an earlier mutation left a file pydicom cannot rewrite
                    what, n_files = f"{kind} (not applicable)", 0
            report.kinds[what.split(" ")[0]] += 1
            report.files_mutated += n_files
            applied.append(what)
        label = f"case {case} ({os.path.basename(source)}: {'; '.join(applied)})"
        check_case(folder, report, label)
        report.cases += 1
        shutil.rmtree(folder)
        if log is not None and (case + 1) % 250 == 0:
            log(f"{case + 1}/{cases} cases, {time.perf_counter() - start:.0f} s")
    report.seconds = time.perf_counter() - start
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=3000, help="mutated series to read (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the copies live (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="medvl-dicom-fuzz-")
    try:
        report = run_fuzz(args.cases, args.seed, workdir, log=lambda line: print(line, flush=True))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.summary())
    bad = report.crashes or report.unnamed or report.accepted_damaged or report.inconsistent
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
