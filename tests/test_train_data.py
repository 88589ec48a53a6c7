"""Data: record formats, templating, batch layout, and the data schedule's guarantees."""

from __future__ import annotations

import pytest
import torch

from kdext.train.data import DataError, DataSchedule, Encoded, collate, format_prompt, load_jsonl


def test_prompt_and_dolly_records(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"prompt": "say hi", "response": "hi"}\n'
        "\n"
        '{"instruction": "sum", "context": "1 and 2", "response": "3"}\n'
        '{"instruction": "name one", "context": "", "response": ["a", "b"]}\n'
    )
    ex = load_jsonl(str(f), template="Q: {prompt}\nA:")
    assert [e.prompt for e in ex] == ["Q: say hi\nA:", "Q: sum\n\n1 and 2\nA:", "Q: name one\nA:"]
    assert [e.references for e in ex] == [["hi"], ["3"], ["a", "b"]]
    assert ex[2].response == "a"  # training uses the first reference
    with pytest.raises(DataError, match=r"has no '\{prompt\}' field"):
        load_jsonl(str(f), template="no field")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(str(empty))
    assert format_prompt({"instruction": "x", "context": None}) == "x\n"


def test_collate_layout():
    enc = [Encoded([5, 6, 7], [8, 1]), Encoded([9], [10, 11, 12, 1])]
    b = collate(enc, pad_id=0, index=[3, 4])
    assert b.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 9]]  # left padded
    assert b.prompt_mask.tolist() == [[True] * 3, [False, False, True]]
    assert b.response_ids.tolist() == [[8, 1, 0, 0], [10, 11, 12, 1]]  # right padded
    assert b.response_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert b.input_ids.shape == (2, 7) and b.index.tolist() == [3, 4]


def test_schedule_is_layout_independent_and_covers_epochs():
    n = 10
    one = DataSchedule(n, batch_size=4, grad_accum=1, world_size=1, seed=3)
    two = DataSchedule(n, batch_size=2, grad_accum=1, world_size=2, seed=3)
    acc = DataSchedule(n, batch_size=1, grad_accum=2, world_size=2, seed=3)
    for step in range(7):  # crosses several epoch boundaries (10 is not a multiple of 4)
        want = one.rows(step, 0, 0)
        got = two.rows(step, 0, 0)[0] + two.rows(step, 1, 0)[0]
        got_acc = [i for r in range(2) for a in range(2) for i in acc.rows(step, r, a)[0]]
        assert got == want[0] and got_acc == want[0]
        assert two.rows(step, 1, 0)[1] == [2, 3]  # positions in the global batch
    # every epoch visits every example once, in a fresh order
    seq = [i for step in range(5) for i in one.rows(step, 0, 0)[0]]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert seq[:10] != seq[10:20]
    assert one.epoch(5) == 2.0
    with pytest.raises(DataError):
        DataSchedule(0, 1, 1, 1, 0)


def test_encode_truncates_and_appends_eos(tmp_path_factory):
    from kdext.train.data import Example, encode
    from kdext.train.models import load_tokenizer

    from train_fixtures import tiny as fixtures

    tok = load_tokenizer(fixtures.get(tmp_path_factory)["tok"])
    e = encode(tok, Example("pick one: cat dog red\n", ["dog"]), max_prompt_len=4, max_response_len=16)
    assert len(e.prompt_ids) == 4 and e.prompt_ids == tok("pick one: cat dog red\n")["input_ids"][-4:]
    assert e.response_ids[-1] == tok.eos_token_id and tok.decode(e.response_ids[:-1]) == "dog"
    assert torch.tensor(e.response_ids).dtype == torch.int64
