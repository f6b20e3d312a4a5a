"""Fuzz target (atheris): bytes as an input file of each kind, and as a recipe.

Reading any bytes must end in rows, quarantine entries, or a CurateError (a clear message naming
the file); loading any bytes as a recipe must end in a recipe or a RecipeError/CurateError. Any
other exception is a crash, and libFuzzer saves the input that caused it.

    cp -r examples/raw /tmp/corpus          # libFuzzer adds what it finds to the corpus folder
    python fuzz/fuzz_inputs.py -max_total_time=600 /tmp/corpus
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

# numba compiles these modules' kernels from their bytecode, which instrumentation would change:
# import them first, uninstrumented
import curate.text.clean  # noqa: F401, E402
import curate.text.jsonl  # noqa: F401, E402
import curate.text.lsh  # noqa: F401, E402
import curate.text.minhash  # noqa: F401, E402
import curate.text.ngrams  # noqa: F401, E402
import curate.text.parallel  # noqa: F401, E402
import curate.text.sha1  # noqa: F401, E402
import curate.text.shingles  # noqa: F401, E402
import curate.text.utf8  # noqa: F401, E402

with atheris.instrument_imports(include=["curate"]):
    from curate.errors import CurateError
    from curate.formats import InputSpec, read_input
    from curate.recipe import load_recipe

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz", ".json.zst", ".jsonl.xz", ".csv.bz2", ".parquet"]
WORK = Path(tempfile.mkdtemp(prefix="curate-fuzz-"))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    choice, body = data[0], data[1:]
    if choice % 8 == 7:  # a recipe
        path = WORK / "recipe.yaml"
        path.write_bytes(body)
        try:
            load_recipe(path)
        except CurateError:
            pass
        return
    path = WORK / f"input{SUFFIXES[choice % len(SUFFIXES)]}"
    path.write_bytes(body)
    try:
        for batch in read_input(InputSpec.from_recipe({"path": path.name}, "fuzz"), WORK):
            batch.table.validate(full=True)
    except CurateError:
        pass
    finally:
        path.unlink()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
