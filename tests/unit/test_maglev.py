"""Maglev table (ctl/dataplane/maglev.py): the paper's populate loop, balance, minimal disruption,
stable hashing (no dependence on PYTHONHASHSEED) and edge cases. Pure: no root."""
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctl.dataplane import maglev
from ctl.dataplane.maglev import TABLE_SIZE, disruption, table, table_size_for

ROOT = Path(__file__).resolve().parents[2]
SMALL_PRIMES = [2, 3, 5, 7, 11, 13, 31, 101, 251, 509, 1021]


def names(n: int) -> list[str]:
    """n stable, sorted backend identities, as the control plane passes them."""
    return sorted(f"10.244.{i // 250}.{i % 250 + 2}:8080" for i in range(n))


def reference(backends, size, weights=None):
    """Section 3.4 of the paper, written out plainly (materialised permutations)."""
    weights = weights or {}
    perms = []
    for name in backends:
        h1, h2 = maglev._hashes(name)
        offset, skip = h1 % size, h2 % (size - 1) + 1
        perms.append([(offset + j * skip) % size for j in range(size)])
    nxt = [0] * len(backends)
    entry = [-1] * size
    filled = 0
    while True:
        for i in range(len(backends)):
            for _ in range(weights.get(backends[i], 1)):
                c = perms[i][nxt[i]]
                while entry[c] >= 0:
                    nxt[i] += 1
                    c = perms[i][nxt[i]]
                entry[c] = i
                nxt[i] += 1
                filled += 1
                if filled == size:
                    return entry


def deviation(t, n):
    """Worst relative distance of a backend's slot count from the fair share len(t)/n."""
    counts = Counter(t)
    fair = len(t) / n
    return max(abs(counts.get(i, 0) - fair) / fair for i in range(n))


# -- the algorithm ------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    size=st.sampled_from(SMALL_PRIMES),
    salt=st.text(min_size=0, max_size=4),
    weighted=st.lists(st.integers(min_value=0, max_value=3), min_size=12, max_size=12),
    use_weights=st.booleans(),
)
def test_matches_the_papers_populate_loop(n, size, salt, weighted, use_weights):
    backends = sorted(f"{salt}backend-{i}" for i in range(n))
    if n > size:
        with pytest.raises(ValueError):
            table(backends, size)
        return
    weights = None
    if use_weights and any(weighted[:n]):
        weights = {b: w for b, w in zip(backends, weighted)}
    got = table(backends, size, weights)
    assert got == reference(backends, size, weights)
    assert len(got) == size
    assert set(got) <= set(range(n))


def test_offset_and_skip_ranges_and_pinned_hashes():
    # pinned: a change of hash function or personalisation silently reshuffles every
    # service on upgrade, so it has to show up here
    assert maglev._hashes("10.244.1.5:8080") == (594849904153588785, 10429264919030154858)
    for name in names(200):
        h1, h2 = maglev._hashes(name)
        assert 0 <= h1 % TABLE_SIZE <= TABLE_SIZE - 1
        assert 1 <= h2 % (TABLE_SIZE - 1) + 1 <= TABLE_SIZE - 1


def test_pinned_tables():
    b = ["10.244.1.5:8080", "10.244.2.7:8080", "10.244.3.9:8080"]
    assert table(b, 13) == [0, 0, 2, 1, 2, 2, 1, 0, 0, 0, 2, 1, 1]
    digest = hashlib.sha256(json.dumps(table(b)).encode()).hexdigest()
    assert digest == "080bce78a860023c713a422328044ebc040eee81b8a9ec7bddfeb81530e4d90d"


# -- balance --------------------------------------------------------------------------

def test_every_backend_within_5_percent_of_fair_for_1_to_100_backends():
    worst = (0.0, 0)
    for n in range(1, 101):
        t = table(names(n))
        assert len(t) == TABLE_SIZE
        counts = Counter(t)
        assert set(counts) == set(range(n))
        # rounds of one slot per backend: everyone gets floor or ceil of size/n
        assert set(counts.values()) <= {TABLE_SIZE // n, -(-TABLE_SIZE // n)}
        worst = max(worst, (deviation(t, n), n))
    assert worst[0] <= 0.05, f"worst deviation {worst[0]:.2%} at N={worst[1]}"


def test_1021_slots_cannot_be_within_5_percent():
    # why TABLE_SIZE is not 1021: 93 backends get 10 or 11 slots, fair is 10.98
    assert deviation(table(names(93), 1021), 93) > 0.05

    def floor_ceil_bound(m):
        return max(max(m % n, n - m % n) / m if m % n else 0.0 for n in range(1, 101))

    primes = [m for m in range(1000, 1900) if maglev._is_prime(m)]
    assert min(m for m in primes if floor_ceil_bound(m) <= 0.05) == 1811
    assert floor_ceil_bound(TABLE_SIZE) <= 0.05


def test_weights_give_proportional_turns():
    b = names(4)
    t = table(b, weights={b[0]: 3, b[1]: 1, b[2]: 0, b[3]: 2})
    counts = Counter(t)
    assert 2 not in counts  # weight 0: drained, no slots
    for i, w in ((0, 3), (1, 1), (3, 2)):
        assert abs(counts[i] - TABLE_SIZE * w / 6) <= w  # within one round's turns
    assert table(b, weights={name: 1 for name in b}) == table(b)
    assert table(b, weights={}) == table(b)
    # a huge weight takes every turn of the (never completed) first round
    assert table(b, 101, weights={b[0]: 10**12}) == [0] * 101


# -- disruption -------------------------------------------------------------------------

def test_adding_or_removing_one_backend_moves_at_most_1_over_n_plus_2_percent():
    worst = (0.0, None)
    for n in range(2, 101):
        big = names(n)
        t_big = table(big)
        share = Counter(t_big)
        for gone in sorted({0, n // 2, n - 1}):  # first, middle, last
            small = big[:gone] + big[gone + 1:]
            t_small = table(small)
            removed = disruption(t_big, big, t_small, small)
            added = disruption(t_small, small, t_big, big)
            # the slots of the backend that goes (or comes) always move
            assert removed >= share[gone] / TABLE_SIZE
            assert added >= share[gone] / TABLE_SIZE
            for what, d in (("remove", removed), ("add", added)):
                assert d <= 1 / n + 0.02, f"{what} backend {gone} of {n}: {d:.2%} moved"
                worst = max(worst, (d - 1 / n, (n, gone, what)))
    print(f"worst excess over 1/N: {worst[0]:.2%} at {worst[1]}")


def test_disruption_helper():
    b = names(5)
    t = table(b, 101)
    assert disruption(t, b, t, b) == 0.0
    # renumbering the same identities is not disruption
    rev = list(reversed(b))
    assert disruption(t, b, [len(b) - 1 - i for i in t], rev) == 0.0
    assert disruption(t, b, [0] * 101, ["192.0.2.1:80"]) == 1.0
    assert disruption(t, b, [0] * 101, b) == pytest.approx(1 - t.count(0) / 101)
    assert disruption([], [], [], []) == 0.0
    assert disruption([], [], t, b) == 1.0
    assert disruption(t, b, [], []) == 1.0
    with pytest.raises(ValueError):
        disruption(t, b, table(b, 103), b)


# -- determinism ------------------------------------------------------------------------

def test_same_input_same_table():
    b = names(10)
    assert table(b) == table(list(b)) == table(tuple(b))
    assert table(b, 1021) == table(b, 1021)


def test_independent_of_pythonhashseed():
    code = (
        "import json; from ctl.dataplane.maglev import table\n"
        "b = sorted(f'10.244.{i // 250}.{i % 250 + 2}:8080' for i in range(10))\n"
        "print(json.dumps([table(b), table(b, 1021, {b[0]: 2, b[3]: 0})]))\n"
    )
    b = names(10)
    here = [table(b), table(b, 1021, {b[0]: 2, b[3]: 0})]
    for seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == here


# -- sizes ------------------------------------------------------------------------------

def test_table_size_for():
    assert maglev._is_prime(TABLE_SIZE)
    for n in (0, 1, 10, 100, 163):
        assert table_size_for(n) == TABLE_SIZE
    assert table_size_for(164) == 32749
    assert table_size_for(655) == 65521
    assert table_size_for(1311) == table_size_for(131071) == 131071
    for n in (0, 1, 164, 655, 1311, 5000):
        size = table_size_for(n)
        assert maglev._is_prime(size) and size >= n
    with pytest.raises(ValueError):
        table_size_for(131072)
    with pytest.raises(ValueError):
        table_size_for(-1)


# -- edge cases -------------------------------------------------------------------------

def test_no_backends():
    assert table([]) == []
    assert table([], 7) == []


def test_one_backend_owns_every_slot():
    assert table(names(1)) == [0] * TABLE_SIZE
    assert table(["a"], 2) == [0, 0]


def test_as_many_backends_as_slots():
    assert sorted(table(names(7), 7)) == list(range(7))


@pytest.mark.parametrize("size", [0, 1, 4, 1000, 1024, 16384, -7])
def test_non_prime_size_rejected(size):
    with pytest.raises(ValueError, match="prime"):
        table(names(3), size)
    with pytest.raises(ValueError, match="prime"):
        table([], size)  # a bad size is an error even while a service has no backends


def test_non_int_size_rejected():
    with pytest.raises(TypeError):
        table(names(3), 1021.0)


def test_size_smaller_than_backends_rejected():
    with pytest.raises(ValueError, match="smaller than"):
        table(names(8), 7)


def test_bad_backends_and_weights_rejected():
    b = names(3)
    with pytest.raises(ValueError, match="duplicate"):
        table([b[0], b[0]])
    with pytest.raises(TypeError):
        table([b[0], 5])
    with pytest.raises(ValueError, match="unknown"):
        table(b, weights={"10.9.9.9:1": 1})
    with pytest.raises(ValueError, match=">= 0"):
        table(b, weights={b[0]: -1})
    with pytest.raises(ValueError, match="weight > 0"):
        table(b, weights={name: 0 for name in b})
    with pytest.raises(TypeError):
        table(b, weights={b[0]: 1.5})


def test_compiled_populate_equals_the_reference():
    """ctl/dataplane/native/maglev.c (what the daemon uses) gives the reference's slots."""
    import random
    rng = random.Random(15)
    for _ in range(40):
        n = rng.randint(1, 60)
        names = sorted({f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}:{rng.choice([80, 8080])}"
                        for _ in range(n)})
        size = rng.choice([251, 1021, 4093, TABLE_SIZE])
        assert maglev.fast_table(names, size) == table(names, size)
    assert maglev.fast_table([], TABLE_SIZE) == []
    with pytest.raises(ValueError):
        maglev.fast_table(["a", "b", "c"], 2)
    with pytest.raises(ValueError):
        maglev.fast_table(["a"], 1000)
