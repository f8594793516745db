from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import SEED_SCORES, needs_seed

from ih_sweep.heads import scoring


def test_induction_target_mask_on_repeated_sequence():
    tok = torch.tensor([[9, 1, 2, 3, 1, 2, 3]])
    m = scoring.induction_target_mask(tok)
    # query 4 (token 1, seen at 1) -> key 2; query 5 (2) -> key 3; query 6 (3) -> key 4
    assert m[0, 4].nonzero().flatten().tolist() == [2]
    assert m[0, 5].nonzero().flatten().tolist() == [3]
    assert m[0, 6].nonzero().flatten().tolist() == [4]
    assert not m[0, :4].any()


def test_prefix_matching_known_values():
    length, reps = 3, 2
    tok = torch.tensor([[0, 5, 6, 7, 5, 6, 7]])
    qmask = torch.zeros_like(tok, dtype=torch.bool)
    qmask[:, 1 + length:] = True
    t = tok.shape[1]
    attn = torch.zeros(1, 3, t, t)
    for q in range(t):
        attn[0, 0, q, max(q - length + 1, 0)] = 1.0  # perfect induction head
        attn[0, 1, q, 0] = 1.0  # attends to BOS
        attn[0, 2, q, max(q - length + 1, 0)] = 0.5  # half induction, half previous token
        attn[0, 2, q, max(q - 1, 0)] += 0.5
    got = scoring.prefix_matching(attn, tok, qmask)
    assert torch.allclose(got, torch.tensor([1.0, 0.0, 0.5]))
    del reps


def test_copying_score_known_values():
    # vocabulary mean 0; attended token raised to 3, another sequence token to 1
    mean = torch.tensor([0.0])
    att = torch.tensor([3.0])
    seq = torch.tensor([[3.0, 1.0, -2.0]])
    assert torch.allclose(scoring.copying_from_logits(mean, att, seq), torch.tensor([0.75]))
    # a head that lowers everything copies nothing
    assert scoring.copying_from_logits(mean, torch.tensor([-1.0]),
                                       torch.tensor([[-1.0, -2.0]])).item() == 0.0


def test_combined_score_matches_notebook_formula():
    assert scoring.combined_score(0.6, 0.035) == pytest.approx(0.6)
    assert scoring.combined_score(0.0, 0.065) == pytest.approx(1.0)


def test_random_sequences_shape_and_distinct_tokens():
    tok, qm = scoring.random_sequences(5, 25, 4, list(range(10, 300)), bos_id=1, seed=0)
    assert tok.shape == (5, 101)
    assert (tok[:, 0] == 1).all()
    for row in tok:
        r = row[1:26]
        assert len(set(r.tolist())) == 25
        assert torch.equal(row[26:51], r) and torch.equal(row[76:], r)
    assert qm[:, :26].sum() == 0 and qm[:, 26:].all()
    again, _ = scoring.random_sequences(5, 25, 4, list(range(10, 300)), bos_id=1, seed=0)
    assert torch.equal(tok, again)


class _Tok:
    all_special_ids = [0, 1]
    added_tokens_decoder: dict = {}

    def __len__(self):
        return 100


def test_candidate_ids_exclude_special_frequent_and_rare():
    ids = scoring.candidate_token_ids(_Tok(), 0.1, 0.2)
    assert ids[0] == 10 and ids[-1] == 79
    assert scoring.candidate_token_ids(_Tok())[:2] == [2, 3]


def test_score_matrix_and_bad_column():
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "prefix": [1, 2, 3, 4.0],
                       "copying": 0.0, "combined": 0.0})
    assert scoring.score_matrix(df).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="allowed values: prefix, copying, combined"):
        scoring.score_matrix(df, "best")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({0: Evil()}))
    with pytest.raises(scoring.ScoreFileError, match="it asks for builtins.print"):
        scoring.load_seed_scores(bad)
    also_bad = tmp_path / "os.pkl"
    also_bad.write_bytes(pickle.dumps({0: np.ones(3), 1: pytest.approx}))  # any other global
    with pytest.raises(scoring.ScoreFileError, match="may hold only numpy arrays"):
        scoring.load_seed_scores(also_bad)


def test_restricted_unpickler_reads_numpy(tmp_path):
    good = tmp_path / "ok.pkl"
    good.write_bytes(pickle.dumps({3: np.array([0.1, 0.5]), 7: np.array([0.9, np.float64(0.2)])}))
    df = scoring.load_seed_scores(good)
    assert df["layer"].tolist() == [3, 3, 7, 7]
    assert df["combined"].tolist() == [0.1, 0.5, 0.9, 0.2]


@needs_seed
def test_notebook_score_file_loads():
    df = scoring.load_seed_scores(SEED_SCORES)
    assert len(df) == 256 and sorted(df["layer"].unique()) == list(range(3, 32, 4))
    assert df["combined"].max() == pytest.approx(1.084303, abs=1e-6)


def test_score_file_csv_roundtrip(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 1], "head": [0, 0], "prefix": [0.2, 0.9]})
    df.to_csv(tmp_path / "s.csv", index=False)
    got = scoring.load_score_file(tmp_path / "s.csv")
    assert got["prefix"].tolist() == [0.2, 0.9]
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="needs columns layer, head"):
        scoring.load_score_file(tmp_path / "bad.csv")
    with pytest.raises(scoring.ScoreFileError, match="no such file"):
        scoring.load_score_file(tmp_path / "missing.csv")


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    path = tmp_path / "scores.pkl"
    path.write_bytes(pickle.dumps({0: np.array([0.1, 0.5], dtype=np.float32),
                                   4: np.array([np.nan, 0.2])}, protocol=protocol))
    df = scoring.load_seed_scores(path)
    assert df["layer"].tolist() == [0, 0, 4, 4] and np.isnan(df["combined"][2])


class Touch:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload,match", [
    (lambda t: b"", "the file is empty"),
    (lambda t: pickle.dumps({0: np.ones(32)})[:40], "truncated|not loaded"),
    (lambda t: pickle.dumps({0: Touch(t)}), "it asks for posix.system|it asks for os.system"),
    (lambda t: pickle.dumps([1, 2, 3]), "expected a non-empty dict"),
    (lambda t: pickle.dumps({-1: np.ones(2)}), "layer key -1 is not an integer >= 0"),
    (lambda t: pickle.dumps({0: np.ones(2), 1: np.ones(3)}), "different numbers of heads"),
    # a BINBYTES8 opcode declaring 2**62 bytes: refused, nothing that size is allocated
    (lambda t: b"\x80\x04\x8e" + (1 << 62).to_bytes(8, "little") + b"x", "not loaded|not a"),
])
def test_bad_score_pickles_are_refused_in_one_line(tmp_path, payload, match):
    target = tmp_path / "PWNED"
    path = tmp_path / "scores.pkl"
    path.write_bytes(payload(target))
    with pytest.raises(scoring.ScoreFileError, match=match) as err:
        scoring.load_seed_scores(path)
    assert "\n" not in str(err.value) and not target.exists()


@pytest.mark.parametrize("text,match", [
    ("", "the file is empty"),
    ("layer,head,prefix\n", "a header but no rows"),
    ("layer,head,prefix\n0,0,\n0,1,\n", "no finite score in prefix"),
    ("layer,head,prefix\n0,0,0.5\n0,1,high\n", r"s.csv:3: prefix='high' is not a number"),
    ("layer,head,prefix\n0,0,0.5\n0,0,0.7\n", r"s.csv:3: layer 0 head 0 appears twice"),
    ("layer,head,prefix\n-1,0,0.5\n", r"s.csv:2: layer=-1; ids are integers >= 0"),
    ("layer,head,prefix\n0,x,0.5\n", r"s.csv:2: head='x'"),
    ("layer,head,prefix\n0,1.5,0.5\n", r"s.csv:2: head=1.5"),
    ("a,b\n1,2\n", "needs columns layer, head"),
    ("\x00\x01\xff\xfe", "not a CSV table|needs columns"),
])
def test_bad_score_csvs_are_refused_naming_the_line(tmp_path, text, match):
    path = tmp_path / "s.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(scoring.ScoreFileError, match=match):
        scoring.load_score_file(path)
