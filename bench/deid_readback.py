"""What reading every de-identified output back costs the byte-level fast path, by method.

    .venv/bin/python bench/deid_readback.py [--min-files 500] [--repeats 5]

Corpus: ``deid_peers.build_corpus`` (pydicom's test files with identifying values planted, replicated), in
``$TMPDIR/deid_readback_bench``; timed on the files the fast path writes itself.  CPU time per file (best of
``--repeats``), single process:

* the fast path without any read-back, and as shipped (``stream._verify``: the output walked by the fast
  path's own parser with every check its input had to pass - structure, lengths, nesting, VRs, numbers, text
  in its character set);
* the alternatives: ``_verify`` with structure checks only (what it did before), pydicom ``dcmread`` alone,
  and a full pydicom read-back (``dicom_io.check_readable``: dcmread + every value decoded at every depth);
* bare pydicom read+write, for scale.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-files", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging
    logging.disable(logging.WARNING)

    import pydicom

    import deid_peers
    from imaging_tasks.deid import dicom as ref
    from imaging_tasks.deid import stream
    from imaging_tasks.dicom_io import check_readable
    from imaging_tasks.errors import BadInput

    root = Path(tempfile.gettempdir()) / "deid_readback_bench"
    root.mkdir(exist_ok=True)
    manifest = deid_peers.build_corpus(root, args.min_files)
    options, key = ref.DeidOptions(), deid_peers.BENCH_KEY
    pairs = []
    for f in manifest["files"]:
        raw = (root / "corpus" / f["name"]).read_bytes()
        try:
            out, _ = stream.deidentify_stream(raw, key, options)
        except (BadInput, stream.Unsupported):
            continue
        pairs.append((raw, out))

    def per_file(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.process_time()
            for raw, out in pairs:
                fn(raw, out)
            best = min(best, time.process_time() - t)
        return best / len(pairs) * 1e3

    def fast_without_verify(raw, _out):
        real, stream._verify = stream._verify, lambda *a, **k: None
        try:
            stream.deidentify_stream(raw, key, options)
        finally:
            stream._verify = real

    def verify(out: bytes, full: bool) -> None:
        """stream.verified (meta, character set, _verify), optionally with the structure checks only."""
        if full:
            assert stream.verified(out)
            return
        real = stream._Parser.dataset

        def structure_only(self, *a):
            self.value_checks, self.check_text = {"SQ": 1}, False
            return real(self, *a)

        stream._Parser.dataset = structure_only
        try:
            assert stream.verified(out)
        finally:
            stream._Parser.dataset = real

    def bare(raw, _out):
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.save_as(io.BytesIO())

    no_verify = per_file(fast_without_verify)
    shipped = per_file(lambda raw, out: stream.deidentify_stream(raw, key, options))
    rows = [
        ("fast path, no read-back", no_verify),
        ("fast path as shipped (stream._verify, all input checks)", shipped),
        ("  read-back alone: stream._verify, structure only (before)", per_file(lambda r, o: verify(o, False))),
        ("  read-back alone: stream._verify, all input checks (now)", per_file(lambda r, o: verify(o, True))),
        ("  read-back alone: pydicom dcmread, values not decoded", per_file(lambda r, o: pydicom.dcmread(io.BytesIO(o)))),
        ("  read-back alone: pydicom in full (dicom_io.check_readable)", per_file(lambda r, o: check_readable(o))),
        ("bare pydicom read+write", per_file(bare)),
    ]
    print(f"{len(pairs)} files written by the fast path (of {len(manifest['files'])}); CPU ms per file, "
          f"best of {args.repeats}")
    for label, ms in rows:
        print(f"{label:64s} {ms:7.3f} ms  {ms / no_verify:6.0%} of the fast path without read-back")


if __name__ == "__main__":
    main()
