"""Position-wise mean and resample ablation (issue #18 item 3): the absolute positions the
hook reads in every kind of pass, the fills themselves against a by-hand computation, the
donor draw, and the evaluator's outcomes against one-story-at-a-time ``generate`` with the
same hook (tiny model, N=8, batch sizes 1 and 32, the cache-decoding and generate paths,
scope all), also on a GPT-2 random model (absolute position embeddings) padded either side."""

from __future__ import annotations

import pytest
import torch
from families import CONFIGS, save_model

from ih_sweep import data
from ih_sweep.ablation.donors import (
    Donors,
    donor_texts,
    draw_donors,
    prompt_lengths,
    resample_donors,
)
from ih_sweep.ablation.hooks import AblationError, ablate_heads, row_dependent, sequence_keys
from ih_sweep.ablation.means import position_means, reference_batches
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig
from ih_sweep.evaluation import decoding, runner
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation.evaluator import evaluate, is_correct
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.architecture import PositionsUnknown, head_sites, hook_z, token_positions
from ih_sweep.model.loading import load_model
from ih_sweep.testing import generate_one_at_a_time

KINDS = ("position_mean", "resample")


class _Cache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


def test_token_positions_from_mask_ids_and_cache(tiny):
    model, _ = tiny
    ids = torch.ones(2, 4, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    pos = token_positions(model, (), {"input_ids": ids, "attention_mask": right})
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]  # pads: 0
    pos = token_positions(model, (ids,), {"attention_mask": left})  # positional input_ids
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    # 5 cached tokens, the mask covering them (row 1: two of them masked out)
    mask = torch.tensor([[1] * 9, [1, 1, 1, 0, 0, 1, 1, 1, 1]])
    pos = token_positions(model, (), {"input_ids": ids, "attention_mask": mask,
                                      "cache": _Cache(5)})
    assert pos.tolist() == [[5, 6, 7, 8], [3, 4, 5, 6]]
    agreeing = torch.tensor([[5, 6, 7, 8], [3, 4, 5, 6]])
    assert torch.equal(token_positions(model, (), {
        "input_ids": ids, "attention_mask": mask, "past_key_values": _Cache(5),
        "position_ids": agreeing}), agreeing)
    assert token_positions(model, (), {"input_ids": ids, "position_ids": torch.tensor(
        [[7, 8, 9, 10]])}).tolist() == [[7, 8, 9, 10]] * 2
    assert token_positions(model, (), {"input_ids": ids, "cache": _Cache(3)}).tolist() == \
        [[3, 4, 5, 6]] * 2
    with pytest.raises(PositionsUnknown, match=r"expected \[2, 9\]"):
        token_positions(model, (), {"input_ids": ids, "attention_mask": right,
                                    "cache": _Cache(5)})
    with pytest.raises(PositionsUnknown, match="disagree"):
        token_positions(model, (), {"input_ids": ids, "attention_mask": right,
                                    "position_ids": torch.arange(1, 5)[None]})
    with pytest.raises(PositionsUnknown, match="without input_ids"):
        token_positions(model, (), {"attention_mask": right})


@pytest.fixture(scope="module")
def fills(tiny, tiny_prefix):
    """The tiny model's top-8 heads, 60 last-question items, their position-wise means
    (over the 60 prompts) and resample donors (seed 0)."""
    model, tok = tiny
    heads = select_heads(tiny_prefix, "high", 8)
    items = data.make_items(data.generate_stories(60, seed=31), "last")
    means = position_means(model, reference_batches(tok, items, 64, model))
    texts, needed = donor_texts(tok, items, 3)
    donors = resample_donors(model, tok, texts, heads, 0, means, needed)
    return heads, items, {"position_mean": means, "resample": donors}


def test_end_alignment_puts_each_donor_at_its_own_prompts_end(tiny, fills):
    """ablation.align=end: at the deciding token (the prompt's last, whose logits give the
    answer) every story's donor sits at its own prompt's last token, the same role in the
    prompt (in the notebook's format the same token), and the generated positions meet the
    donor's answer; the hook fills exactly that donor output there. Absolute alignment
    (the same donors) meets the same token at that position far less often."""
    model, tok = tiny
    heads, items, by_kind = fills
    start: Donors = by_kind["resample"]
    texts, needed = donor_texts(tok, items, 3)
    prompts = prompt_lengths(needed, 3)
    end = resample_donors(model, tok, texts, heads, 0, start.fallback, needed,
                          prompts=prompts)
    assert end.donor_of == start.donor_of and not start.shift  # the draw is the same
    ids = {k: tok(t)["input_ids"] for k, t in texts.items()}
    last = {it.story_index: it for it in items}
    same_end = same_start = 0
    for k, d in end.donor_of.items():
        own = tok(last[k].prompt)["input_ids"]
        assert len(own) == prompts[k] and ids[k][:prompts[k]] == own
        p = prompts[k] - 1  # the deciding position
        assert p + end.shift[k] == prompts[d] - 1  # the donor's own deciding position
        same_end += ids[d][p + end.shift[k]] == own[p]
        same_start += p < len(ids[d]) and ids[d][p] == own[p]
        # the answer slot: the first generated position meets the donor's first answer token
        assert tok.decode(ids[d][prompts[d]:]).strip().startswith(last[d].answer)
    assert same_end == len(end.donor_of) == 60
    assert same_start < 45
    # the hook: a right-padded batch of two stories' prompts, the donor output at p + shift
    layer, cols = heads[0][0], end.columns[heads[0][0]]
    stories = [items[0].story_index, items[1].story_index]
    enc = [tok(items[i].prompt)["input_ids"] for i in (0, 1)]
    width = max(map(len, enc))
    batch = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])

    def run():
        with sequence_keys(model, stories):
            model(input_ids=batch, attention_mask=mask)

    with ablate_heads(model, heads, "resample", end):
        z = _replaced(model, layer, run)
    for b, (e, k) in enumerate(zip(enc, stories)):
        d = end.donor_of[k]
        clean: list[torch.Tensor] = []
        with hook_z(model, lambda i, x, out=clean: out.append(x[0].detach().clone()),
                    [layer]):
            model(input_ids=torch.tensor([ids[d]]))
        shift = end.shift[k]
        inside = [p for p in range(len(e)) if 0 <= p + shift < len(ids[d])]
        assert len(e) - 1 in inside
        torch.testing.assert_close(z[b, inside][:, cols], clean[0][[p + shift for p in inside]]
                                   [:, cols], rtol=0, atol=1e-5)
        outside = [p for p in range(len(e)) if p + shift < 0]
        if outside:  # before the donor's start: the position-wise mean
            table = end.fallback.table[layer][:, cols]
            torch.testing.assert_close(z[b, outside][:, cols], table[outside], rtol=0,
                                       atol=1e-6)


def _replaced(model, layer, run) -> torch.Tensor:
    """The o_proj input of ``layer`` after the ablation's hook (a later pre-hook sees it)."""
    seen = []
    handle = head_sites(model).out_proj[layer].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_position_means_are_means_per_position_over_references(tiny):
    """Row p: the mean over the references longer than p (each run alone, unpadded); the
    last row: the mean over every reference token."""
    model, tok = tiny
    prompts = ["Mary went to the kitchen.", "John moved to the garden. Where is John?",
               "Sandra journeyed to the office. Daniel went back to the hallway."]
    enc = tok(prompts, return_tensors="pt", padding=True)
    means = position_means(model, [{k: enc[k] for k in ("input_ids", "attention_mask")}])
    alone = []
    with hook_z(model, lambda i, z: alone.append((i, z[0].detach().clone()))):
        for p in prompts:
            model(input_ids=torch.tensor([tok(p)["input_ids"]]))
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert means.counts.tolist() == [sum(n > p for n in lengths) for p in range(max(lengths))]
    for layer in (0, 1):
        zs = [z for i, z in alone if i == layer]
        table = means.table[layer]
        assert table.shape[0] == max(lengths) + 1
        for p in (0, min(lengths) - 1, min(lengths), max(lengths) - 1):
            want = torch.stack([z[p] for z in zs if z.shape[0] > p]).mean(0)
            torch.testing.assert_close(table[p], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(table[-1], torch.cat(zs).mean(0), rtol=0, atol=1e-5)
    assert torch.equal(means.rows(torch.tensor([0, 5, max(lengths), 10 ** 4])),
                       torch.tensor([0, 5, max(lengths), max(lengths)]))


def test_the_hook_fills_by_absolute_position_whatever_the_padding(tiny, fills):
    """A left-padded batch: position_mean puts table row p at the token of position p;
    resample puts the donor's own clean output at p there (the donor's text run alone);
    past the donor's end, the position-wise mean."""
    model, tok = tiny
    heads, items, by_kind = fills
    donors: Donors = by_kind["resample"]
    layer = heads[0][0]
    cols = donors.columns[layer]
    stories = [items[0].story_index, items[1].story_index]
    prompts = [items[0].prompt, items[1].prompt[:200]]
    enc = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])

    def run():
        with sequence_keys(model, stories):
            model(input_ids=ids, attention_mask=mask)

    with ablate_heads(model, heads, "position_mean", by_kind["position_mean"]):
        z = _replaced(model, layer, run)
    table = by_kind["position_mean"].table[layer][:, cols]
    for b, e in enumerate(enc):
        start = width - len(e)
        torch.testing.assert_close(z[b, start:, cols], table[:len(e)], rtol=0, atol=0)
    with ablate_heads(model, heads, "resample", donors):
        z = _replaced(model, layer, run)
    texts, _ = donor_texts(tok, items, 3)
    for b, (e, story) in enumerate(zip(enc, stories)):
        donor = donors.donor_of[story]
        assert donor != story
        clean: list[torch.Tensor] = []
        with hook_z(model, lambda i, x, out=clean: out.append(x[0].detach().clone()),
                    [layer]):
            model(input_ids=torch.tensor([tok(texts[donor])["input_ids"]]))
        start = width - len(e)
        n = min(len(e), clean[0].shape[0])
        torch.testing.assert_close(z[b, start:start + n, cols], clean[0][:n, cols],
                                   rtol=0, atol=1e-5)
    # a donor text shorter than the row: the position-wise mean past its end
    short = Donors(donors.donor_of, donors.row_of,
                   {k: v[:, :10] for k, v in donors.values.items()},
                   donors.lengths.clamp(max=10), donors.heads, donors.columns,
                   donors.fallback)
    with ablate_heads(model, heads, "resample", short):
        z = _replaced(model, layer, run)
    start = width - len(enc[0])
    torch.testing.assert_close(z[0, start + 10:, cols], table[10:len(enc[0])], rtol=0, atol=0)


def test_unknown_positions_or_rows_fail_loudly(tiny, fills):
    model, _ = tiny
    heads, _, by_kind = fills
    ids = torch.tensor([[1, 5, 6, 7]])
    with ablate_heads(model, heads, "position_mean", by_kind["position_mean"]):
        with pytest.raises(PositionsUnknown, match="outside a forward call"):
            model.model(input_ids=ids)  # the decoder called directly: no position hook
        with pytest.raises(PositionsUnknown, match="expected"):
            model(input_ids=ids, attention_mask=torch.ones(1, 9, dtype=torch.long))
        model(input_ids=ids)  # and the model still works after a failed call
    with ablate_heads(model, heads, "resample", by_kind["resample"]):
        assert row_dependent(model)
        with pytest.raises(AblationError, match="did not say which sequence"):
            model(input_ids=ids)
        with sequence_keys(model, [0, 1]), pytest.raises(AblationError, match="1 rows but 2"):
            model(input_ids=ids)
        with sequence_keys(model, [10 ** 6]), pytest.raises(AblationError, match="no donor"):
            model(input_ids=ids)
        with pytest.raises(AblationError, match="unablated model"):
            resample_donors(model, tiny[1], {0: "a", 1: "b"}, heads, 0,
                            by_kind["position_mean"])
    assert not row_dependent(model)
    with pytest.raises(AblationError, match="position-wise means"):
        with ablate_heads(model, heads, "position_mean", {0: torch.zeros(512)}):
            pass
    with pytest.raises(AblationError, match="other heads"):
        with ablate_heads(model, heads[:-1], "resample", by_kind["resample"]):
            pass
    with pytest.raises(AblationError, match="allowed values: zero, mean, position_mean, "
                                            "resample"):
        with ablate_heads(model, heads, "shuffle"):
            pass


def test_donor_draw():
    lengths = {s: 150 + s % 7 for s in range(40)}
    needed = {s: n for s, n in lengths.items()}
    donors = draw_donors(lengths, 0, needed)
    assert sorted(donors) == list(range(40))
    assert all(d != s and lengths[d] >= needed[s] for s, d in donors.items())
    # depends only on the seed, each story and the lengths: not on their order
    assert draw_donors(dict(reversed(list(lengths.items()))), 0, needed) == donors
    assert draw_donors(lengths, 1, needed) != donors
    assert len(set(donors.values())) > 10  # drawn, not one long story for everyone
    # the longest story has no other as long: among the longest others
    lengths[7] = 999
    assert draw_donors(lengths, 0, {7: 999})[7] in {s for s in lengths
                                                     if s != 7 and lengths[s] == 156}
    with pytest.raises(AblationError, match="at least 2 stories"):
        draw_donors({3: 10}, 0)


def _outcomes(results):
    return [(r.item.story_index, r.correct, r.continuation, r.decided_by) for r in results]


@pytest.mark.parametrize("kind", KINDS)
def test_evaluator_equals_one_at_a_time_generate_and_batch_size(tiny, fills, kind):
    """60 items, N=8: every outcome equals one-story-at-a-time ``generate`` under the same
    hook; batch sizes 1 (many batches, two at once on CPU) and 32 agree item for item."""
    model, tok = tiny
    heads, items, by_kind = fills
    with ablate_heads(model, heads, kind, by_kind[kind]):
        big = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=32))
        one = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=1,
                                                     cpu_workers=2))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    assert _outcomes(big) == _outcomes(one)
    for r, c in zip(big, ref):
        assert r.correct == is_correct(c, r.item.answer, "contains"), r.item.story_index
        assert c.startswith(r.continuation)
        if r.decided_by != "forward":
            assert r.continuation == c
    assert sum(not r.correct for r in big) >= 5  # the ablation produced errors
    assert any(r.decided_by == "decode" for r in big)  # continued from the cache
    with ablate_heads(model, heads, "zero"):
        zero = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=32))
    assert [r.continuation for r in zero] != [r.continuation for r in big]  # not zero's


@pytest.mark.parametrize("kind", KINDS)
def test_generate_fallback_and_every_question(tiny, fills, kind, monkeypatch):
    """scope=all (several items per row, a shared header): the cache-decoding and the
    generate (left-padded) paths give the same outcomes, equal to one-at-a-time generate;
    resample runs the shared header in every row, position_mean keeps the shortcut."""
    model, tok = tiny
    heads, _, by_kind = fills
    items = data.make_items(data.generate_stories(60, seed=31)[:8], "all")
    shared = []
    real = evaluation.shared_prefix_length

    def spy(rows):
        shared.append(real(rows))
        return shared[-1]

    monkeypatch.setattr(decoding, "shared_prefix_length", spy)
    with ablate_heads(model, heads, kind, by_kind[kind]):
        cached = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=5))
        assert row_dependent(model) == (kind == "resample")
        monkeypatch.setattr(runner, "reusable_cache", lambda *a: None)
        fallback = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=5))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    assert max(shared) >= evaluation.MIN_SHARED_PREFIX  # there is a header to share
    assert {r.decided_by for r in fallback} == {"forward", "generate"}
    assert [(r.correct, r.continuation) for r in cached] == \
        [(r.correct, r.continuation) for r in fallback]
    for r, c in zip(fallback, ref):
        assert r.correct == is_correct(c, r.item.answer, "contains")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = save_model(CONFIGS["gpt2"], tmp_path_factory.mktemp("kinds") / "gpt2")
    return load_model(ModelConfig(name="gpt2", path=str(folder), dtype=DType.float32),
                      QuantizationConfig(), "cpu")


@pytest.mark.parametrize("side", ["left", "right"])
def test_absolute_position_family_either_padding_side(gpt2, side, monkeypatch):
    """GPT-2 (learned absolute positions, Conv1D c_proj): the references padded on either
    side give the same position-wise means, and the evaluator's generate path (left
    padding) equals one-at-a-time generate under both kinds."""
    model, tok = gpt2
    monkeypatch.setattr(tok, "padding_side", side)
    items = data.make_items(data.generate_stories(10, seed=5), "last")
    heads = [(0, 1), (1, 0), (1, 3)]
    means = position_means(model, reference_batches(tok, items, 10, model, batch_size=4))
    alone = position_means(model, reference_batches(tok, items, 10, model, batch_size=1))
    for layer in means.table:
        torch.testing.assert_close(means.table[layer], alone.table[layer], rtol=0, atol=1e-5)
    texts, needed = donor_texts(tok, items, 3)
    fill = {"position_mean": means,
            "resample": resample_donors(model, tok, texts, heads, 3, means, needed)}
    monkeypatch.setattr(runner, "reusable_cache", lambda *a: None)
    for kind in KINDS:
        with ablate_heads(model, heads, kind, fill[kind]):
            got = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=4))
            ref = [generate_one_at_a_time(model, tok, it) for it in items]
        assert any(r.decided_by == "generate" for r in got)
        for r, c in zip(got, ref):
            assert r.correct == is_correct(c, r.item.answer, "contains")
            if r.decided_by != "forward":
                assert r.continuation == c



# --------------------------------------------------------------------------- config and job
def test_config_groups_and_their_hash():
    from compose_config import compose

    from ih_sweep.config.hydra import settings
    from ih_sweep.config.identity import config_hash, semantic_config

    for kind in KINDS:
        cfg = settings(compose(f"ablation={kind}"))
        assert cfg.ablation.method == kind and cfg.ablation.n_reference == 64
    # the donor seed counts for resample only (jobs of the other methods keep their hashes)
    assert "seed" not in semantic_config(compose())["ablation"]
    assert config_hash(compose("ablation=mean", "ablation.seed=3")) == \
        config_hash(compose("ablation=mean"))
    assert config_hash(compose("ablation=resample", "ablation.seed=3")) != \
        config_hash(compose("ablation=resample"))
    assert config_hash(compose("ablation=resample")) != \
        config_hash(compose("ablation=position_mean"))


@pytest.mark.parametrize(("overrides", "message"), [
    (("job=scan", "ablation=position_mean"), "ablation.method='position_mean' is not allowed; "
                                             "job=scan zeroes each head"),
    (("ablation=resample", "data.n_stories=1"), "resample needs donor stories: "
                                                "data.n_stories=1"),
    (("ablation=resample", "ablation.seed=-1"), "ablation.seed=-1 is not allowed"),
])
def test_bad_combinations_are_one_line_config_errors(overrides, message):
    from compose_config import compose

    from ih_sweep.config.errors import ConfigError
    from ih_sweep.config.hydra import settings

    with pytest.raises(ConfigError, match=message) as err:
        settings(compose(*overrides))
    assert "\n" not in str(err.value)


def test_jobs_record_the_method(tmp_path, caplog):
    """debug=fast jobs of both kinds: results.csv's and job.json's ``ablation`` say which,
    and resample logs its donor draw."""
    import logging

    import pandas as pd
    from compose_config import run_job

    caplog.set_level(logging.INFO)
    for kind in KINDS:
        out = tmp_path / kind
        record = run_job(out, "debug=fast", "n_heads=8", f"ablation={kind}",
                         f"paths.cache_dir={tmp_path}/cache")
        assert record.ablation == kind and record.n_items == 20
        assert set(pd.read_csv(out / "results.csv")["ablation"]) == {kind}
    assert "resample ablation: donors drawn with ablation.seed=0 among 20 stories" in \
        caplog.text
