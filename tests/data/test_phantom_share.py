"""PhantomShare: processes reading one phantom set side by side generate each phantom once and get the records they
would have generated themselves."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medvl.data import collate
from medvl.data.phantom_share import PhantomShare
from medvl.data.sources import synthetic_dataset

SIZE = (32, 32, 16)


class Maker:
    """A record factory that counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, index):
        self.calls.append(index)
        return {"index": index, "volume": np.full((4, 4), index, np.int16), "text": f"phantom {index}"}


def _same(a, b):
    return a["index"] == b["index"] and a["text"] == b["text"] and np.array_equal(a["volume"], b["volume"])


def test_each_record_is_generated_once_and_read_by_every_other_consumer(tmp_path):
    shares = [PhantomShare(tmp_path, consumers=3) for _ in range(3)]
    makers = [Maker() for _ in range(3)]
    first = shares[0].records("set", [4, 5, 6], makers[0])
    # the others find every record claimed: they take a ticket each, in any order of indices
    second = shares[1].records("set", [6, 4, 5], makers[1])
    third = shares[2].records("set", [5, 6, 4], makers[2])
    assert makers[0].calls == [4, 5, 6] and makers[1].calls == [] and makers[2].calls == []
    expected = {i: Maker()(i) for i in (4, 5, 6)}
    for records, order in ((first, [4, 5, 6]), (second, [6, 4, 5]), (third, [5, 6, 4])):
        assert all(_same(r, expected[i]) for r, i in zip(records, order))
    assert [(s.generated, s.read) for s in shares] == [(3, 0), (0, 3), (0, 3)]
    # every ticket was taken: only the empty claims are left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set-4.claim", "set-5.claim", "set-6.claim"]
    assert all(p.stat().st_size == 0 for p in tmp_path.iterdir())


def test_processes_in_step_split_a_batch(tmp_path):
    """Two consumers asking for the same batch each generate what they claim first: nobody generates it all."""
    a, b = PhantomShare(tmp_path, consumers=2), PhantomShare(tmp_path, consumers=2)
    make_a, make_b = Maker(), Maker()
    a.records("set", [0, 1], make_a)         # a is one batch ahead
    b_records = b.records("set", [0, 1, 2, 3], make_b)  # b reads a's two and generates the rest
    a_records = a.records("set", [2, 3], make_a)
    assert make_a.calls == [0, 1] and make_b.calls == [2, 3]
    assert all(_same(r, Maker()(i)) for r, i in zip(b_records, range(4)))
    assert all(_same(r, Maker()(i)) for r, i in zip(a_records, (2, 3)))


def test_a_second_read_generates_again_and_keys_keep_sets_apart(tmp_path):
    a, b = PhantomShare(tmp_path, consumers=2), PhantomShare(tmp_path, consumers=2)
    make_a, make_b = Maker(), Maker()
    a.records("set", [1], make_a)
    b.records("set", [1], make_b)
    # b's ticket is used: reading phantom 1 again, b makes it itself instead of waiting for a ticket that never comes
    b.records("set", [1], make_b)
    a.records("set", [1], make_a)
    assert make_a.calls == [1, 1] and make_b.calls == [1]
    # another set's phantom 1 is a different record
    b.records("other", [1], make_b)
    assert make_b.calls == [1, 1] and (tmp_path / "other-1.claim").exists()


def test_a_claim_nobody_fulfils_times_out_into_generating(tmp_path):
    (tmp_path / "set-3.claim").touch()  # as if its claimer died before writing it
    share = PhantomShare(tmp_path, consumers=2, timeout=0.05)
    make = Maker()
    records = share.records("set", [3, 4], make)
    # what it could claim came first, the wait after it (in step, two processes would otherwise take turns waiting)
    assert make.calls == [4, 3] and (share.generated, share.read) == (2, 0)
    assert all(_same(r, Maker()(i)) for r, i in zip(records, (3, 4)))


def test_bad_arguments_name_themselves(tmp_path):
    for consumers in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="consumers must be an integer >= 2"):
            PhantomShare(tmp_path, consumers=consumers)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        PhantomShare(tmp_path, consumers=2, timeout=0)
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        PhantomShare(tmp_path / "missing", consumers=2)
    with pytest.raises(TypeError, match="share must be a PhantomShare or None"):
        synthetic_dataset("ct", 4, 0, SIZE, share=str(tmp_path))


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_a_shared_dataset_gives_the_samples_of_an_unshared_one(tmp_path, kind):
    plain = synthetic_dataset(kind, 6, 3, SIZE, augment=True)
    shared = [synthetic_dataset(kind, 6, 3, SIZE, augment=True, share=PhantomShare(tmp_path, consumers=2))
              for _ in range(2)]
    expected = collate([plain[i] for i in range(6)])
    for dataset in shared:  # the DataLoader's batched path (__getitems__), as the trainer reads
        (batch,) = list(DataLoader(dataset, batch_size=6, collate_fn=collate))
        assert torch.equal(batch["volume"], expected["volume"]) and batch["text"] == expected["text"]
        assert torch.equal(batch["label"], expected["label"])
        if kind == "ct":
            assert torch.equal(batch["labels"], expected["labels"])
            assert [m["snippets"] for m in batch["meta"]] == [m["snippets"] for m in expected["meta"]]
    assert [(d.share.generated, d.share.read) for d in shared] == [(6, 0), (0, 6)]
    # an unshared set's key differs in what changes its records
    assert len({synthetic_dataset(kind, 6, s, size, augment=a).share_key
                for s, size, a in [(3, SIZE, True), (4, SIZE, True), (3, (32, 32, 32), True), (3, SIZE, False)]}) == 4


def _read_in_a_process(folder, queue):
    torch.set_num_threads(1)
    dataset = synthetic_dataset("ct", 16, 5, SIZE, augment=True, share=PhantomShare(folder, consumers=2))
    sums = [int(batch["volume"].to(torch.int64).sum()) for batch in DataLoader(dataset, batch_size=4, collate_fn=collate)]
    queue.put((os.getpid(), sums, dataset.share.generated, dataset.share.read))


def test_two_processes_side_by_side_generate_each_phantom_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_read_in_a_process, args=(str(tmp_path), queue)) for _ in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    plain = synthetic_dataset("ct", 16, 5, SIZE, augment=True)
    expected = [int(batch["volume"].to(torch.int64).sum()) for batch in DataLoader(plain, batch_size=4, collate_fn=collate)]
    assert all(sums == expected for _, sums, _, _ in results)
    assert sum(generated for _, _, generated, _ in results) == 16 and sum(read for _, _, _, read in results) == 16
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".claim"] * 16


def test_a_share_that_cannot_publish_leaves_everyone_generating(tmp_path, monkeypatch):
    """No hard links on the share's file system: the claimer says so in the folder and the others stop waiting at
    once (not after their timeout), with the same records."""
    a, b = PhantomShare(tmp_path, consumers=2, timeout=60), PhantomShare(tmp_path, consumers=2, timeout=60)
    make_a, make_b = Maker(), Maker()

    def no_links(*_):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "link", no_links)
    first = a.records("set", [0, 1], make_a)
    assert "Operation not supported" in (tmp_path / "unusable").read_text()
    import medvl.data.phantom_share as module

    def no_waiting(_):
        raise AssertionError("waited for a ticket that cannot come")

    monkeypatch.setattr(module.time, "sleep", no_waiting)
    second = b.records("set", [0, 1], make_b)
    assert make_a.calls == [0, 1] and make_b.calls == [0, 1] and b.read == 0
    assert all(_same(r, Maker()(i)) for r, i in zip(first + second, [0, 1, 0, 1]))
    a.records("set", [2], make_a)  # and claims nothing more that nobody could receive
    assert make_a.calls == [0, 1, 2] and not (tmp_path / "set-2.claim").exists()
