"""Induction-head scores for every (layer, query head): prefix matching and copying.

Pure score maths first (testable on hand-built attention patterns and weights), then the
model-facing code that runs the batched forward passes, then the cached score table.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import RankBy, ScoringConfig
from ih_sweep.data.files import unreadable
from ih_sweep.heads.basics import (  # noqa: F401  torch-free, re-exported here
    SCORE_NAMES,
    candidate_token_ids,
    check_repeated_sequences,
    score_matrix,
)
from ih_sweep.model.architecture import HeadSites, head_sites, hook_z
from ih_sweep.model.batching import scoring_batch_rows

log = logging.getLogger(__name__)

# the induction score table (score_heads; its cache's columns)
# prefix_se: the prefix score's standard error over the sequences (ih_sweep.heads.stability)
INDUCTION_COLUMNS = ["model", "layer", "head", "prefix", "copying", "combined", "n_sequences",
                     "seed", "prefix_se"]
INDUCTION_NAMES = [RankBy.prefix.value, RankBy.copying.value, RankBy.combined.value]
# the table a job ranks by: the induction scores and the FV score (ih_sweep.heads.function_vectors;
# empty where no ranking or exclusion needs it)
# (and their standard errors: prefix_se over the sequences, fv_se over the FV prompts)
SCORE_COLUMNS = [*INDUCTION_COLUMNS[:6], RankBy.fv.value, *INDUCTION_COLUMNS[6:], "fv_se"]


# --------------------------------------------------------------------------- pure maths
def combined_score(prefix: np.ndarray | float, copying: np.ndarray | float):
    """The notebook's combined score: sqrt(prefix^2 + ((copying - 0.035) / 0.03)^2)."""
    return np.sqrt(np.square(prefix) + np.square((np.asarray(copying) - 0.035) / 0.03))


def induction_target_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[b, T, T] bool: key k is a target of query q if token k-1 equals token q and k < q.

    That is the token that *followed* an earlier occurrence of the current token.
    """
    b, t = tokens.shape
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, q, p]
    mask = torch.zeros(b, t, t, dtype=torch.bool, device=tokens.device)
    mask[:, :, 1:] = same[:, :, :-1]  # key k = p + 1
    q_idx = torch.arange(t, device=tokens.device)
    mask &= q_idx[None, None, :] < q_idx[None, :, None]  # k < q
    return mask


def prefix_matching(attn: torch.Tensor, tokens: torch.Tensor,
                    query_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention mass on induction targets, per head.

    attn: [b, h, T, T] attention probabilities; tokens: [b, T]; query_mask: [b, T] marks the
    query positions that count (repeats 2.. of the random sequence). Returns [h].
    """
    target = induction_target_mask(tokens).to(attn.dtype)  # [b, q, k]
    mass = (attn * target[:, None]).sum(-1)  # [b, h, q]
    qm = query_mask.to(attn.dtype)[:, None, :]
    return (mass * qm).sum((0, 2)) / qm.sum((0, 2)).clamp_min(1)


def prefix_matching_per_sequence(attn: torch.Tensor, tokens: torch.Tensor,
                                 query_mask: torch.Tensor) -> torch.Tensor:
    """:func:`prefix_matching` of each sequence on its own: [b, h] (the mean over a
    sequence's counted queries). With as many counted queries in every sequence (the
    random sequences'), :func:`prefix_matching` is the mean of these rows."""
    target = induction_target_mask(tokens).to(attn.dtype)
    mass = (attn * target[:, None]).sum(-1)  # [b, h, q]
    qm = query_mask.to(attn.dtype)[:, None, :]
    return (mass * qm).sum(2) / qm.sum(2).clamp_min(1)


def copying_from_logits(mean_logit: torch.Tensor, attended_token: torch.Tensor,
                        seq_token_logits: torch.Tensor) -> torch.Tensor:
    """Olsson's copying score from a head's direct-path logits.

    For each query position: logits minus their mean over the vocabulary, ReLU, then the raised
    logit of the attended token divided by the sum over the sequence's distinct tokens.
    Only the needed logits are passed: attended_token [...] is the attended token's logit,
    seq_token_logits [..., U] those of the sequence's distinct tokens, mean_logit [...] the mean
    over the full vocabulary (cheap as mean_row . x). Returns the per-position score [...].
    """
    raised = torch.relu(attended_token - mean_logit)
    total = torch.relu(seq_token_logits - mean_logit[..., None]).sum(-1)
    return torch.where(total > 0, raised / total.clamp_min(1e-12), torch.zeros_like(raised))


# --------------------------------------------------------------------------- inputs
# candidate_token_ids, check_repeated_sequences: ih_sweep.heads.basics (imported above)


def random_sequences(n: int, length: int, repeats: int, candidates: list[int], bos_id: int | None,
                     seed: int, key: str = "scoring") -> tuple[torch.Tensor, torch.Tensor]:
    """[n, (bos) + length*repeats] tokens of R repeated, R drawn without replacement, and the
    mask of query positions in repeats 2.. . Raises
    :class:`~ih_sweep.config.errors.ConfigError` naming ``<key>.seq_len`` when
    ``candidates`` hold fewer than ``length`` tokens (:func:`check_repeated_sequences`)."""
    check_repeated_sequences(key, length, repeats, int(bos_id is not None), None,
                             len(candidates))
    gen = torch.Generator().manual_seed(seed)
    cand = torch.tensor(candidates, dtype=torch.long)
    rows = [cand[torch.randperm(len(cand), generator=gen)[:length]] for _ in range(n)]
    r = torch.stack(rows)
    body = r.repeat(1, repeats)
    offset = 0
    if bos_id is not None:
        body = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], 1)
        offset = 1
    qmask = torch.zeros_like(body, dtype=torch.bool)
    qmask[:, offset + length:] = True
    return body, qmask


# --------------------------------------------------------------------------- model passes
def score_heads(model, tokenizer, settings: ScoringConfig, model_name: str = "model",
                progress: bool = False) -> pd.DataFrame:
    """The score table of :func:`score_heads_with_samples` alone."""
    return score_heads_with_samples(model, tokenizer, settings, model_name, progress)[0]


@torch.no_grad()
def score_heads_with_samples(model, tokenizer, settings: ScoringConfig,
                             model_name: str = "model", progress: bool = False
                             ) -> tuple[pd.DataFrame, np.ndarray]:
    """Prefix and copying scores for every query head of every layer (one row each), and
    each random sequence's own prefix score [n_sequences, layers, heads] float64 (what
    the ``prefix_se`` column and the top-N stability, :mod:`ih_sweep.heads.stability`,
    are computed from; the ``prefix`` column is computed as before, not from them).

    The copying score reads each head's direct path as the model computes it
    (:meth:`~ih_sweep.model.architecture.HeadSites.direct_path`: W_O columns, attention-output
    norms where the layer has them, the final norm where the model applies one, OPT's
    project_out, the unembedding, Gemma-2's logit softcap). The model must use eager
    attention (sdpa returns no attention probabilities). The sequences have no padding
    (every row is as long), so positions are the same whatever the batch size.
    """
    sites = head_sites(model)
    device = next(model.parameters()).device
    candidates = candidate_token_ids(tokenizer, settings.exclude_frequent_frac,
                                     settings.exclude_rare_frac)
    bos = tokenizer.bos_token_id
    rep, qmask = random_sequences(settings.n_sequences, settings.seq_len, settings.repeats,
                                  candidates, bos, settings.seed)
    plain, _ = random_sequences(settings.n_sequences, settings.seq_len, 1, candidates, bos,
                                settings.seed + 1)
    L, H = sites.n_layers, sites.heads_per_layer
    prefix_sum = torch.zeros(L, H, dtype=torch.float64)
    copy_sum = torch.zeros(L, H, dtype=torch.float64)
    n_query = 0
    n_copy = 0
    per_sequence: list[torch.Tensor] = []  # [b, L, H] per batch
    w_o = [sites.w_o(layer).to(device) for layer in range(L)]
    unembed_w = _unembed_weight(sites).to(device)  # [V, hidden]
    mean_row = unembed_w.mean(0)  # mean logit = mean_row . x
    bs = scoring_batch_rows(settings, model)
    store: dict[int, torch.Tensor] = {}  # each layer's o_proj input (hook_z), per batch
    from tqdm.auto import tqdm

    for start in tqdm(range(0, settings.n_sequences, bs), desc="scoring", disable=not progress):
        tok = rep[start:start + bs].to(device)
        qm = qmask[start:start + bs].to(device)
        out = model(input_ids=tok, output_attentions=True, use_cache=False)
        attns = out.attentions
        if not attns or attns[0] is None:
            raise RuntimeError("the model returned no attention probabilities: load it with "
                               "attn_implementation='eager' for scoring")
        weight = qm.sum().item()
        for layer in range(L):
            per_head = prefix_matching(attns[layer].float(), tok, qm).double().cpu()
            prefix_sum[layer] += per_head * weight
        per_sequence.append(torch.stack(
            [prefix_matching_per_sequence(attns[layer].float(), tok, qm).double().cpu()
             for layer in range(L)], 1))
        n_query += weight
        # copying on non-repeated sequences, through the head's real direct path
        tok = plain[start:start + bs].to(device)
        with hook_z(sites, lambda i, z: store.__setitem__(i, z.detach())):
            out = model(input_ids=tok, output_attentions=True, use_cache=False)
        b, t = tok.shape
        pos = slice(1 if bos is not None else 0, t)
        for layer in range(L):
            z = store[layer].float().reshape(b, t, H, sites.head_dim)[:, pos]  # [b, q, h, d]
            direct = torch.einsum("bqhd,hdm->bqhm", z, w_o[layer])  # [b, q, h, hidden]
            normed = sites.direct_path(layer, direct)  # [b, q, h, unembed inputs]
            attn = out.attentions[layer].float()[:, :, pos]  # [b, h, q, T]
            attended = attn.argmax(-1)  # [b, h, q]
            att_tok = torch.gather(tok[:, None, :].expand(-1, H, -1), 2, attended)  # [b, h, q]
            normed = normed.permute(0, 2, 1, 3)  # [b, h, q, unembed inputs]
            scores = []
            for i in range(b):
                uniq = torch.unique(tok[i, pos])
                scores.append(copying_from_logits(*_direct_logits(
                    sites, normed[i], unembed_w, mean_row, att_tok[i], uniq)))
            copy_sum[layer] += torch.stack(scores).sum((0, 2)).double().cpu()
        n_copy += b * (t - (1 if bos is not None else 0))
    prefix = (prefix_sum / max(n_query, 1)).numpy()
    copying = (copy_sum / max(n_copy, 1)).numpy()
    from ih_sweep.heads.stability import standard_error

    samples = torch.cat(per_sequence).numpy() if per_sequence else np.zeros((0, L, H))
    se = standard_error(samples)
    rows = []
    for layer in range(L):
        for head in range(H):
            rows.append({"model": model_name, "layer": layer, "head": head,
                         "prefix": float(prefix[layer, head]),
                         "copying": float(copying[layer, head]),
                         "combined": float(combined_score(prefix[layer, head],
                                                          copying[layer, head])),
                         "n_sequences": settings.n_sequences, "seed": settings.seed,
                         "prefix_se": float(se[layer, head])})
    return pd.DataFrame(rows, columns=INDUCTION_COLUMNS), samples


def _unembed_weight(sites: HeadSites) -> torch.Tensor:
    from ih_sweep.model.architecture import linear_weight

    return linear_weight(sites.unembed).float()


def _direct_logits(sites: HeadSites, x: torch.Tensor, unembed_w: torch.Tensor,
                   mean_row: torch.Tensor, att_tok: torch.Tensor, uniq: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`copying_from_logits` needs of one sequence's direct-path logits
    ``softcap(x @ unembed_w.T)``: (mean over the vocabulary [h, q], the attended token's
    logit [h, q], the sequence's distinct tokens' logits [h, q, U]). x: [h, q, d]. Without
    a softcap the mean is mean_row . x (no [h, q, V] tensor); with one (Gemma-2) the full
    logits are computed head by head."""
    if sites.logit_softcap is None:
        return (x @ mean_row, (x * unembed_w[att_tok]).sum(-1),
                x @ unembed_w[uniq].T)
    means, atts, seqs = [], [], []
    for head in range(x.shape[0]):
        full = sites.softcap(x[head] @ unembed_w.T)  # [q, V]
        means.append(full.mean(-1))
        atts.append(full.gather(-1, att_tok[head][:, None])[:, 0])
        seqs.append(full[:, uniq])
    return torch.stack(means), torch.stack(atts), torch.stack(seqs)


# --------------------------------------------------------------------------- score tables
class ScoreFileError(UserError):
    """A score file a user gave (scoring.file) that cannot be used as a score table."""

    kind = "score file"


MAX_SCORE_COLUMNS = 256  # a score table: layer, head, model, 4 scores, n_sequences, seed
MAX_SCORE_FILE_BYTES = 64 << 20  # a 1,024-head table is ~100 KB; the notebook's pickle 10 KB


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array/scalar/dtype reconstructors
    (and ``_codecs.encode``, which protocols 0-2 use to write bytes)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it asks for {module}.{name}, and a score pickle may hold only numpy arrays, "
            "scalars and dtypes (nothing else is loaded)")


def _read_bytes(path: Path) -> bytes:
    problem = unreadable(path)
    if problem is not None:
        raise ScoreFileError(f"scoring.file={path}: {problem}")
    size = path.stat().st_size
    if size == 0:
        raise ScoreFileError(f"scoring.file={path}: the file is empty")
    if size > MAX_SCORE_FILE_BYTES:
        raise ScoreFileError(f"scoring.file={path}: {size:,} bytes; a score table is far "
                             f"smaller (at most {MAX_SCORE_FILE_BYTES:,} bytes are read)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ScoreFileError(f"scoring.file={path}: cannot be read "
                             f"({err.strerror or type(err).__name__})") from None


LAYER_SHAPE = "expected a 1-D array of the layer's head scores (the notebook's: shape (32,))"


def layer_scores(path: Path, layer: int, value: Any) -> np.ndarray:
    """One layer's scores of a score pickle as floats: a 1-D array (or list) of numbers,
    one a head, NaN for an unscored head. Raises :class:`ScoreFileError` naming the file,
    the layer key and the shape or type found for anything else (a (4, 8) array is not
    flattened into 32 heads, a scalar is not one head, strings are not parsed)."""
    where = f"scoring.file={path}: layer {layer}"
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise ScoreFileError(f"{where}: a ragged or mixed sequence, not an array of numbers; "
                             f"{LAYER_SHAPE}") from None
    if arr.dtype.kind not in "iuf":
        raise ScoreFileError(f"{where}: holds {type(value).__name__} of dtype {arr.dtype}, "
                             f"not numbers; {LAYER_SHAPE}")
    if arr.ndim != 1 or arr.size == 0:
        raise ScoreFileError(f"{where}: {type(value).__name__} of shape {arr.shape}; "
                             f"{LAYER_SHAPE}")
    return arr.astype(float)


def load_seed_scores(path: str | Path, model_name: str = "notebook") -> pd.DataFrame:
    """Read the notebook's ``ih_scores_dict.pkl`` (layer -> per-head scores, pickle
    protocols 0-5) without plain ``pickle.load``: only numpy reconstructors may appear in
    the file; anything else, a truncated file or another structure is refused with a
    :class:`ScoreFileError`.

    The notebook's numbers are its combined score; they go in every score column so any
    ``rank_by`` reproduces its ranking, and ``n_sequences``/``seed`` are left empty.
    """
    path = Path(path)
    blob = _read_bytes(path)
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(blob)).load()
    except (pickle.UnpicklingError, EOFError) as err:
        why = str(err) or "the pickle ends early (truncated)"
        raise ScoreFileError(f"scoring.file={path}: not loaded: {why}") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            OverflowError, RecursionError, UnicodeDecodeError) as err:
        raise ScoreFileError(f"scoring.file={path}: not a readable score pickle "
                             f"({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(obj, dict) or not obj:
        raise ScoreFileError(f"scoring.file={path}: expected a non-empty dict of layer -> "
                             f"per-head scores, got {type(obj).__name__}")
    rows = []
    first: tuple[int, int] | None = None  # (layer, heads) of the first layer
    for layer in obj:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ScoreFileError(f"scoring.file={path}: layer key {layer!r} is not an "
                                 "integer >= 0")
        values = layer_scores(path, int(layer), obj[layer])
        first = first or (int(layer), len(values))
        if len(values) != first[1]:
            raise ScoreFileError(f"scoring.file={path}: layers hold different numbers of "
                                 f"heads (layer {first[0]}: {first[1]}, layer {layer}: "
                                 f"{len(values)}); every layer needs one score per head")
        for head, value in enumerate(values):
            rows.append({"model": model_name, "layer": int(layer), "head": head,
                         "prefix": float(value), "copying": float("nan"),
                         "combined": float(value), "n_sequences": None, "seed": None})
    df = pd.DataFrame(rows, columns=SCORE_COLUMNS).sort_values(["layer", "head"])
    return check_score_table(df.reset_index(drop=True), path)


def check_score_table(df: pd.DataFrame, source: str | Path, first_line: int = 2
                      ) -> pd.DataFrame:
    """A score table's own consistency: integer layer and head ids >= 0, each (layer, head)
    once, numeric scores, some score finite. Raises :class:`ScoreFileError` naming the
    file and the first bad line (CSV line numbers: the header is line 1)."""
    def line(i) -> str:
        return f"{source}:{int(i) + first_line}"

    def shown(value) -> str:
        return repr(value.item() if hasattr(value, "item") else value)

    for col in ("layer", "head"):
        ids = pd.to_numeric(df[col], errors="coerce")
        bad = ids.isna() | (ids < 0) | (ids != ids.round())
        if bad.any():
            i = bad.idxmax()
            raise ScoreFileError(f"scoring.file={line(i)}: {col}={shown(df[col][i])}; ids are "
                                 "integers >= 0 (0-based)")
        df[col] = ids.astype(int)
    dup = df.duplicated(["layer", "head"])
    if dup.any():
        i = dup.idxmax()
        raise ScoreFileError(f"scoring.file={line(i)}: layer {df.layer[i]} head {df['head'][i]} "
                             "appears twice; each head needs exactly one row")
    present = [c for c in SCORE_NAMES if c in df.columns]
    for col in present:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")
        if bad.any():
            i = bad.idxmax()
            raise ScoreFileError(f"scoring.file={line(i)}: {col}={shown(df[col][i])} is not a "
                                 "number")
        df[col] = values
    values = df[present].to_numpy(dtype=float)
    if np.isinf(values).any():
        i = int(np.argwhere(np.isinf(values))[0][0])
        raise ScoreFileError(f"scoring.file={line(i)}: an infinite score; scores are finite "
                             "numbers (an empty cell: an unscored head)")
    if not np.isfinite(values).any():
        raise ScoreFileError(f"scoring.file={source}: no finite score in "
                             f"{', '.join(present)}")
    return df


def load_score_file(path: str | Path, model_name: str | None = None) -> pd.DataFrame:
    """A user-supplied score table: our CSV (``.csv``: columns ``layer``, ``head`` and one
    or more of prefix/copying/combined/fv), or the notebook's pickle (``.pkl``/``.pickle``,
    no fv); a leading ``~`` is the home folder. Raises :class:`ScoreFileError` for another
    suffix, a file that cannot be read (:func:`ih_sweep.data.files.unreadable`) or is not
    a score table."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".pkl", ".pickle"):
        return load_seed_scores(path, model_name or "notebook")
    if path.suffix.lower() != ".csv" and unreadable(path) is None:
        raise ScoreFileError(f"scoring.file={path}: the name ends in "
                             f"{path.suffix or 'no suffix'}; allowed: a score table .csv "
                             "or the notebook's pickle .pkl / .pickle")
    blob = _read_bytes(path)
    columns = blob[:blob.find(b"\n") if b"\n" in blob else len(blob)].count(b",") + 1
    if columns > MAX_SCORE_COLUMNS:  # pandas would take minutes over a huge header
        raise ScoreFileError(f"scoring.file={path}: its first line has {columns:,} columns; a "
                             f"score table has layer, head and a few score columns (at most "
                             f"{MAX_SCORE_COLUMNS})")
    try:
        df = pd.read_csv(io.BytesIO(blob))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ScoreFileError(f"scoring.file={path}: not a CSV table ({str(err)[:120]})"
                             ) from None
    missing = {"layer", "head"} - set(df.columns)
    if missing or not set(SCORE_NAMES) & set(df.columns):
        raise ScoreFileError(f"scoring.file={path}: a score table needs columns layer, head "
                             f"and one of {', '.join(SCORE_NAMES)}; it has "
                             f"{', '.join(map(str, df.columns)) or 'none'}")
    if df.empty:
        raise ScoreFileError(f"scoring.file={path}: the table has a header but no rows")
    df = check_score_table(df, path)
    for col in SCORE_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[SCORE_COLUMNS]
