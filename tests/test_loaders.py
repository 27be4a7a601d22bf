"""pyfastbayes.nn.loaders.batches: the batches of a DataLoader over a TensorDataset taken from the
tensors directly, batch for batch and random draw for random draw what the loader yields."""
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Subset, TensorDataset

from pyfastbayes.nn.loaders import _direct, batches


def _data(n=37):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 2, generator=g), torch.randint(0, 5, (n,), generator=g),
                         torch.rand(n, generator=g, dtype=torch.float64))


class Strided:
    """A batch sampler of non-contiguous, repeated and reversed index runs."""

    def __iter__(self):
        yield [4, 2, 0]
        yield [5, 5]
        yield list(range(10, 20))
        yield [36]

    def __len__(self):
        return 4


LOADERS = {
    "sequential": lambda d: DataLoader(d, batch_size=8),
    "sequential drop_last": lambda d: DataLoader(d, batch_size=8, drop_last=True),
    "one batch": lambda d: DataLoader(d, batch_size=100),
    "shuffled, global rng": lambda d: DataLoader(d, batch_size=6, shuffle=True),
    "shuffled, own generator": lambda d: DataLoader(d, batch_size=6, shuffle=True,
                                                    generator=torch.Generator().manual_seed(3)),
    "batch sampler": lambda d: DataLoader(d, batch_sampler=Strided()),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_same_batches_and_same_random_state_as_the_loader(kind):
    torch.manual_seed(5)
    want_loader = LOADERS[kind](_data())
    want = list(want_loader)
    want_state = torch.get_rng_state()
    want_gen = want_loader.generator.get_state() if want_loader.generator is not None else None
    torch.manual_seed(5)
    loader = LOADERS[kind](_data())
    assert _direct(loader)
    got = list(batches(loader))
    assert torch.equal(torch.get_rng_state(), want_state)  # the draws the loader makes, made here too
    if want_gen is not None:
        assert torch.equal(loader.generator.get_state(), want_gen)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert type(g) is type(w) is list and len(g) == len(w) == 3
        for a, b in zip(g, w):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_second_walk_reshuffles_as_the_loader_does():
    torch.manual_seed(0)
    ref = DataLoader(_data(), batch_size=5, shuffle=True)
    want = [torch.cat([b[1] for b in ref]) for _ in range(2)]
    torch.manual_seed(0)
    ours = DataLoader(_data(), batch_size=5, shuffle=True)
    got = [torch.cat([b[1] for b in batches(ours)]) for _ in range(2)]
    assert not torch.equal(want[0], want[1])
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_other_loaders_are_walked_by_the_loader():
    calls = []

    def collate(rows):
        calls.append(len(rows))
        return torch.utils.data.default_collate(rows)

    d = _data()
    for loader in (DataLoader(d, batch_size=8, collate_fn=collate), DataLoader(Subset(d, range(10)), batch_size=4),
                   DataLoader(d, batch_size=None)):
        assert not _direct(loader)
        assert len(list(batches(loader))) == len(list(iter(loader)))
    assert calls == [8, 8, 8, 8, 5] * 2
    plain = [(torch.zeros(2), torch.ones(2))]
    assert list(batches(plain)) == plain


class Fixed:
    """A batch sampler of given index lists."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("bad", [[[35, 36, 37]], [[-38]], [[]], [[0.0, 1.0]], [[0.5]]],
                         ids=["past-the-end", "before-the-start", "empty", "float", "fraction"])
def test_indices_the_loader_refuses_raise_index_error(bad):
    loader = DataLoader(_data(), batch_sampler=Fixed(*bad))  # 37 rows
    with pytest.raises(IndexError):
        list(iter(loader))
    with pytest.raises(IndexError):
        list(batches(loader))


def test_negative_indices_count_from_the_end_as_in_the_loader():
    loader = DataLoader(_data(), batch_sampler=Fixed([-1, -2], [-3, -2, -1], [0, -37]))
    for g, w in zip(batches(loader), iter(loader), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w))


class Eager:
    """A batch sampler whose __iter__ draws at once (not a generator): the order of its draw and
    the loader's seed draw decides the batches."""

    def __iter__(self):
        perm = torch.randperm(37).tolist()
        return iter([perm[i:i + 10] for i in range(0, 37, 10)])

    def __len__(self):
        return 4


def test_an_eager_batch_sampler_draws_before_the_seed_as_in_the_loader():
    torch.manual_seed(3)
    want = [b[1] for b in DataLoader(_data(), batch_sampler=Eager())]
    state = torch.get_rng_state()
    torch.manual_seed(3)
    got = [b[1] for b in batches(DataLoader(_data(), batch_sampler=Eager()))]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_batches_own_their_memory():
    d = _data()
    keep = d.tensors[0].clone()
    for loader in (DataLoader(d, batch_size=8), DataLoader(d, batch_size=8, shuffle=True)):
        for b in batches(loader):
            b[0].mul_(0)  # a model writing into its input
    assert torch.equal(d.tensors[0], keep)
