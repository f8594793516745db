"""Input files by content (:mod:`ih_sweep.fingerprints`): exact for small files, sampled for
big ones, through symlinks; the built-in model and hub ids are not files."""

from __future__ import annotations

from ih_sweep.fingerprints import (
    EDGE_BYTES,
    EXACT_BYTES,
    MISSING,
    changed_inputs,
    file_fingerprint,
    model_inputs,
)


def test_a_small_file_is_hashed_whole_and_a_big_one_sampled(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"a" * 1000)
    before = file_fingerprint(small)
    small.write_bytes(b"a" * 999 + b"b")  # same size, one byte in the middle
    assert before.startswith("sha256:") and file_fingerprint(small) != before
    big = tmp_path / "big.bin"
    data = bytearray(EXACT_BYTES + 3 * EDGE_BYTES)
    big.write_bytes(data)
    first = file_fingerprint(big)
    assert first.startswith(f"sampled:{len(data)}:")
    for at in (10, len(data) - 10):  # the first and the last MiB are read
        changed = bytearray(data)
        changed[at] = 1
        big.write_bytes(changed)
        assert file_fingerprint(big) != first
    assert file_fingerprint(tmp_path / "none") == MISSING


def test_a_model_folder_through_a_symlink_and_the_names_that_are_no_folders(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, text in ((one, "{}"), (two, "{ }")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer.json").write_text(text)
        (folder / "README.md").write_text("not an input")
    link = tmp_path / "link"
    link.symlink_to(one)
    before = model_inputs(str(link))
    assert set(before) == {"model/config.json", "model/tokenizer.json"}
    link.unlink()
    link.symlink_to(two)
    assert changed_inputs(before, model_inputs(str(link))) == ["model/tokenizer.json"]
    assert model_inputs("builtin:tiny") == {} and model_inputs("org/name") == {}
